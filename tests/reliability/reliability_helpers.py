"""Shared pieces of the reliability tests: the CLI (in-process and as a subprocess), fault
injection (finding a run's Ray workers, a private PostgreSQL server to restart) and the
bookkeeping checks every fault test ends with."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import optuna
import pytest
from optuna.trial import TrialState

HERE = Path(__file__).parent
DATA = HERE / "data"
ROOT = HERE.parents[1]
CHEAP = DATA / "cheap.yaml"
#: the hardware block of a policy tuned on another GPU (the shipped table's H100)
H100 = {
    "gpu": "NVIDIA H100 80GB HBM3",
    "sm_count": 132,
    "capability": [9, 0],
    "driver": "580.159.04",
    "torch": "2.11.0+cu130",
    "triton": "3.6.0",
    "fpstune": "0.1.0",
}
sys.path.insert(0, str(HERE.parent / "service"))  # the service tests' tiny study and table

from service_helpers import TINY, fill_latency_table  # noqa: E402
from shared_helpers import descends_from, evaluating_workers, fpstune  # noqa: E402

__all__ = [
    "CHEAP",
    "DATA",
    "ROOT",
    "TINY",
    "descends_from",
    "evaluating_workers",
    "fill_latency_table",
    "fpstune",
]


# -- the CLI --------------------------------------------------------------------------------------


def run_main(
    args: list[str],
    cwd: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str] | None,
) -> tuple[int, str, str]:
    """``fpstune ARGS`` in this process, through the script's own entry point: exit status,
    stdout, stderr (read through ``capsys``, or, for a module-wide fixture, redirected)."""
    from fpstune.cli.commands import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["fpstune", *args])
    if capsys is not None:
        capsys.readouterr()
    out_io, err_io = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if capsys is None:
            stack.enter_context(contextlib.redirect_stdout(out_io))
            stack.enter_context(contextlib.redirect_stderr(err_io))
        try:
            main()
            code: object = 0  # main returns on success
        except SystemExit as e:
            code = e.code
    out, err = (out_io.getvalue(), err_io.getvalue()) if capsys is None else capsys.readouterr()
    return (code if isinstance(code, int) else 1), out, err


def start_fpstune(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """The CLI in the background, in its own session (so its local Ray can be killed with it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "fpstune", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


# -- bookkeeping ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Books:
    trials: list[optuna.trial.FrozenTrial]
    states: Counter[TrialState]

    @property
    def complete(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.trials if t.state == TrialState.COMPLETE]

    @property
    def failed(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.trials if t.state == TrialState.FAIL]


def books(url: str, study: str) -> Books:
    trials = optuna.load_study(study_name=study, storage=url).get_trials()
    return Books(trials, Counter(t.state for t in trials))


def check_nothing_lost(b: Books, *, budget: int, metrics: int = 2) -> None:
    """The invariants every fault test ends with: the budget of COMPLETE trials reached, none
    left RUNNING or WAITING, no trial number used twice, every COMPLETE trial with all its
    values, parameters and candidate, every FAIL with its reason."""
    assert b.states[TrialState.COMPLETE] == budget, b.states
    assert b.states[TrialState.RUNNING] == 0, b.states
    numbers = [t.number for t in b.trials]
    assert sorted(numbers) == list(range(len(numbers)))  # unique and gap-free
    for t in b.complete:
        assert t.values is not None and len(t.values) == metrics, t.number
        assert t.params and "candidate" in t.user_attrs, t.number
    for t in b.failed:
        assert t.user_attrs.get("fail_reason"), t.number


# -- a private PostgreSQL server ------------------------------------------------------------------


def _pg_bin() -> Path | None:
    cluster = os.environ.get("FPSTUNE_TEST_PG_CLUSTER", "").split()
    versions = [cluster[0]] if cluster else []
    base = Path("/usr/lib/postgresql")
    if base.is_dir():
        versions += sorted((p.name for p in base.iterdir()), key=lambda v: float(v), reverse=True)
    for v in versions:
        if (base / v / "bin" / "initdb").is_file():
            return base / v / "bin"
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateServer:
    """A PostgreSQL server of this test's own (initdb in a temp folder, on a free loopback port,
    password auth), so it can be restarted without disturbing the server other tests share.
    Runs as the ``postgres`` user when we are root (PostgreSQL refuses to run as root)."""

    PASSWORD = "private-pw-7f3a"

    def __init__(self) -> None:
        bin_dir = _pg_bin()
        if bin_dir is None:
            _unavailable("PostgreSQL's initdb/pg_ctl are not installed (.ci/run installs them)")
        self.bin = bin_dir
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                _unavailable("running as root without runuser")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="fpstune-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        pwfile = self.dir / "pw"
        pwfile.write_text(self.PASSWORD + "\n")
        if self.as_user:
            shutil.chown(self.dir, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "fpstune",
            "-A",
            "scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
        )
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://fpstune:{self.PASSWORD}@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts, "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, down_s: float) -> None:
        """Stop (closing every connection), stay down ``down_s`` seconds, start again."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _unavailable(why: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)
