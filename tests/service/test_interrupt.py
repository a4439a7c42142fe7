"""Ctrl-C and SIGTERM as a user sends them: one line on stderr, exit 130 (143), no traceback;
``study run`` puts its trials in flight back in the queue, never counted as failed, and the same
command resumes; a start that is interrupted, or fails, leaves no database file it created."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from service_helpers import DATA, TINY, fill_latency_table

from fpstune.catalog import study_status
from fpstune.cli.commands import INTERRUPTED, INTERRUPTED_RESUMABLE
from fpstune.run import controller, pool, preflight, runner
from fpstune.run.controller import _signals_deferred
from fpstune.run.pool import WorkerStartError
from fpstune.spec.study import load_study

CLI = [sys.executable, "-c", "from fpstune.cli.commands import main; main()"]
SLOW = DATA / "interrupt.yaml"  # trials of about a second
MINI = Path(__file__).parents[2] / "studies" / "mini.yaml"  # its workers start on a new file


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    # In a session of its own, to signal its process group as a terminal's Ctrl-C does (Ray's
    # own processes block SIGINT).
    return subprocess.Popen(
        [*CLI, *args],
        cwd=cwd,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _signal_when(
    proc: subprocess.Popen[str], ready: Callable[[], bool], sig: int
) -> tuple[int, str, str]:
    deadline = time.monotonic() + 180
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out before the moment to signal"
        time.sleep(0.02)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _trial_running(db: Path) -> bool:
    """A trial is RUNNING with its parameters written (read-only: the controller writes)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
            (n,) = c.execute(
                "SELECT count(*) FROM trials t WHERE t.state = 'RUNNING' AND EXISTS "
                "(SELECT 1 FROM trial_params p WHERE p.trial_id = t.trial_id)"
            ).fetchone()
    except sqlite3.Error:  # no file or no tables yet
        return False
    return bool(n)


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="interrupt:schedule", storage=url).get_trials()


def test_ctrl_c_mid_trial_requeues_it_and_the_same_command_resumes(
    sqlite_url: str, tmp_path: Path
) -> None:
    fill_latency_table(sqlite_url, load_study(SLOW))
    db = Path(sqlite_url.removeprefix("sqlite:///"))
    args = ["study", "run", str(SLOW), "--storage", sqlite_url, "--trials", "2", "--no-progress"]
    code, out, err = _signal_when(_start(args, tmp_path), lambda: _trial_running(db), signal.SIGINT)
    assert (code, err) == (130, INTERRUPTED_RESUMABLE + "\n"), out + err

    trials = _trials(sqlite_url)
    assert not [t for t in trials if t.state in (TrialState.FAIL, TrialState.RUNNING)]
    requeued = {t.number: t.params for t in trials if t.state == TrialState.WAITING}
    assert len(requeued) == 1 and all(requeued.values())  # back in the queue, parameters kept
    status = study_status("interrupt", storage_url=sqlite_url)
    assert status["waiting"] == 1 and "fail" not in status

    again = subprocess.run([*CLI, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "2/2 complete, 0 failed" in again.stdout
    done = {t.number: t for t in _trials(sqlite_url)}
    assert Counter(t.state for t in done.values()) == {TrialState.COMPLETE: 2}
    for number, params in requeued.items():  # the same trial ran again, with the same params
        assert done[number].params == params


def test_ctrl_c_during_start_up_leaves_no_database_file(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    args = [
        "study",
        "run",
        str(MINI),
        "--storage",
        f"sqlite:///{db}",
        "--trials",
        "1",
        "--no-progress",
    ]
    # The file appears while the workers set up (they open the latency table), before any trial.
    code, out, err = _signal_when(_start(args, tmp_path), db.exists, signal.SIGINT)
    assert (code, err) == (130, INTERRUPTED_RESUMABLE + "\n"), out + err
    assert not list(tmp_path.glob("new.db*"))  # nor its journal or lock


def _handles_sigterm(pid: int) -> bool:
    """`fpstune.cli.commands.main` has installed its handlers (Python itself catches only
    SIGINT), and not yet dropped them (it ignores signals once the command is over)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_policy_validate_interrupted_says_so(tmp_path: Path, sig: int, code: int) -> None:
    """Signalled once the CLI's handlers are in place, while it loads its command (imports,
    reading the policy): a policy file is read too fast, and a FIFO is refused, to wait on."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("schema_version: 1\n")
    proc = _start(["policy", "validate", str(policy), "--no-hardware-check"], tmp_path)
    ready = functools.partial(_handles_sigterm, proc.pid)
    assert _signal_when(proc, ready, sig) == (code, "", INTERRUPTED + "\n")


@pytest.mark.parametrize("existed", [False, True])
@pytest.mark.parametrize("stop", [KeyboardInterrupt, WorkerStartError])
def test_a_start_stopped_before_any_trial_removes_only_a_file_it_created(
    sqlite_url: str, tiny: Any, monkeypatch: pytest.MonkeyPatch, existed: bool, stop: type
) -> None:
    db = Path(sqlite_url.removeprefix("sqlite:///"))
    if existed:
        fill_latency_table(sqlite_url, tiny)

    def workers_set_up_then_stopped(*args: Any) -> None:
        with contextlib.closing(sqlite3.connect(db)) as c:  # as the workers' latency table does
            c.execute("CREATE TABLE IF NOT EXISTS half_written (x)")
        raise stop("stopped")

    # the runner imports these when it runs (bad input is told before Ray and torch load)
    monkeypatch.setattr(controller, "ensure_ray", lambda address, workers: None)
    monkeypatch.setattr(pool, "WorkerPool", workers_set_up_then_stopped)
    # without the table, the study would be refused before the start (tests/latency)
    monkeypatch.setattr(preflight, "check_schedule_latency", lambda *args: None)
    with pytest.raises(stop):
        runner.run_study(TINY, storage_url=sqlite_url, progress=False)
    assert db.exists() == existed
    assert not db.with_name(db.name + "-controller.lock").exists()


def test_signals_wait_for_the_end_of_a_deferred_block() -> None:
    # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job
    # starts with SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached_end = False
    try:
        with pytest.raises(KeyboardInterrupt), _signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # a handler would have run by now
            reached_end = True
        assert reached_end
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_export_interrupted_says_so(tmp_path: Path, sig: int, code: int) -> None:
    """Signalled while it waits for a study file another process holds locked. SQLite's busy
    wait is C code, so the signal is handled once the lock goes (released just after it)."""
    db = tmp_path / "store.db"
    optuna.create_study(study_name="kept", storage=f"sqlite:///{db}").ask()
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    args = ["export", "kept", "-o", "p.yaml", "--storage", f"sqlite:///{db}"]
    proc = _start(args, tmp_path)

    def waiting_on_the_lock() -> bool:
        with contextlib.suppress(OSError):
            fds = Path(f"/proc/{proc.pid}/fd").iterdir()
            if any(os.path.realpath(fd) == str(db) for fd in fds):
                os.killpg(proc.pid, sig)
                time.sleep(0.5)
                lock.close()
                return True
        return False

    deadline = time.monotonic() + 60
    while not waiting_on_the_lock():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (code, "", INTERRUPTED + "\n")
    assert not (tmp_path / "p.yaml").exists()
