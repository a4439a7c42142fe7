"""Faults of the storage: many writers on PostgreSQL with the server restarted and connections
killed mid-study, several controllers on one SQLite file, and the storage layer's own rules
(transient vs permanent failures, a commit that landed before its connection dropped)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState
from reliability_helpers import (
    CHEAP,
    PrivateServer,
    books,
    check_nothing_lost,
    descends_from,
    fill_latency_table,
    start_fpstune,
)

from fpstune.spec.study import load_study
from fpstune.storage import (
    RetryingRDBStorage,
    StorageBusy,
    StorageUnavailable,
    controller_lock,
    is_transient,
    open_existing_storage,
    open_storage,
    retry_db,
)

STUDY = "cheap:schedule"


def _complete(engine: sa.Engine) -> int:
    """COMPLETE trials, straight from Optuna's tables; -1 while the database is down."""
    try:
        with engine.connect() as c:
            return int(
                c.execute(sa.text("SELECT count(*) FROM trials WHERE state = 'COMPLETE'")).scalar()
                or 0
            )
    except sa.exc.SQLAlchemyError:
        return -1


def _ray_workers(root: int) -> int:
    """Live Ray actor processes of our Worker class under ``root``."""
    n = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::Worker") and descends_from(int(entry.name), root):
                n += 1
    return n


