"""Helpers shared by the test packages (importable from any test: pytest puts ``tests/`` on
``sys.path`` for its conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def fpstune(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``python -m fpstune ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "fpstune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# -- processes ------------------------------------------------------------------------------------


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def descends_from(pid: int, root: int) -> bool:
    for _ in range(64):
        if pid == root:
            return True
        if pid <= 1:
            return False
        pid = _parent(pid)
    return False


def evaluating_workers(root: int) -> list[int]:
    """Ray actor processes under ``root`` (a CLI run, or this test process) currently inside
    Worker.evaluate: Ray names the process after the task it runs. Other engineers' runs on the
    same machine are not ``root``'s descendants and are left alone."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ray::Worker.evaluate" in cmdline and descends_from(int(entry.name), root):
            pids.append(int(entry.name))
    return pids


# Nine levels of ten aliases each: 10^9 leaves once expanded, 500 bytes as text.
ALIAS_BOMB = (
    "["
    + ", ".join(
        [f"&c0 [{', '.join(['lol'] * 10)}]"]
        + [f"&c{n} [{', '.join([f'*c{n - 1}'] * 10)}]" for n in range(1, 9)]
    )
    + "]"
)
