"""Where a command writes (`-o`), checked before any work: a folder, a path under a file, a
folder that may not be written give one line ``error: -o: <path>: <reason>``, exit 2, and
nothing written; a missing folder is created. ``latency export`` of a storage without measured
latencies is bad input too."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import TINY, fill_latency_table, fpstune, run_main

from fpstune.spec.study import load_study

sys.path.insert(0, str(Path(__file__).parents[1] / "dashboard"))
from dashboard_helpers import mini_study


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``study.db``: the mini schedule study (no latency rows); ``latency.db``: measured rows."""
    d = tmp_path_factory.mktemp("stores")
    mini_study(f"sqlite:///{d / 'study.db'}", trials=4)
    fill_latency_table(f"sqlite:///{d / 'latency.db'}", load_study(TINY))
    return {"study": d / "study.db", "latency": d / "latency.db"}


# Each command with its -o option (capture's is --out, and checks before reading the model).
STUDY = ["--storage", "sqlite:///study.db"]
COMMANDS: dict[str, tuple[list[str], str, str]] = {
    "export": (["export", "mini", *STUDY, "-o"], "-o", "p.yaml"),
    "report": (["report", "mini", *STUDY, "-o"], "-o", "r.html"),
    "latency-export": (["latency", "export", "--storage", "sqlite:///latency.db", "-o"], "-o",
                       "l.json"),
    "capture": (["capture", "no-model", "--prompt", "a cat", "-o"], "--out", "c.safetensors"),
}  # fmt: skip


def _prepare(cwd: Path, stores: dict[str, Path]) -> None:
    shutil.copy(stores["study"], cwd / "study.db")
    shutil.copy(stores["latency"], cwd / "latency.db")
    (cwd / "a-file").write_text("not a folder\n")


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else ""
        for p in sorted(folder.rglob("*"))
    }


def _one_line(code: int, err: str, *says: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert all(s in lines[0] for s in says), lines[0]
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("dest", ["folder", "under-a-file", "read-only"])
def test_bad_destination_is_one_line_before_any_work(
    command: str,
    dest: str,
    stores: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _prepare(tmp_path, stores)
    args, option, name = COMMANDS[command]
    if dest == "folder":
        path, reason = f"out{Path(name).suffix}", "is a folder"
        (tmp_path / path).mkdir()
    elif dest == "under-a-file":
        path, reason = f"a-file/{name}", "a-file is not a folder"
    else:
        (tmp_path / "ro").mkdir()
        path, reason = f"ro/new/{name}", "folder ro is not writable"
        real_access = os.access  # root may write anywhere: make "ro" read-only for this check

        def access(p: Any, mode: int, **kw: Any) -> bool:
            return False if str(p) == "ro" else real_access(p, mode, **kw)

        monkeypatch.setattr("fpstune.outputs.os.access", access)

    def no_work(*a: Any, **k: Any) -> Any:
        raise AssertionError("the destination is checked before the study is loaded")

    monkeypatch.setattr("fpstune.export.load_study_by_ref", no_work)
    monkeypatch.setattr("fpstune.dashboard.report.report_info", no_work)
    before = _snapshot(tmp_path)
    code, _, err = run_main([*args, path], tmp_path, monkeypatch, capsys)
    _one_line(code, err, f"error: {option}: {path}: ", reason)
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_folder_for_real(
    stores: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _prepare(tmp_path, stores)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        code, _, err = run_main([*COMMANDS["report"][0], "ro/r.html"], tmp_path, monkeypatch, None)
    finally:
        (tmp_path / "ro").chmod(0o755)
    _one_line(code, err, "-o: ro/r.html: folder ro is not writable")


def test_export_to_a_folder_as_a_user_runs_it(stores: dict[str, Path], tmp_path: Path) -> None:
    _prepare(tmp_path, stores)
    (tmp_path / "out").mkdir()
    before = _snapshot(tmp_path)
    out = fpstune(*COMMANDS["export"][0], "out", cwd=tmp_path, timeout=120)
    _one_line(out.returncode, out.stderr, "error: -o: out: is a folder")
    assert _snapshot(tmp_path) == before


def test_missing_folders_are_created(
    stores: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _prepare(tmp_path, stores)
    code, out, err = run_main(
        [*COMMANDS["latency-export"][0], "new/sub/l.json"], tmp_path, monkeypatch, capsys
    )
    assert code == 0, err
    assert (tmp_path / "new" / "sub" / "l.json").is_file() and "rows" in out


@pytest.mark.parametrize(
    ("storage", "says"),
    [
        ("study.db", "--storage: no measured latencies in sqlite:///study.db; run `fpstune study"),
        ("gone.db", "--storage: no study database at gone.db"),
    ],
)
def test_latency_export_without_measured_latencies(
    storage: str,
    says: str,
    stores: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _prepare(tmp_path, stores)
    before = _snapshot(tmp_path)
    args = ["latency", "export", "--storage", f"sqlite:///{storage}", "-o", "l.json"]
    code, _, err = run_main(args, tmp_path, monkeypatch, capsys)
    _one_line(code, err, says)
    assert _snapshot(tmp_path) == before  # no JSON, no database, no table added to one
