"""Study storage: Optuna's RDB storage through SQLAlchemy, SQLite by default, any SQLAlchemy URL.

Only the controller writes trials (workers return results to it over Ray), so an SQLite file is
safe with any number of workers; a second *controller* on the same SQLite file is refused
(`controller_lock`): several controllers, or machines, share a study through PostgreSQL
(``postgresql+psycopg://...``).

Faults of the database are handled here, once, for every caller:

- connections are pre-pinged, so one a database restart killed is replaced, not used;
- every storage call (`RetryingRDBStorage`, `retry_db`) is retried while the failure is transient
  (connection refused or dropped, server starting or shutting down, SQLite busy), for up to
  ``FPSTUNE_DB_RETRY_S`` seconds (default 60); a write whose commit did land before the
  connection dropped is recognised on the retry instead of failing;
- a permanent failure (wrong password, no such database or host) is not retried: `open_storage`
  raises `BadInput` (exit status 2) and anything later `StorageUnavailable` (exit status 1),
  each one line with the password masked.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import fcntl
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy.exc
from optuna.storages._rdb import models  # the heartbeat table (no public API)
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from fpstune import trial_attrs
from fpstune.errors import BadInput

DEFAULT_STORAGE = "sqlite:///fpstune.db"
#: Seconds a storage call keeps retrying a transient database failure before giving up.
RETRY_WINDOW_S = 60.0
log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageUnavailable(RuntimeError):
    """The database failed and retrying did not help (or cannot). One line, password masked.
    ``reason``: the database's own words; ``gave_up``: True when the failure was transient but
    outlasted the retry window (a server down), False when it cannot pass (a wrong password)."""

    def __init__(self, where: str, reason: str, *, gave_up: bool) -> None:
        self.where, self.reason, self.gave_up = where, reason, gave_up
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unavailable, (self.where, self.reason, self.gave_up))

    def naming(self, url: str) -> str:
        """The line, naming the storage (masked) where the raiser did not know it."""
        where = f"storage {mask_url(url)}" if self.where == "storage" else self.where
        return f"{where}: {self.reason}"


def _unavailable(where: str, reason: str, gave_up: bool) -> StorageUnavailable:
    return StorageUnavailable(where, reason, gave_up=gave_up)


class StorageBusy(BadInput):
    """Another controller holds this SQLite file."""


# Query or DSN keys whose value is a secret (libpq's ``password``/``sslpassword``; the
# ``passfile`` path is not a secret and stays readable).
_SECRET_PARAM = re.compile(r"(?i)(\b(?:ssl)?password\s*=\s*)('[^']*'|[^&\s'\"]*)")
_USERINFO = re.compile(r"([A-Za-z][\w+.-]*://[^/@:\s]*:)[^@\s]*@")


def mask_url(url: str) -> str:
    """The URL with every password (``user:pw@`` and ``?password=``) replaced by ***; safe for
    logs, errors, reports and dashboards. The one masker: everything that prints or stores a
    storage URL goes through it or through `scrub`."""
    try:
        rendered = make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "<unparseable storage URL>"
    return scrub(rendered)


def scrub(text: str, url: str | None = None) -> str:
    """``text`` (e.g. a driver's error message, which may embed the DSN) with the password of
    ``url``, any ``scheme://user:pass@`` and any ``password=...`` in it masked."""
    if url:
        with contextlib.suppress(sqlalchemy.exc.ArgumentError):
            parsed = make_url(url)
            secrets = [parsed.password, *(parsed.query.get(k) for k in ("password", "sslpassword"))]
            for secret in secrets:
                for value in [secret] if isinstance(secret, str) else list(secret or ()):
                    if value:
                        text = text.replace(str(value), "***")
    text = _USERINFO.sub(r"\1***@", text)
    return _SECRET_PARAM.sub(r"\1***", text)


def check_url(url: str) -> str:
    """Validate a storage URL; raises ValueError naming the (masked) URL."""
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ValueError(f"--storage: not an SQLAlchemy URL: {mask_url(url)}") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "mysql"):
        raise ValueError(f"--storage: unsupported database {parsed.get_backend_name()!r}")
    return url


# -- telling transient database failures from permanent ones --------------------------------------

