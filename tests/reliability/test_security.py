"""Security rules, checked on the source and on what the CLI prints and writes.

- YAML is read with safe loaders only; no pickle, ``torch.load`` or other object loaders of
  files a user hands in (calibration and weights are safetensors);
- servers bind to loopback unless told otherwise;
- a storage password never appears in output, errors, logs, reports or exported policies.
"""

from __future__ import annotations

import ast
import importlib
import logging
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from reliability_helpers import (
    CHEAP,
    ROOT,
    PrivateServer,
    fill_latency_table,
    fpstune,
    run_main,
    start_fpstune,
)

from fpstune.spec.study import load_study

# What a user runs: the tuner, the runtime, the dashboard and the benchmarks.
SOURCE_DIRS = ("fpstune", "kernels", "dashboard", "benchmarks")
PACKAGES = {"fpstune": "fpstune", "kernels": "fpstune.kernels", "dashboard": "fpstune.dashboard"}

# Modules and calls that turn file contents into Python objects (or run them).
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "shelve",
    "marshal",
    "joblib",
}
UNSAFE_CALLS = {"torch.load", "yaml.unsafe_load", "yaml.full_load", "yaml.full_load_all"}
UNSAFE_LOADERS = {"Loader", "UnsafeLoader", "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader"}
ANY_ADDRESS = {"0.0.0.0", "::", "[::]"}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    what: str


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def scan(tree: ast.AST, file: str, module: str | None = None) -> list[Finding]:
    """Unsafe loaders and any-address binds in one parsed file. A ``yaml.load`` is accepted
    only with a ``Loader`` that is (a subclass of) ``yaml.SafeLoader``, resolved by importing
    ``module`` when the loader is defined there."""
    found: list[Finding] = []

    def add(node: ast.AST, what: str) -> None:
        found.append(Finding(file, getattr(node, "lineno", 0), what))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            for name in [mod, *names] if mod else names:
                if name and name.split(".")[0] in UNSAFE_MODULES:
                    add(node, f"imports {name}")
            if mod == "torch" and "load" in names:
                add(node, "imports torch.load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in UNSAFE_CALLS:
                add(node, f"calls {name}")
            if name in ("np.load", "numpy.load") and any(
                k.arg == "allow_pickle"
                and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                add(node, f"calls {name} with allow_pickle")
            if name in ("yaml.load", "yaml.load_all"):
                loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
                if loader is None and len(node.args) > 1:
                    loader = node.args[1]
                if not _safe_loader(loader, module):
                    add(node, f"calls {name} without a SafeLoader")
        elif isinstance(node, ast.Attribute) and node.attr in UNSAFE_LOADERS:
            if _dotted(node.value) == "yaml":
                add(node, f"uses yaml.{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in ANY_ADDRESS:
            add(node, f"binds {node.value!r} (every interface)")
    return found


def _safe_loader(node: ast.AST | None, module: str | None) -> bool:
    if node is None:
        return False
    name = _dotted(node)
    if name in ("yaml.SafeLoader", "yaml.CSafeLoader"):
        return True
    if module is None or not isinstance(node, ast.Name):
        return False
    obj = getattr(importlib.import_module(module), name, None)
    return isinstance(obj, type) and issubclass(obj, yaml.SafeLoader)


def _module_of(path: Path) -> str | None:
    rel = path.relative_to(ROOT).with_suffix("")
    top, *rest = rel.parts
    if top not in PACKAGES:
        return None
    parts = [p for p in rest if p != "__init__"]
    return ".".join([PACKAGES[top], *parts])


def source_files() -> Iterator[Path]:
    for d in SOURCE_DIRS:
        yield from sorted((ROOT / d).rglob("*.py"))


def test_no_unsafe_loader_or_any_address_bind_in_the_source() -> None:
    findings: list[Finding] = []
    files = list(source_files())
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        findings += scan(tree, str(path.relative_to(ROOT)), _module_of(path))
    assert len(files) > 40  # the scan saw the code base
    assert not findings, "\n".join(f"{f.file}:{f.line}: {f.what}" for f in findings)


def test_the_scan_catches_what_it_looks_for() -> None:
    bad = """
import pickle
from torch import load
import yaml, torch, numpy as np
yaml.load(text, Loader=yaml.Loader)
yaml.load(text)
yaml.full_load(text)
torch.load("weights.pt")
np.load("a.npy", allow_pickle=True)
def serve(host="0.0.0.0"): ...
"""
    whats = {f.what for f in scan(ast.parse(bad), "bad.py")}
    assert whats == {
        "imports pickle",
        "imports torch.load",
        "calls yaml.load without a SafeLoader",
        "uses yaml.Loader",
        "calls yaml.full_load",
        "calls torch.load",
        "calls np.load with allow_pickle",
        "binds '0.0.0.0' (every interface)",
    }
    good = (
        "import yaml\nyaml.load(t, Loader=yaml.SafeLoader)\nyaml.safe_load(t)\nhost = '127.0.0.1'\n"
    )
    assert scan(ast.parse(good), "good.py") == []


def test_the_dashboard_listens_on_loopback_by_default(tmp_path: Path) -> None:
    out = fpstune("dashboard", "--help", cwd=tmp_path, timeout=120)
    assert out.returncode == 0
    assert "127.0.0.1" in out.stdout and "0.0.0.0" not in out.stdout


# -- passwords --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def studied(
    tmp_path_factory: pytest.TempPathFactory, local_ray: None
) -> Iterator[tuple[PrivateServer, str]]:
    """A private PostgreSQL server (password auth) holding a small study, run through the CLI's
    entry point in this process (on the module's Ray); also what that run printed."""
    server = PrivateServer()
    try:
        cwd = tmp_path_factory.mktemp("run")
        fill_latency_table(server.url, load_study(CHEAP))
        with pytest.MonkeyPatch.context() as mp:
            code, out, err = run_main(
                ["study", "run", str(CHEAP), "--storage", server.url, "--trials", "3",
                 "--no-progress"],
                cwd, mp, None,
            )  # fmt: skip
        assert code == 0, err
        yield server, out + err
    finally:
        server.close()


def test_password_never_shown_by_the_run_or_the_read_side(
    studied: tuple[PrivateServer, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The run, then status, list, export and report with every logger at DEBUG: nothing they
    print, log or write holds the password; what names the storage shows it masked."""
    server, run_output = studied
    url, secret = server.url, server.PASSWORD
    assert "3/3 complete" in run_output and secret not in run_output
    caplog.set_level(logging.DEBUG)
    printed = []
    for args in (
        ["study", "status", "cheap", "--storage", url],
        ["study", "status", "cheap", "--storage", url, "--json"],
        ["study", "list", "--storage", url],
        ["export", "cheap", "-o", "policy.yaml", "--storage", url],
        ["report", "cheap", "-o", "report.html", "--storage", url],
    ):
        code, out, err = run_main(args, tmp_path, monkeypatch, capsys)
        assert code == 0, (args, err)
        printed.append(out + err)
    everything = "\n".join(printed) + caplog.text
    written = (tmp_path / "policy.yaml").read_text() + (tmp_path / "report.html").read_text()
    assert secret not in everything and secret not in written
    assert "fpstune:***@127.0.0.1" in printed[1]  # status names the storage, masked
    assert "fpstune:***@127.0.0.1" in (tmp_path / "policy.yaml").read_text()  # provenance


@pytest.mark.parametrize(
    ("case", "code"),
    [("wrong-password", 2), ("no-such-database", 2), ("server-down", 1)],
)
def test_password_never_shown_in_storage_errors(
    case: str,
    code: int,
    private_pg: PrivateServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """run, status, list and export against a database that refuses us: one line, exit 2 for
    what the user must fix (password, name), exit 1 for a server that stays down; the password
    masked everywhere, also in the retry warnings."""
    secret = "s3cret-in-url"
    base = private_pg.url.replace(private_pg.PASSWORD, secret)
    url = {
        "wrong-password": base,
        "no-such-database": base.rsplit("/", 1)[0] + "/nosuchdb",
        "server-down": base.replace(f":{private_pg.port}/", f":{private_pg.port + 1}/"),
    }[case]
    monkeypatch.setenv("FPSTUNE_DB_RETRY_S", "1")
    caplog.set_level(logging.DEBUG)
    (tmp_path / "study.yaml").write_text(CHEAP.read_text().replace("../../", str(ROOT) + "/tests/"))
    for args in (
        ["study", "run", "study.yaml", "--storage", url, "--no-progress"],
        ["study", "status", "cheap", "--storage", url],
        ["study", "list", "--storage", url],
        ["export", "cheap", "-o", "p.yaml", "--storage", url],
    ):
        got, out, err = run_main(args, tmp_path, monkeypatch, capsys)
        assert got == code, (args, err)
        [line] = err.strip().splitlines()
        assert secret not in out + err + caplog.text, args
        assert "fpstune:***@127.0.0.1" in line, line
    assert not (tmp_path / "p.yaml").exists()


def test_one_masker_for_every_url_form() -> None:
    """Userinfo passwords, libpq's ``?password=``/``?sslpassword=`` and a driver's message that
    embeds the DSN (``password=...``) are all masked; a passfile path is no secret."""
    from fpstune.storage import mask_url, scrub

    secret = "s3cret-in-url"
    for url in (
        f"postgresql+psycopg://fpstune:{secret}@127.0.0.1/db",
        f"postgresql+psycopg://fpstune@127.0.0.1/db?password={secret}&sslmode=disable",
        f"postgresql+psycopg://fpstune@127.0.0.1/db?sslpassword={secret}",
    ):
        assert secret not in mask_url(url) and "***" in mask_url(url), url
        assert secret not in scrub(f"connection to {url} failed", url), url
    message = f"connection failed: host=127.0.0.1 user=fpstune password='{secret}' dbname=db"
    assert secret not in scrub(message)
    kept = "postgresql+psycopg://fpstune@127.0.0.1/db?passfile=/home/u/.pgpass"
    assert "pgpass" in mask_url(kept) and "***" not in mask_url(kept)


def test_password_in_the_query_never_shown_in_storage_errors(
    private_pg: PrivateServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong password written the libpq way (``?password=``): one masked line, exit 2."""
    secret = "s3cret-in-query"
    url = private_pg.url.replace(f":{private_pg.PASSWORD}@", "@") + f"?password={secret}"
    monkeypatch.setenv("FPSTUNE_DB_RETRY_S", "1")
    caplog.set_level(logging.DEBUG)
    (tmp_path / "study.yaml").write_text(CHEAP.read_text().replace("../../", str(ROOT) + "/tests/"))
    for args in (
        ["study", "run", "study.yaml", "--storage", url, "--no-progress"],
        ["study", "status", "cheap", "--storage", url, "--json"],
    ):
        got, out, err = run_main(args, tmp_path, monkeypatch, capsys)
        assert got == 2, (args, err)
        [line] = err.strip().splitlines()
        assert secret not in out + err + caplog.text, args
        assert "password=***" in line, line


def test_password_from_the_environment_keeps_it_off_the_command_line(
    private_pg: PrivateServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``FPSTUNE_STORAGE`` stands for ``--storage``; libpq's ``PGPASSWORD`` (or ``PGPASSFILE``)
    supplies the password of a URL that has none."""
    bare = private_pg.url.replace(f":{private_pg.PASSWORD}@", "@")
    monkeypatch.setenv("FPSTUNE_STORAGE", bare)
    monkeypatch.setenv("PGPASSWORD", private_pg.PASSWORD)
    code, _out, err = run_main(["study", "list", "--json"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "nonexistent"))
    code, _out, err = run_main(["study", "list", "--json"], tmp_path, monkeypatch, capsys)
    assert code == 2, err  # no password anywhere: refused, one line


# -- sockets ----------------------------------------------------------------------------------


def _listening(root: int) -> dict[str, set[str]]:
    """The addresses each process of ``root``'s tree listens on (TCP, any family)."""
    import psutil

    found: dict[str, set[str]] = {}
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return found
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.setdefault(name, set()).add(c.laddr.ip)
        except psutil.Error:
            continue
    return found


def test_the_local_ray_cluster_listens_on_loopback_only(tmp_path: Path) -> None:
    """While ``study run`` runs its local cluster, every listening socket of its process tree
    (driver, GCS, raylet, workers, Ray's agents) is on 127.0.0.1."""
    pytest.importorskip("psutil")
    import time

    url = f"sqlite:///{tmp_path / 'study.db'}"
    fill_latency_table(url, load_study(CHEAP))
    proc = fpstune_bg(tmp_path, "study", "run", str(CHEAP), "--storage", url, "--trials", "20")
    seen: dict[str, set[str]] = {}
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        for name, addrs in _listening(proc.pid).items():
            seen.setdefault(name, set()).update(addrs)
        time.sleep(0.2)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert {"gcs_server", "raylet"} <= set(seen), seen  # the cluster was sampled while up
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    assert all(addrs <= loopback for addrs in seen.values()), seen


def fpstune_bg(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return start_fpstune(*args, "--no-progress", cwd=cwd)
