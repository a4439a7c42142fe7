"""Study storage: Optuna's RDB storage through SQLAlchemy, SQLite by default, any SQLAlchemy URL.

Only the controller writes trials (workers return results to it over Ray), so an SQLite file is
safe with any number of workers. PostgreSQL (``postgresql+psycopg://...``) is for studies shared by
several controllers or machines. Connections are pre-pinged and retried, so a database restart
between two writes costs a reconnect, not a result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy.exc
from sqlalchemy.engine import make_url

DEFAULT_STORAGE = "sqlite:///fpstune.db"
log = logging.getLogger(__name__)
T = TypeVar("T")


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***; safe for logs, errors, reports and dashboards."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "<unparseable storage URL>"


def check_url(url: str) -> str:
    """Validate a storage URL; raises ValueError naming the (masked) URL."""
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ValueError(f"--storage: not an SQLAlchemy URL: {mask_url(url)}") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "mysql"):
        raise ValueError(f"--storage: unsupported database {parsed.get_backend_name()!r}")
    return url


def open_storage(
    url: str = DEFAULT_STORAGE, *, heartbeat_s: int | None = None, max_retry: int = 2
) -> optuna.storages.RDBStorage:
    """Open (creating if needed) the storage. With ``heartbeat_s``, a RUNNING trial whose
    heartbeat is older than 4 beats is failed and re-queued (at most ``max_retry`` times)."""
    check_url(url)
    heartbeat: dict[str, Any] = {}
    if heartbeat_s is not None:
        heartbeat = {
            "heartbeat_interval": heartbeat_s,
            "grace_period": 4 * heartbeat_s,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=max_retry
            ),
        }
    engine_kwargs: dict[str, object] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # One writer (the controller); readers such as the dashboard wait instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 60}
    return retry_db(
        lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    )


def open_existing_storage(url: str) -> optuna.storages.RDBStorage:
    """For read-side commands: never creates an SQLite file that is not there."""
    check_url(url)
    parsed = make_url(url)
    db = parsed.database
    in_file = parsed.get_backend_name() == "sqlite" and db not in (None, "", ":memory:")
    if in_file and not Path(str(db)).is_file():
        raise FileNotFoundError(f"--storage: no study database at {parsed.database}")
    return open_storage(url)


def retry_db(fn: Callable[[], T], *, attempts: int = 30, delay_s: float = 1.0) -> T:
    """Run ``fn``, retrying while the database is unreachable (restart, fail-over)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            optuna.exceptions.StorageInternalError,
        ) as e:
            if attempt == attempts:
                raise
            log.warning(
                "database unreachable (%s); retry %d/%d", type(e).__name__, attempt, attempts
            )
            time.sleep(delay_s)
    raise AssertionError("unreachable")