# Connection failures that retrying cannot cure (PostgreSQL, MySQL and SQLite wordings).
_PERMANENT = (
    "password authentication failed",
    "authentication failed",
    "no password supplied",
    "access denied",
    "does not exist",
    "unknown database",
    "failed to resolve host",
    "could not translate host name",
    "name or service not known",
    "unable to open database file",
    "file is not a database",
    "no such table",
    "readonly database",
)


def _db_cause(e: BaseException) -> sqlalchemy.exc.DBAPIError | None:
    """The DB-API error behind ``e`` (Optuna wraps commit failures in StorageInternalError)."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, sqlalchemy.exc.DBAPIError):
            return e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
        seen += 1
    return None


def is_connection_failure(e: BaseException) -> bool:
    """Whether ``e`` is the database (or the way to it) failing, not the statement."""
    cause = _db_cause(e)
    return isinstance(cause, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError) or (
        cause is not None and cause.connection_invalidated
    )


def is_transient(e: BaseException) -> bool:
    """A connection failure that may pass: refused, dropped, server restarting, SQLite busy."""
    if not is_connection_failure(e):
        return False
    text = _reason(e).lower()
    return not any(p in text for p in _PERMANENT)


def _reason(e: BaseException, url: str | None = None) -> str:
    cause = _db_cause(e)
    inner = getattr(cause, "orig", None) or cause or e
    lines = str(inner).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else type(inner).__name__
    if "readonly database" in text:
        text += " (the database file was deleted, moved or made read-only while in use)"
    return scrub(text, url)


def db_error_line(e: BaseException, url: str | None = None) -> str | None:
    """One masked line for a database error that reached the CLI outside `retry_db` (e.g. from
    a table opened with its own engine), naming the storage ``url`` if known; None if ``e`` is
    not a database error."""
    if _db_cause(e) is None and not isinstance(e, optuna.exceptions.StorageInternalError):
        return None
    with contextlib.suppress(sqlalchemy.exc.ArgumentError):
        if url:
            return f"storage {mask_url(url)}: {_reason(e, url)}"
    return f"storage: {_reason(e)}"


def retry_db(fn: Callable[[], T], *, url: str | None = None, window_s: float | None = None) -> T:
    """Run ``fn``, retrying transient database failures for up to ``window_s`` seconds
    (``FPSTUNE_DB_RETRY_S``, default 60). A connection failure that outlasts the window, or a
    permanent one, becomes `StorageUnavailable`; any other error propagates unchanged.

    Retry the smallest step that can be repeated safely: `RetryingRDBStorage` retries each
    storage call by itself, so a caller's ``retry_db`` around a composite (``study.tell``,
    ``study.ask``) only ever sees `StorageUnavailable` from them, never a raw error that would
    make it repeat a step that already landed (a second tell, a second trial)."""
    window = _window() if window_s is None else window_s
    start = time.monotonic()
    delay, warned = 0.25, False
    while True:
        try:
            result = fn()
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            if not is_connection_failure(e):
                raise
            elapsed = time.monotonic() - start
            where = f"storage {mask_url(url)}" if url else "storage"
            if not is_transient(e):
                raise StorageUnavailable(where, _reason(e, url), gave_up=False) from None
            if elapsed >= window:
                reason = f"{_reason(e, url)} (still failing after {elapsed:.0f} s)"
                raise StorageUnavailable(where, reason, gave_up=True) from None
            if not warned:
                log.warning("%s: %s; retrying for up to %.0f s", where, _reason(e, url), window)
                warned = True
            time.sleep(min(delay, max(0.0, window - elapsed)))
            delay = min(2 * delay, 2.0)
            continue
        if warned:
            log.warning("storage reachable again after %.1f s", time.monotonic() - start)
        return result


def _window() -> float:
    try:
        return float(os.environ.get("FPSTUNE_DB_RETRY_S", RETRY_WINDOW_S))
    except ValueError:
        return RETRY_WINDOW_S


# -- the storage ----------------------------------------------------------------------------------


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose every database call goes through `retry_db`, so a database
    restart or a dropped connection between (or during) two calls costs a reconnect, not a
    result. Thread safety and errors are RDBStorage's, plus `StorageUnavailable`."""

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        attempt = 0

        def once() -> bool:
            nonlocal attempt
            attempt += 1
            try:
                return optuna.storages.RDBStorage.set_trial_state_values(
                    self, trial_id, state, values
                )
            except optuna.exceptions.UpdateFinishedTrialError:
                # A retry after a dropped connection: did our first commit land after all?
                if attempt > 1 and self._landed(trial_id, state, values):
                    return True
                raise

        return retry_db(once, url=self.url)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return retry_db(lambda: self._stale_trial_ids(study_id), url=self.url)

    def _stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials (heartbeat older than the grace period) and, beyond Optuna,
        RUNNING trials with no heartbeat at all that started longer than the grace period ago:
        every controller beats right after ``ask``, so such a trial's controller died, or lost
        its connection, between the two (or a ``create_new_trial`` whose reply was lost landed
        after all). Optuna never finds those stale, so they would stay RUNNING for ever. Each
        gets its ``fail_reason`` before `optuna.storages.fail_stale_trials` fails it."""
        base = optuna.storages.RDBStorage
        stale = set(base._get_stale_trial_ids(self, study_id))
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
        running = base.get_all_trials(self, study_id, deepcopy=False, states=(TrialState.RUNNING,))
        old = {t._trial_id for t in running if t.datetime_start and t.datetime_start < cutoff}
        orphans: set[int] = set()
        if old - stale:
            beats = models.TrialHeartbeatModel.__table__
            with self.engine.connect() as c:
                query = sqlalchemy.select(beats.c.trial_id).where(beats.c.trial_id.in_(old))
                orphans = old - stale - set(c.execute(query).scalars())
        for ids, why in (
            (stale, f"heartbeat stale for over {grace} s"),
            (orphans, f"RUNNING with no heartbeat for over {grace} s"),
        ):
            for trial_id in ids:
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    base.set_trial_user_attr(
                        self,
                        trial_id,
                        trial_attrs.FAIL_REASON,
                        f"{why}: its controller died or lost the database",
                    )
        return sorted(stale | orphans)

    def _landed(self, trial_id: int, state: TrialState, values: Sequence[float] | None) -> bool:
        trial = optuna.storages.RDBStorage.get_trial(self, trial_id)
        return trial.state == state and (values is None or list(trial.values or []) == list(values))


# Every RDBStorage method that talks to the database (those defined above retry themselves).
_DB_METHODS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "get_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id",
    "get_trial_params",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_trial",
    "get_all_trials",
    "get_n_trials",
    "get_best_trial",
    "record_heartbeat",
)


def _retried(name: str) -> Callable[..., Any]:
    base = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(base)
    def method(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return retry_db(lambda: base(self, *args, **kwargs), url=self.url)

    return method


for _name in _DB_METHODS:
    setattr(RetryingRDBStorage, _name, _retried(_name))


class _RequeueStale(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's re-queue of a stale trial (same parameters, retry bookkeeping), without
    carrying the dead trial's ``fail_reason`` into its re-run."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {
            k: v for k, v in trial.user_attrs.items() if k != trial_attrs.FAIL_REASON
        }
        super().__call__(study, trial)


def open_storage(
    url: str = DEFAULT_STORAGE, *, heartbeat_s: int | None = None, max_retry: int = 2
) -> RetryingRDBStorage:
    """Open (creating if needed) the storage. With ``heartbeat_s``, a RUNNING trial whose
    heartbeat is older than 4 beats is failed and re-queued (at most ``max_retry`` times).
    A database that refuses us for good (password, name, host) is `BadInput` naming --storage."""
    check_url(url)
    heartbeat: dict[str, Any] = {}
    if heartbeat_s is not None:
        heartbeat = {
            "heartbeat_interval": heartbeat_s,
            "grace_period": 4 * heartbeat_s,
            "heartbeat_stale_trial_callback": _RequeueStale(max_retry=max_retry),
        }
    engine_kwargs: dict[str, object] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # One writer (the controller); readers such as the dashboard wait instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 60}
    try:
        return retry_db(
            lambda: RetryingRDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat), url=url
        )
    except StorageUnavailable as e:
        if e.gave_up:  # a server down for the whole window: a failure, not the user's input
            raise
        raise BadInput(f"--storage {mask_url(url)}: {e.reason}") from None


def requeue_interrupted(storage: optuna.storages.RDBStorage, trial_id: int) -> bool:
    """Put an unfinished trial back to WAITING as it is (parameters, attributes, retry history):
    the way to stop a trial that is not at fault (its controller was interrupted) without a FAIL
    in the study. False if the trial had finished meanwhile.

    Optuna's public storage API allows it: `BaseStorage.set_trial_state_values` refuses only a
    finished trial; ``Study.ask`` takes WAITING trials first, and a trial's ``suggest_*`` returns
    the value it already holds, so the re-run has the same parameters. The trial's heartbeat is
    removed too: else another controller could find the trial stale between its next ``ask`` and
    first beat."""
    try:
        storage.set_trial_state_values(trial_id, TrialState.WAITING)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    beats = models.TrialHeartbeatModel.__table__

    def forget_beat() -> None:
        with storage.engine.begin() as c:
            c.execute(sqlalchemy.delete(beats).where(beats.c.trial_id == trial_id))

    retry_db(forget_beat, url=storage.url)
    return True


def check_reachable(url: str) -> None:
    """Fail early, writing nothing, if the storage cannot be used: a server database is
    connected to once (`BadInput` for a wrong password, database or host; `StorageUnavailable`
    if it stays down), an SQLite file's folder must exist (the file itself is not created)."""
    check_url(url)
    db = sqlite_path(url)
    if db is not None:
        if not db.parent.is_dir():
            raise BadInput(f"--storage {mask_url(url)}: no such folder {db.parent}")
        return
    engine = sqlalchemy.create_engine(url, pool_pre_ping=True)
    try:
        retry_db(lambda: engine.connect().close(), url=url)
    except StorageUnavailable as e:
        if e.gave_up:
            raise
        raise BadInput(f"--storage {mask_url(url)}: {e.reason}") from None
    finally:
        engine.dispose()


