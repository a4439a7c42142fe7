"""Helpers shared by the test packages (importable from any test: pytest puts ``tests/`` on
``sys.path`` for its conftest)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fpstune.kernels.fingerprint import HardwareFingerprint


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


#: A fixed H100 fingerprint for tables and policies built in tests.
H100 = HardwareFingerprint(
    gpu="NVIDIA H100 80GB HBM3",
    sm_count=132,
    capability=(9, 0),
    driver="550.54.15",
    torch="2.11.0",
    triton="3.6.0",
    fpstune="0.1.0",
)


@contextlib.contextmanager
def fresh_pg_database(prefix: str) -> Iterator[str]:
    """A database of its own on the PostgreSQL server .ci/run starts (FPSTUNE_TEST_PG_URL),
    dropped afterwards; under CI a missing server fails, elsewhere it skips."""
    import sqlalchemy as sa  # here, not at the top: the GPU host runs the kernel tests without it

    admin = os.environ.get("FPSTUNE_TEST_PG_URL")
    if not admin:
        if os.environ.get("CI"):
            pytest.fail("FPSTUNE_TEST_PG_URL is not set: .ci/run must start PostgreSQL")
        pytest.skip("no PostgreSQL server (set FPSTUNE_TEST_PG_URL; .ci/run does)")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield sa.engine.make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
        engine.dispose()


H100_NEWER_TORCH = H100.model_copy(update={"torch": "2.12.0"})
A100 = H100.model_copy(
    update={"gpu": "NVIDIA A100-SXM4-80GB", "sm_count": 108, "capability": (8, 0)}
)


def install_plugin(
    site: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    group: str,
    entry_points: dict[str, str],
    modules: dict[str, str],
) -> None:
    """A distribution (``toy-plugin``) on ``sys.path`` whose ``group`` entry points are
    ``entry_points`` (name -> ``module:attr``) and whose modules hold ``modules`` (name ->
    source): a third party's package, without editing fpstune."""
    info = site / "toy_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(site))
