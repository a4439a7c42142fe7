"""`fpstune report`: one self-contained plotly page for a schedule study.

Pareto front with baselines marked, hypervolume history, the knee points' schedules, the kernel
latency table the latencies came from, and the hardware they were measured on. Read-only: the
page is computed into a `ReportInfo`, then drawn; nothing is written to the storage.
"""

from __future__ import annotations

import datetime as dt
import html
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import plotly.graph_objects as go
import plotly.offline

from fpstune import trial_attrs
from fpstune.catalog import latency_provenance, load_study_by_ref
from fpstune.errors import BadInput
from fpstune.kernels import HardwareFingerprint
from fpstune.kernels.atomic import write_text
from fpstune.latency.shape import AttentionShape
from fpstune.storage import mask_url

from . import figures
from .info import FrontInfo, HypervolumeInfo, front_info, hypervolume_info
from .tables import LatencyTableInfo, latency_table_info, table_rows
from .trials import ScheduleInfo, schedule_info, trial_policy


@dataclass(frozen=True)
class ReportInfo:
    study: str
    storage: str  # masked
    model: str
    front: FrontInfo
    hypervolume: HypervolumeInfo
    knees: tuple[ScheduleInfo, ...]
    latency_table: LatencyTableInfo | None
    #: (what, fingerprint, trials naming it): where the composed latencies were measured
    fingerprints: tuple[tuple[str, HardwareFingerprint, int], ...]
    #: COMPLETE trials by latency source (``table``/``measured``) and row source
    latency_sources: dict[str, int]
    created: str
    #: where the latencies were measured against the machine that composed them (None: trials
    #: made before the label), e.g. ``from table measured on X (not this machine: cpu)``
    latency_provenance: str | None = None


def report_info(study_ref: str, *, storage_url: str, knees: int = 3) -> ReportInfo:
    study, spec = load_study_by_ref(study_ref, storage_url=storage_url)
    if len(study.directions) != 2:
        raise BadInput(
            f"study {study.study_name}: the report draws two objectives, it has "
            f"{len(study.directions)}"
        )
    front = front_info(study, knees=knees)
    if not front.points:
        raise BadInput(f"study {study.study_name}: no complete trial to report yet")
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    fallback = trial_attrs.study_spec(study.user_attrs)
    schedules = []
    for rank, number in enumerate(front.knees, 1):
        policy = trial_policy(by_number[number], fallback)
        if policy is not None:
            base = front.point(number).baseline
            title = f"knee {rank}: " + (f"baseline {base}" if base else f"trial {number}")
            title += " (export pick)" if rank == 1 else ""
            schedules.append(schedule_info(policy, trial=number, title=title))
    fps, sources = _latency_provenance(study)
    table = None
    if fps:
        fingerprint = fps[0][1]
        rows, origin = table_rows(storage_url, fingerprint)
        shape = AttentionShape.of_model(spec.model, batch=spec.model.batch)
        table = latency_table_info(rows, shape=shape, fingerprint=fingerprint, origin=origin)
    return ReportInfo(
        study=study.study_name,
        storage=mask_url(storage_url),
        model=(
            f"{spec.model.name}: {spec.model.layers} layers x {spec.model.heads} heads x "
            f"{spec.model.head_dim}, grid {'x'.join(map(str, spec.model.grid))}, "
            f"{spec.model.steps} steps"
        ),
        front=front,
        hypervolume=hypervolume_info(front),
        knees=tuple(schedules),
        latency_table=table,
        fingerprints=tuple(fps),
        latency_sources=sources,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        latency_provenance=latency_provenance(study.get_trials(deepcopy=False)),
    )


def _latency_provenance(
    study: optuna.Study,
) -> tuple[list[tuple[str, HardwareFingerprint, int]], dict[str, int]]:
    fps: Counter[HardwareFingerprint] = Counter()
    sources: Counter[str] = Counter()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = trial_attrs.evaluation_attrs(t)
        if (fp := trial_attrs.latency_fingerprint(attrs)) is not None:
            fps[fp] += 1
        source = trial_attrs.latency_source(attrs)
        rows = attrs.get(trial_attrs.LATENCY_ROW_SOURCE)
        sources[f"{source} ({rows} rows)" if rows else str(source)] += 1
    return [("latencies", fp, n) for fp, n in fps.most_common()], dict(sources)


def draw_report(info: ReportInfo) -> list[tuple[str, str, go.Figure]]:
    """The page's figures, each with its section heading and a caption."""
    names = info.front.metric_names
    ref = ", ".join(
        f"{n} {v:.4g}" for n, v in zip(names, info.hypervolume.reference_point, strict=True)
    )
    out = [
        (
            "Pareto front",
            "Every complete trial; the front holds feasible trials only. Baselines are labelled.",
            figures.draw_front(info.front),
        ),
        (
            "Hypervolume",
            f"Of the feasible trials so far, against the reference point ({ref}): the worst "
            "feasible value of each objective, 10 % of its range further.",
            figures.draw_hypervolume(info.hypervolume, names),
        ),
        (
            "Knee-point schedules",
            "Front points nearest the ideal point with each objective scaled to [0, 1] over the "
            "front; the first is what `fpstune export` picks without bounds.",
            figures.draw_schedules(info.knees),
        ),
    ]
    if info.latency_table is not None:
        t = info.latency_table
        out.append(
            (
                "Kernel latency table",
                f"Rows from {t.origin}, measured on {t.fingerprint.gpu}; the lowest median over "
                "the kernel configs of each cell. Empty: not measured.",
                figures.draw_latency_table(t),
            )
        )
    if info.fingerprints:
        out.append(
            (
                "Hardware",
                "The GPU (and software) the latencies of the trials were measured on"
                + (f": latencies {info.latency_provenance}." if info.latency_provenance else "."),
                figures.draw_fingerprints(info.fingerprints),
            )
        )
    return out


def render_html(info: ReportInfo) -> str:
    """A self-contained page: plotly.js inline once, then one div per figure."""
    sections = []
    for i, (heading, caption, fig) in enumerate(draw_report(info)):
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{i}")
        sections.append(
            f"<section><h2>{html.escape(heading)}</h2><p>{html.escape(caption)}</p>{div}</section>"
        )
    front = info.front
    baselines = ", ".join(sorted({str(p.baseline) for p in front.baselines})) or "none"
    sources = ", ".join(f"{k}: {v}" for k, v in sorted(info.latency_sources.items()))
    summary = (
        f"{len(front.points)} complete trials ({sum(p.feasible for p in front.points)} feasible), "
        f"front of {len(front.front)}; baselines: {baselines}. Latencies: {sources}"
        + (f", {info.latency_provenance}." if info.latency_provenance else ".")
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fpstune report: {html.escape(info.study)}</title>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}section{{margin-top:2em}}</style>
</head><body>
<h1>fpstune report: {html.escape(info.study)}</h1>
<p>Model {html.escape(info.model)}. Storage {html.escape(info.storage)}. Made {info.created}.</p>
<p>{html.escape(summary)}</p>
{"".join(sections)}
</body></html>
"""


def write_report(study_ref: str, *, storage_url: str, output: Path) -> ReportInfo:
    info = report_info(study_ref, storage_url=storage_url)
    text = render_html(info)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text(output, text)  # atomically: a reader never sees half a page
    return info