def open_existing_storage(url: str) -> RetryingRDBStorage:
    """For read-side commands: never creates an SQLite file that is not there."""
    check_url(url)
    parsed = make_url(url)
    db = parsed.database
    in_file = parsed.get_backend_name() == "sqlite" and db not in (None, "", ":memory:")
    if in_file and not Path(str(db)).is_file():
        raise FileNotFoundError(f"--storage: no study database at {parsed.database}")
    return open_storage(url)


# -- one controller per SQLite file -----------------------------------------------------------


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL; None for a server database or an in-memory one."""
    parsed = make_url(url)
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or db in (None, "", ":memory:"):
        return None
    return Path(str(db))


def remove_sqlite_file(db: Path) -> None:
    """Remove an SQLite file and the journal or WAL files SQLite keeps beside it."""
    for path in (db, *(db.with_name(db.name + end) for end in ("-journal", "-wal", "-shm"))):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def controller_lock(url: str) -> Iterator[None]:
    """Hold this SQLite file for one controller while the block runs; `StorageBusy` if another
    controller holds it. A no-op for server databases, which take many controllers.

    SQLite serialises writers with a file lock: two controllers on one file would take turns on
    every write and, under load, fail with "database is locked" mid-study. The lock is an
    advisory ``flock`` on ``<db>-controller.lock`` beside the file (released by the kernel if the
    controller dies, so a killed run never blocks the next one); readers (status, dashboard) and
    the workers do not take it.
    """
    db = sqlite_path(url)
    if db is None:
        yield
        return
    # Keyed by the real file: two controllers reaching one file through a symlink (or `..`)
    # must meet on one lock.
    db = db.resolve()
    lock = db.with_name(db.name + "-controller.lock")
    fd = _acquire(lock, url)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _acquire(lock: Path, url: str) -> int:
    try:
        return _acquire_once(lock, url)
    except OSError as e:  # a read-only filesystem or folder: one line, not a traceback
        raise BadInput(
            f"--storage {mask_url(url)}: cannot write the controller lock {lock} "
            f"({e.strerror or e}); the database's folder must be writable"
        ) from None


def _acquire_once(lock: Path, url: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StorageBusy(
                f"--storage {mask_url(url)}: another fpstune controller (pid {holder}) is running "
                "on this SQLite file, which takes one controller at a time (any number of "
                "workers); wait for it, or use PostgreSQL (--storage postgresql+psycopg://...) "
                "to run several controllers on one study"
            ) from None
        # The holder before us may have unlinked the file after we opened it: then our lock is
        # on a file nobody else will see; start again on the path's current file.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)
