"""`fpstune dashboard`: optuna-dashboard (the maintained package) on the study storage.

The dashboard reads what the controller writes: metric names (its Pareto plot's objective
selectors; that plot has no axis titles), the ``constraints`` system attribute (feasibility), user
attributes (``baseline``, latency source). Before serving, and then every ``annotate_every_s``
while it serves, missing per-trial notes and artifacts and fpstune's front (axis titles with the
metric names and units, baselines, knees) are attached (`annotate.annotate_storage`), so a running
study's new trials get theirs too.

Served by wsgiref's threaded server on loopback by default: optuna-dashboard has no
authentication, and anyone who reaches the port can read and edit the studies.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.artifacts import FileSystemArtifactStore
from sqlalchemy.engine import make_url

from fpstune.errors import BadInput
from fpstune.storage import mask_url, open_existing_storage

from .annotate import AnnotateResult, annotate_storage

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_artifact_dir(storage_url: str) -> Path | None:
    """Beside an SQLite file, its name without the suffix + ``-artifacts``: ``fpstune-artifacts``
    for ``fpstune.db``. None for a server database (pass a folder)."""
    url = make_url(storage_url)
    db = url.database
    if url.get_backend_name() != "sqlite" or not db or db == ":memory:":
        return None
    path = Path(db)
    return path.with_name(f"{path.stem}-artifacts")


def open_artifacts(storage_url: str, folder: Path | None) -> FileSystemArtifactStore | None:
    folder = folder or default_artifact_dir(storage_url)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--artifacts: cannot use {folder}: {e.strerror}") from None
    return FileSystemArtifactStore(str(folder))


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # the browser keeps connections open; Ctrl-C must not wait on them


class _Server6(_Server):
    address_family = socket.AF_INET6


def _not_ready(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"annotating trials; the dashboard starts in a moment"]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def serve(
    storage_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifacts: Path | None = None,
    annotate_every_s: float = 30.0,
    echo: Callable[[str], None] = print,
) -> None:
    """Annotate, then serve optuna-dashboard until interrupted. ``port=0`` picks a free port;
    the line ``optuna-dashboard: http://HOST:PORT/ ...`` says which. Bad input (no database,
    a port in use) is refused before anything is written."""
    from optuna_dashboard import wsgi

    storage = _open(storage_url)
    server_class = _Server6 if ":" in host else _Server
    try:
        httpd = make_server(host, port, _not_ready, server_class, _QuietHandler)
    except OSError as e:
        raise BadInput(
            f"--host/--port: cannot listen on {host}:{port}: {e.strerror or e}"
        ) from None
    store = open_artifacts(storage_url, artifacts)
    label = mask_url(storage_url)
    result = annotate_storage(storage, artifact_store=store, storage_label=label)
    echo(_annotated(result, store, artifacts or default_artifact_dir(storage_url)))
    httpd.set_app(wsgi(storage, artifact_store=store))
    if host not in LOOPBACK:
        log.warning(
            "optuna-dashboard has no authentication: anyone who reaches %s:%d can read and edit "
            "these studies",
            host,
            port,
        )
    url_host = f"[{host}]" if ":" in host else host
    echo(f"optuna-dashboard: http://{url_host}:{httpd.server_port}/ on {label} (Ctrl-C to stop)")
    stop = threading.Event()
    if annotate_every_s > 0:
        threading.Thread(
            target=_keep_annotating,
            args=(storage_url, store, label, annotate_every_s, stop),
            daemon=True,
            name="fpstune-annotate",
        ).start()
    try:
        httpd.serve_forever()
    finally:
        stop.set()
        httpd.server_close()


def _keep_annotating(
    storage_url: str,
    store: FileSystemArtifactStore | None,
    label: str,
    every_s: float,
    stop: threading.Event,
) -> None:
    storage = _open(storage_url)  # its own connection pool, apart from the dashboard's
    while not stop.wait(every_s):
        try:
            annotate_storage(storage, artifact_store=store, storage_label=label)
        except Exception as e:  # a busy or restarting database: try again next round
            log.warning("annotating trials failed (%s: %s); retrying later", type(e).__name__, e)


def _open(storage_url: str) -> optuna.storages.RDBStorage:
    try:
        return open_existing_storage(storage_url)
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(str(e)) from None


def _annotated(r: AnnotateResult, store: object, folder: Path | None) -> str:
    where = f"artifacts in {folder}" if store is not None else "no artifact store (--artifacts DIR)"
    return (
        f"annotated {r.trials} trials in {r.studies} schedule studies: {r.notes} notes, "
        f"{r.artifacts} artifacts ({where})"
    )