def test_16_workers_500_trials_with_the_database_restarted_mid_study(
    private_pg: PrivateServer, tmp_path: Path
) -> None:
    """16 Ray workers, 500 trials on PostgreSQL; mid-study the server is stopped for 3 s and
    started again, twice, and once every connection is killed. Nothing is lost or doubled."""
    url = private_pg.url
    fill_latency_table(url, load_study(CHEAP))
    run = start_fpstune(
        "study", "run", str(CHEAP), "--storage", url, "--workers", "16", "--trials", "500",
        "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    engine = sa.create_engine(url, pool_pre_ping=True)
    faults: list[str] = []
    most_workers = 0

    def inject() -> None:
        nonlocal most_workers
        plan = [(100, "restart"), (250, "kill connections"), (350, "restart")]
        deadline = time.monotonic() + 500
        while plan and run.poll() is None and time.monotonic() < deadline:
            most_workers = max(most_workers, _ray_workers(run.pid))
            at, fault = plan[0]
            if _complete(engine) >= at:
                if fault == "restart":
                    engine.dispose()
                    private_pg.restart(down_s=3.0)
                else:
                    with engine.connect() as c:
                        c.execute(
                            sa.text(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE pid <> pg_backend_pid() AND datname = current_database()"
                            )
                        )
                        c.commit()
                faults.append(f"{fault} at {at}")
                plan.pop(0)
            time.sleep(0.2)

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    out, err = run.communicate(timeout=560)
    injector.join(timeout=5)
    engine.dispose()
    assert run.returncode == 0, err[-3000:]
    assert len(faults) == 3, faults
    assert most_workers >= 16
    assert "reachable again" in err  # the controller did meet the outage, and rode it out
    assert "500/500 complete" in out

    b = books(url, STUDY)
    print(f"faults: {faults}; trials: {dict(b.states)}; workers seen: {most_workers}")
    check_nothing_lost(b, budget=500)
    for t in b.complete:  # every result whole: both objectives, its parameters and constraints
        assert set(t.params) == set(t.distributions) and t.constraints
    # Only the faults may fail trials, and each such trial's parameters ran again.
    for t in b.failed:
        again = [r for r in b.trials if r.system_attrs.get("failed_trial") == t.number]
        assert again or "failed_trial" in t.system_attrs, t.user_attrs["fail_reason"]


def test_a_second_controller_on_one_sqlite_file_is_refused(tmp_path: Path) -> None:
    """The same command started twice at once on one SQLite file (3 workers each), while a
    reader polls the file: one controller is refused at once with advice, the other finishes
    and loses nothing, and nobody meets "database is locked"."""
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    fill_latency_table(url, load_study(CHEAP))
    args = ("study", "run", str(CHEAP), "--storage", url, "--trials", "24", "--workers", "3")
    runs = [start_fpstune(*args, "--no-progress", cwd=tmp_path) for _ in range(2)]
    reader = open_existing_storage(url)
    read_errors: list[str] = []
    reads = 0
    stop = threading.Event()

    def poll() -> None:  # what `fpstune study status` and the dashboard do, as fast as it can
        nonlocal reads
        while not stop.is_set():
            try:
                optuna.load_study(study_name=STUDY, storage=reader).get_trials(deepcopy=False)
                reads += 1
            except KeyError:
                pass  # not created yet
            except Exception as e:
                read_errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    outputs = [r.communicate(timeout=300) for r in runs]
    results = [(r.returncode, *o) for r, o in zip(runs, outputs, strict=True)]
    stop.set()
    poller.join(timeout=5)

    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    [(_, _, refused)] = [r for r in results if r[0] == 2]
    [(_, _, ran)] = [r for r in results if r[0] == 0]
    [line] = refused.strip().splitlines()
    assert "another fpstune controller" in line and "use PostgreSQL" in line, line
    assert "locked" not in ran and not read_errors, (ran, read_errors[:3])
    assert reads > 10
    check_nothing_lost(books(url, STUDY), budget=24)
    assert not (tmp_path / "study.db-controller.lock").exists()


def test_the_lock_dies_with_its_controller(tmp_path: Path) -> None:
    """kill -9 of a controller frees the file at once (the kernel drops its flock)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code = (
        "import sys, time; from fpstune.storage import controller_lock\n"
        f"with controller_lock({url!r}):\n    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    busy = rf"pid {holder.pid}\) is running on this SQLite file"
    with pytest.raises(StorageBusy, match=busy), controller_lock(url):
        pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with controller_lock(url):  # taken over, though the dead one's lock file is still there
        pass
    with controller_lock("postgresql+psycopg://u:p@127.0.0.1/db"):  # servers: no lock at all
        pass


# -- the storage layer's rules ------------------------------------------------------------------


def _error(fn: object) -> BaseException:
    try:
        fn()  # type: ignore[operator]
    except Exception as e:
        return e
    raise AssertionError("no error")


def test_transient_and_permanent_failures_are_told_apart(
    private_pg: PrivateServer, tmp_path: Path
) -> None:
    refused = private_pg.url.replace(str(private_pg.port), str(private_pg.port + 1))
    wrong_pw = private_pg.url.replace(private_pg.PASSWORD, "not-the-password")
    no_db = private_pg.url.rsplit("/", 1)[0] + "/nosuchdb"
    assert is_transient(_error(lambda: sa.create_engine(refused).connect()))
    assert not is_transient(_error(lambda: sa.create_engine(wrong_pw).connect()))
    assert not is_transient(_error(lambda: sa.create_engine(no_db).connect()))
    # SQLite busy: another connection holds the write lock.
    db = tmp_path / "busy.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    busy = sa.create_engine(f"sqlite:///{db}", connect_args={"timeout": 0})
    locked = _error(lambda: busy.connect().execute(sa.text("SELECT * FROM t")).all())
    assert "locked" in str(locked) and is_transient(locked)
    holder.execute("ROLLBACK")
    missing_dir = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}"
    assert not is_transient(_error(lambda: sa.create_engine(missing_dir).connect()))
    # Permanent: refused at once; transient: retried for the window, then given up.
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match="password authentication failed") as e:
        retry_db(lambda: sa.create_engine(wrong_pw).connect(), url=wrong_pw, window_s=30)
    assert time.monotonic() - start < 5 and not e.value.gave_up
    with pytest.raises(StorageUnavailable, match="still failing after 1 s") as e:
        retry_db(lambda: sa.create_engine(refused).connect(), url=refused, window_s=1)
    assert e.value.gave_up


def test_storage_calls_ride_out_a_restart(private_pg: PrivateServer) -> None:
    """A write issued while the server is down waits for it and lands once; so does a read."""
    storage = open_storage(private_pg.url)
    assert isinstance(storage, RetryingRDBStorage)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    private_pg.stop()
    threading.Timer(2.0, private_pg.start).start()
    start = time.monotonic()
    study.tell(trial, 1.0)
    assert time.monotonic() - start >= 1.5  # it did wait for the server
    [done] = optuna.load_study(study_name="s", storage=private_pg.url).get_trials()
    assert done.state == TrialState.COMPLETE and done.values == [1.0]


def test_a_commit_that_landed_before_its_connection_dropped_is_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one ambiguous failure: the COMMIT reached the database, its reply did not. The retry
    finds the trial already finished as asked and accepts it, instead of failing the tell."""
    storage = open_storage(f"sqlite:///{tmp_path / 'a.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    real = optuna.storages.RDBStorage.set_trial_state_values
    calls = 0

    def commit_then_drop(self: object, *args: object, **kwargs: object) -> bool:
        nonlocal calls
        calls += 1
        result = real(self, *args, **kwargs)  # type: ignore[arg-type]
        if calls == 1:  # the reply is lost: what a dropped connection looks like to us
            raise sa.exc.OperationalError(
                "COMMIT", {}, Exception("server closed the connection unexpectedly")
            )
        return result

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", commit_then_drop)
    study.tell(trial, 2.0)
    assert calls == 2
    [done] = study.get_trials()
    assert done.state == TrialState.COMPLETE and done.values == [2.0]


def test_a_database_folder_nobody_may_write_is_one_line(tmp_path: Path) -> None:
    """The controller lock cannot be written beside the database (a read-only filesystem):
    one line naming the lock file, exit 2, no traceback. ``/sys`` refuses new files to root
    too, so this runs as root (CI containers) and as a user alike."""
    folder = Path("/sys")
    probe = folder / "fpstune-probe"
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError:
        pass
    else:
        probe.unlink()
        pytest.skip(f"{folder} is writable here")
    url = f"sqlite:///{folder / 'fpstune-test.db'}"
    args = ["study", "run", str(CHEAP), "--stage", "kernel", "--storage", url, "--no-progress"]
    proc = start_fpstune(*args, cwd=tmp_path)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    [line] = err.strip().splitlines()
    assert "fpstune-test.db-controller.lock" in line and "Traceback" not in err, line


def test_a_database_deleted_mid_run_is_one_line_naming_it(tmp_path: Path) -> None:
    """The SQLite file removed under a running controller: one line naming the file and what
    happened to it, exit 1, no traceback."""
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    fill_latency_table(url, load_study(CHEAP))
    args = ["study", "run", str(CHEAP), "--storage", url, "--trials", "400", "--no-progress"]
    proc = start_fpstune(*args, cwd=tmp_path)
    deadline = time.monotonic() + 180
    while _complete_in_file(db) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no trial completed"
        time.sleep(0.1)
    db.unlink()
    _out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    [line] = err.strip().splitlines()
    assert f"storage {url}: attempt to write a readonly database" in line, line
    assert "deleted, moved or made read-only" in line and "Traceback" not in err


def _complete_in_file(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            (n,) = c.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()
    except sqlite3.Error:
        return 0
    return int(n)


def test_status_says_what_waiting_trials_are() -> None:
    """Trials an interrupted run re-queued and no run picked up (the budget was met) are kept;
    ``study status`` explains them instead of leaving a bare count."""
    from fpstune.catalog import _waiting_note

    assert _waiting_note(0) == {}
    assert "2 trial(s) re-queued by an interrupted run" in _waiting_note(2)["waiting_note"]
