"""`fpstune dashboard` and `fpstune report` as a user meets them: --help, one-line errors with
exit status 2 and nothing written, a report page, loopback, masked credentials."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import shared_helpers
import sqlalchemy as sa
from dashboard_helpers import mini_study

fpstune = partial(shared_helpers.fpstune, timeout=300)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_help_explains_dashboard_and_report(tmp_path: Path) -> None:
    dash = fpstune("dashboard", "--help", cwd=tmp_path)
    assert dash.returncode == 0
    for opt in ("--storage", "--host", "--port", "--artifacts", "--annotate-every", "loopback"):
        assert opt in dash.stdout
    rep = fpstune("report", "--help", cwd=tmp_path).stdout
    for opt in ("study", "--storage", "--output"):
        assert opt in rep


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["report", "mini", "-o", "r.html"], "no study database at fpstune.db"),
        (["report", "mini", "-o", "r.html", "--storage", "nosuchdb://x"], "--storage"),
        (["dashboard", "--port", "0"], "no study database at fpstune.db"),
        (["dashboard", "--storage", "sqlite:///gone/x.db"], "no study database at gone/x.db"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, args: list[str], says: str
) -> None:
    out = fpstune(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], out.stderr
    assert not list(tmp_path.iterdir())  # no database, no page, no artifact folder


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "study.db"
    mini_study(f"sqlite:///{path}", trials=8)
    return path


def test_unknown_study_or_busy_port_write_nothing(study_db: Path, tmp_path: Path) -> None:
    before = _digest(study_db)
    url = f"sqlite:///{study_db}"
    out = fpstune("report", "nosuch", "--storage", url, "-o", "r.html", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: study 'nosuch': not found in {url} (studies: mini:schedule)"
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = fpstune("dashboard", "--storage", url, "--port", str(port), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0]
    assert _digest(study_db) == before  # not even notes were written
    assert not list(tmp_path.iterdir()) and not (study_db.parent / "study-artifacts").exists()


def test_report_writes_one_self_contained_page(study_db: Path, tmp_path: Path) -> None:
    before = _digest(study_db)
    page = tmp_path / "out" / "report.html"
    out = fpstune(
        "report", "mini", "--storage", f"sqlite:///{study_db}", "-o", str(page), cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "10 complete trials" in out.stdout  # 8 searched + 2 baselines (the FAIL one is not)
    html = page.read_text(encoding="utf-8")
    assert "<script src=" not in html  # plotly.js inline: opens offline
    assert html.count('class="plotly-graph-div"') == 5
    for heading in (
        "Pareto front",
        "Hypervolume",
        "Knee-point schedules",
        "Kernel latency table",
        "Hardware",
    ):
        assert f"<h2>{heading}</h2>" in html
    assert "baseline fp8_dense_all" in html and "baseline fpsattention_3phase" in html
    assert _digest(study_db) == before  # the report only reads


def test_dashboard_on_postgresql_binds_loopback_and_never_prints_the_password(
    pg_url: str, tmp_path: Path
) -> None:
    password = sa.engine.make_url(pg_url).password
    assert password
    mini_study(pg_url, trials=2)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fpstune",
            "dashboard",
            "--storage",
            pg_url,
            "--port",
            "0",
            "--annotate-every",
            "0",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    text = "".join(lines) + err
    assert password not in text
    assert "no artifact store" in lines[0]  # a server database has no default folder
    assert lines[1].startswith("optuna-dashboard: http://127.0.0.1:") and ":***@" in lines[1]
