"""The dashboard and the report in a real browser: Debian's chromium driven by Playwright.

`fpstune dashboard` runs as a user starts it; the test opens the study page, waits for the Pareto
plot, counts its plotted points against the COMPLETE trials, reads the axis titles of fpstune's
front beside it, finds no trial's files among the study's artifacts, clicks a point and finds that
trial's schedule image and its files; then it opens the report page and checks its figures
rendered. Screenshots go to ``$FPSTUNE_TEST_OUTPUT`` (default: the test's tmp folder).

By default the study is built by the test (`dashboard_helpers.mini_study`). To shoot the README's
pictures from a real run, point ``FPSTUNE_TEST_DASHBOARD_DB`` at an SQLite file a study run wrote
(it is copied first): see README, "Browse the results".
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import optuna
import pytest
from dashboard_helpers import mini_study
from optuna.trial import TrialState

from fpstune.dashboard.annotate import artifact_name
from fpstune.dashboard.figures import axis_title
from fpstune.dashboard.report import write_report

CHROMIUM = Path(os.environ.get("FPSTUNE_CHROMIUM", "/usr/bin/chromium"))
STUDY = os.environ.get("FPSTUNE_TEST_DASHBOARD_STUDY", "mini")
pytestmark = pytest.mark.slow


def _need(what: str) -> None:
    # .ci/run sets FPSTUNE_CHROMIUM: there a missing browser is a failure, not a skip
    if os.environ.get("CI") or "FPSTUNE_CHROMIUM" in os.environ:
        pytest.fail(f"{what} is missing: .ci/run installs it")
    pytest.skip(f"{what} is missing (bash .ci/run installs it)")


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("FPSTUNE_TEST_OUTPUT") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    db = tmp_path / "study.db"
    given = os.environ.get("FPSTUNE_TEST_DASHBOARD_DB")
    if given:
        shutil.copy(given, db)
        # the notes of an annotated study link files in its artifact folder: bring it along
        folder = Path(given).with_name(f"{Path(given).stem}-artifacts")
        if folder.is_dir():
            shutil.copytree(folder, tmp_path / "study-artifacts")
    else:
        mini_study(f"sqlite:///{db}", trials=14)
    return f"sqlite:///{db}"


@pytest.fixture
def dashboard(storage_url: str, tmp_path: Path) -> Iterator[str]:
    """`fpstune dashboard` on a free port; yields its base URL once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fpstune", "dashboard", "--storage", storage_url, "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def pump() -> None:  # readline would block past any deadline: read in a thread
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the dashboard did not start in 120 s: {seen}")
            seen.append(line)
            if line.startswith("optuna-dashboard: http://127.0.0.1:"):  # loopback by default
                yield line.split()[1]
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_dashboard_and_report_render_the_study(
    dashboard: str, storage_url: str, out_dir: Path, tmp_path: Path
) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("the playwright Python package")
    if not CHROMIUM.exists():
        _need(str(CHROMIUM))
    study = optuna.load_study(study_name=f"{STUDY}:schedule", storage=storage_url)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    infeasible = [t for t in complete if any(v > 0 for v in t.constraints.values())]
    baselines = {str(t.user_attrs["baseline"]) for t in complete if "baseline" in t.user_attrs}
    assert complete and len(study.trials) >= len(complete)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{dashboard}dashboard/studies/{study._study_id}")
        plotted = "#graph-pareto-front path.point"
        page.wait_for_function(
            f"n => document.querySelectorAll({plotted!r}).length >= n",
            arg=len(complete),
            timeout=60_000,
        )
        assert page.locator(plotted).count() == len(complete)
        traces = page.evaluate(
            "() => document.getElementById('graph-pareto-front').data"
            ".map(t => [t.hovertemplate || '', (t.x || []).filter(v => v != null).length])"
        )
        # a trial with no values (the FAIL one) sits in a trace with nothing to draw
        assert sum(n for _, n in traces) == len(complete)
        assert sum(n for h, n in traces if "Infeasible" in h) == len(infeasible)
        # optuna-dashboard names the axes in its objective selectors only, never on the plot
        metric_names = study.metric_names or []
        card = page.locator("div", has=page.locator("#graph-pareto-front")).first.inner_text()
        assert metric_names and all(name in card for name in metric_names)
        assert page.locator("#graph-pareto-front .xtitle, #graph-pareto-front .ytitle").count() == 0
        # the study's artifacts hold no trial's files (those are on the trials' pages)
        page.get_by_role("heading", name="Study Artifacts", exact=True).wait_for()
        assert page.get_by_text(re.compile(r"^trial-\d{4}-")).count() == 0
        page.screenshot(path=str(out_dir / "dashboard.png"))

        # click a point of the front: the trial's page, its note and schedule heatmap
        drawn = [h for h, n in traces if n]  # plotly draws a group per trace with points
        best = next(i for i, h in enumerate(drawn) if "Best Trial" in h)
        point = page.locator(
            f"#graph-pareto-front .scatterlayer .trace:nth-child({best + 1}) path.point"
        )
        box = point.first.bounding_box()
        assert box is not None
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        page.mouse.click(x, y)
        page.wait_for_url("**/trials?numbers=*", timeout=30_000)
        number = int(parse_qs(urlparse(page.url).query)["numbers"][0])
        img = page.locator(f"img[alt='step x layer schedule of trial {number}']")
        img.wait_for(timeout=30_000)
        page.wait_for_function(
            "img => img.complete && img.naturalWidth > 0", arg=img.element_handle()
        )
        # the trial's own files, on its page (optuna-dashboard's "Artifacts" heading there)
        page.get_by_role("heading", name="Artifacts", exact=True).wait_for(timeout=30_000)
        listed = page.get_by_text(re.compile(r"^trial-\d{4}-")).all_text_contents()
        kinds = ("schedule.svg", "latency.csv", "policy.yaml")
        assert sorted(listed) == sorted(artifact_name(number, k) for k in kinds)
        page.screenshot(path=str(out_dir / "dashboard-trial.png"))

        # fpstune's front, among the study's plots: axis titles with names and units, baselines
        page.goto(f"{dashboard}dashboard/studies/{study._study_id}")
        front = page.locator("#user-defined-plot\\:fpstune-front")
        front.locator(".xtitle").wait_for(timeout=30_000)
        names = page.evaluate(
            "() => document.getElementById('user-defined-plot:fpstune-front').data.map(t => t.name)"
        )
        assert {f"baseline {b}" for b in baselines} <= set(names)
        x_title = front.locator(".xtitle").text_content() or ""
        assert x_title.startswith(axis_title(metric_names[0], study.directions[0]))
        assert x_title.startswith("latency_ms (ms; lower is better)")
        y_title = front.locator(".ytitle").text_content()
        assert y_title == axis_title(metric_names[1], study.directions[1])
        front.scroll_into_view_if_needed()
        page.locator("div.MuiCard-root", has=front).screenshot(
            path=str(out_dir / "dashboard-front.png")
        )
        # the dashboard's setting "Use Plotly Python library" draws Optuna's plot_pareto_front
        # instead: its axes carry the metric names (no units)
        page.evaluate("() => localStorage.setItem('plotBackendRendering', 'true')")
        page.reload()
        page.locator("#graph-pareto-front .xtitle").wait_for(timeout=30_000)
        assert page.locator("#graph-pareto-front .xtitle").text_content() == metric_names[0]
        assert page.locator("#graph-pareto-front .ytitle").text_content() == metric_names[1]
        page.evaluate("() => localStorage.removeItem('plotBackendRendering')")

        # the report page: every figure rendered, the front holds every complete trial
        report = tmp_path / "report.html"
        write_report(STUDY, storage_url=storage_url, output=report)
        page.goto(report.as_uri())
        page.wait_for_function(
            "() => [...document.querySelectorAll('.plotly-graph-div')]"
            ".every(d => d.querySelector('.main-svg'))",
            timeout=60_000,
        )
        assert page.locator(".plotly-graph-div").count() == 5
        on_front_plot = page.evaluate(
            "() => document.getElementById('fig-0').data.filter(t => t.mode !== 'lines')"
            ".reduce((n, t) => n + t.x.length, 0)"
        )
        assert on_front_plot == len(complete)
        assert page.locator("#fig-0 path.point").count() == len(complete)
        assert (page.locator("#fig-0 .xtitle").text_content() or "").startswith(x_title)
        assert page.locator("#fig-0 .ytitle").text_content() == y_title
        assert page.locator("#fig-2 .heatmaplayer image, #fig-2 .hm image").count() >= 1
        page.locator("#fig-0").screenshot(path=str(out_dir / "report-front.png"))
        page.locator("#fig-2").screenshot(path=str(out_dir / "report-schedules.png"))
        browser.close()
