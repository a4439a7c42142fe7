"""Plotly figures drawn from the info objects (no study access here: compute first, then draw)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import plotly.graph_objects as go
from optuna.study import StudyDirection
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from fpstune.kernels import HardwareFingerprint, Mode

from .info import FrontInfo, HypervolumeInfo, TrialPoint
from .tables import LatencyTableInfo
from .trials import ScheduleInfo

# Schedule cells: one colour scale for the report's heatmaps and the trial artifacts' SVG.
# bf16 dense grey, fp8 dense blue, sparse cells yellow to dark red with their sparsity.
_BF16, _FP8, _SPARSE_FROM = 0.05, 0.15, 0.2
_SPARSE_SCALE = "YlOrRd"
SCHEDULE_COLORSCALE: list[list[float | str]] = [
    [0.0, "#bdbdbd"],
    [0.1, "#bdbdbd"],
    [0.1, "#4292c6"],
    [_SPARSE_FROM, "#4292c6"],
    *[
        [_SPARSE_FROM + (1 - _SPARSE_FROM) * f, c]
        for f, c in zip(
            (0.0, 0.25, 0.5, 0.75, 1.0),
            sample_colorscale(_SPARSE_SCALE, [0.0, 0.25, 0.5, 0.75, 1.0]),
            strict=True,
        )
    ],
]
# Distinct markers so each baseline reads apart from the searched trials and from each other.
_BASELINE_SYMBOLS = ("diamond", "square", "triangle-up", "star", "pentagon", "hexagram", "cross")


def cell_value(mode: Mode, sparsity: float) -> float:
    """Where a schedule cell sits on `SCHEDULE_COLORSCALE` (0..1)."""
    if mode.sparse:
        return _SPARSE_FROM + (1 - _SPARSE_FROM) * min(max(sparsity, 0.0), 1.0)
    return _FP8 if mode.fp8 else _BF16


def cell_colour(mode: Mode, sparsity: float) -> str:
    """The cell's colour as ``rgb(r, g, b)`` or ``#rrggbb`` (SVG and CSS read both)."""
    if not mode.sparse:
        return "#4292c6" if mode.fp8 else "#bdbdbd"
    return str(sample_colorscale(_SPARSE_SCALE, [min(max(sparsity, 0.0), 1.0)])[0])


def cell_text(mode: Mode, sparsity: float) -> str:
    prefix = "fp8" if mode.fp8 else "bf16"
    return f"{prefix} {sparsity:.0%}" if mode.sparse else prefix


#: Units of the metrics a study can name (`fpstune.spec.study.Metric`); the others have none.
METRIC_UNITS = {"latency_ms": "ms", "psnr": "dB"}


def axis_title(name: str, direction: StudyDirection) -> str:
    """``latency_ms (ms; lower is better)``: the metric name, its unit, which way is better."""
    better = "lower" if direction == StudyDirection.MINIMIZE else "higher"
    return f"{name} ({METRIC_UNITS.get(name, 'dimensionless')}; {better} is better)"


def draw_front(front: FrontInfo) -> go.Figure:
    """Every COMPLETE trial: infeasible, feasible, the Pareto front, baselines, knee points."""
    x_name, y_name = front.metric_names[0], front.metric_names[1]
    xs = [p.values[0] for p in front.points]
    # latencies often span orders of magnitude; a log axis keeps the fast cluster readable
    log_x = min(xs) > 0 and max(xs) / min(xs) > 5

    def at_x(v: float) -> float:  # where plotly puts x: its log axes take log10 positions
        return math.log10(v) if log_x else v

    mid_x = (at_x(min(xs)) + at_x(max(xs))) / 2
    fig = go.Figure()
    searched = [p for p in front.points if p.baseline is None]
    groups = (
        ("infeasible", [p for p in searched if not p.feasible], "x-thin-open", "#9e9e9e"),
        ("feasible", [p for p in searched if p.feasible and not p.on_front], "circle", "#9ecae1"),
        ("Pareto front", [p for p in searched if p.on_front], "circle", "#d62728"),
    )
    for name, points, symbol, colour in groups:
        fig.add_trace(_scatter(points, front, name=name, symbol=symbol, colour=colour))
    # baselines at the same point (two plans that came out equal) share one label
    same: dict[tuple[float, ...], list[str]] = {}
    for p in front.baselines:
        same.setdefault(p.values, []).append(str(p.baseline))

    def label_of(p: TrialPoint) -> str:
        names = same[p.values]
        if names[0] != p.baseline:
            return ""
        return " = ".join(names) + ("" if p.feasible else " (infeasible)")

    for i, (label, points) in enumerate(_by_baseline(front.baselines).items()):
        # filled when feasible, open when not; a red edge when on the front
        symbol = _BASELINE_SYMBOLS[i % len(_BASELINE_SYMBOLS)]
        trace = _scatter(points, front, name=f"baseline {label}", symbol=symbol, colour="#222222")
        trace.update(
            mode="markers+text",
            text=[label_of(p) for p in points],
            # towards the middle, so that a label at the edge is not cut off
            textposition=[
                "middle left" if at_x(p.values[0]) > mid_x else "middle right" for p in points
            ],
            marker_symbol=[symbol if p.feasible else f"{symbol}-open" for p in points],
            marker_line_color=["#d62728" if p.on_front else "#333" for p in points],
            marker_line_width=2,
        )
        fig.add_trace(trace)
    line = front.front
    fig.add_trace(
        go.Scatter(
            x=[p.values[0] for p in line],
            y=[p.values[1] for p in line],
            mode="lines",
            line={"color": "#d62728", "width": 1, "shape": "hv"},
            name="front (staircase)",
            hoverinfo="skip",
        )
    )
    _label_knees(fig, front, at_x)
    fig.update_layout(
        title=f"{front.study}: {x_name} vs {y_name}, {len(front.points)} complete trials",
        xaxis_title=axis_title(x_name, front.directions[0]) + (", log scale" if log_x else ""),
        xaxis_type="log" if log_x else "linear",
        xaxis_tickvals=_log_ticks(min(xs), max(xs)) if log_x else None,
        yaxis_title=axis_title(y_name, front.directions[1]),
        legend={"orientation": "h", "y": -0.2},
        height=520,
    )
    return fig


def _label_knees(fig: go.Figure, front: FrontInfo, at_x: Callable[[float], float]) -> None:
    """Knees sit close together: their labels stack in the corner no feasible trial reaches
    (below-left of the front when both objectives are minimised), an arrow from each to its
    point, the highest point's label on top so that the arrows do not cross."""
    if not front.knees:
        return
    knees = sorted((front.point(n) for n in front.knees), key=lambda p: -p.values[1])
    ranks = {n: r for r, n in enumerate(front.knees, 1)}
    xs = [at_x(p.values[0]) for p in front.points]
    ys = [p.values[1] for p in front.points]
    left = front.directions[0] == StudyDirection.MINIMIZE
    low = front.directions[1] == StudyDirection.MINIMIZE
    reach = 0.5 * (max(xs) - min(xs))  # room for the labels, inside the plot
    knee_xs = [at_x(p.values[0]) for p in knees]
    tail_x = max(min(xs), min(knee_xs) - reach) if left else min(max(xs), max(knee_xs) + reach)
    row = 0.08 * (max(ys) - min(ys))
    for slot, p in enumerate(knees):
        rank = ranks[p.number]
        fig.add_annotation(
            x=at_x(p.values[0]),
            y=p.values[1],
            text=f"knee {rank}" + (" (export pick)" if rank == 1 else ""),
            axref="x",
            ayref="y",
            ax=tail_x,
            ay=min(ys) + row * (len(knees) - 1 - slot) if low else max(ys) - row * slot,
            xanchor="left" if left else "right",
            arrowhead=0,
            arrowcolor="#a50f15",
            font={"size": 11, "color": "#a50f15"},
        )


def draw_hypervolume(hv: HypervolumeInfo, metric_names: Sequence[str]) -> go.Figure:
    ref = ", ".join(f"{n} {v:.4g}" for n, v in zip(metric_names, hv.reference_point, strict=True))
    fig = go.Figure(
        go.Scatter(
            x=list(hv.trial_numbers),
            y=list(hv.values),
            mode="lines+markers",
            name="feasible trials so far",
            line={"shape": "hv"},
        )
    )
    if hv.baselines is not None:
        fig.add_hline(
            y=hv.baselines,
            line_dash="dash",
            annotation_text="baselines alone",
            annotation_position="bottom right",
        )
    fig.update_layout(
        title=f"Hypervolume history (reference point: {ref})",
        xaxis_title="trial number",
        yaxis_title="hypervolume",
        height=380,
    )
    return fig


def draw_schedules(schedules: Sequence[ScheduleInfo]) -> go.Figure:
    """One step x layer heatmap per schedule, side by side, on one colour scale."""
    n = max(len(schedules), 1)
    fig = make_subplots(
        rows=1,
        cols=n,
        subplot_titles=[s.title for s in schedules] or ["no feasible trial"],
        horizontal_spacing=0.08,
    )
    for i, s in enumerate(schedules, 1):
        fig.add_trace(_schedule_heatmap(s, show_scale=i == n), row=1, col=i)
        fig.update_xaxes(title_text="layer", dtick=1, row=1, col=i)
        fig.update_yaxes(title_text="denoising step", dtick=1, autorange="reversed", row=1, col=i)
    fig.update_layout(title="Schedules of the front's knee points", height=460)
    return fig


def _schedule_heatmap(s: ScheduleInfo, *, show_scale: bool) -> go.Heatmap:
    z = [
        [cell_value(m, sp) for m, sp in zip(ms, sps, strict=True)]
        for ms, sps in zip(s.modes, s.sparsity, strict=True)
    ]
    text = [
        [cell_text(m, sp) for m, sp in zip(ms, sps, strict=True)]
        for ms, sps in zip(s.modes, s.sparsity, strict=True)
    ]
    return go.Heatmap(
        z=z,
        text=text,
        customdata=[list(row) for row in s.specs],
        texttemplate="%{text}",
        hovertemplate="step %{y}, layer %{x}<br>%{customdata}<extra>trial "
        + str(s.trial)
        + "</extra>",
        colorscale=SCHEDULE_COLORSCALE,
        zmin=0.0,
        zmax=1.0,
        showscale=show_scale,
        colorbar={
            "tickvals": [
                _BF16,
                _FP8,
                cell_value(Mode.FP8_SPARSE, 0.5),
                cell_value(Mode.FP8_SPARSE, 0.9),
            ],
            "ticktext": ["bf16 dense", "fp8 dense", "sparse 50 %", "sparse 90 %"],
        },
        xgap=1,
        ygap=1,
    )


def draw_latency_table(info: LatencyTableInfo) -> go.Figure:
    fig = go.Figure(
        go.Heatmap(
            z=[list(row) for row in info.ms],
            x=[f"{s:g}" for s in info.sparsities],
            y=list(info.rows),
            text=[[f"{v:.3g}" if v is not None else "" for v in row] for row in info.ms],
            customdata=[list(row) for row in info.detail],
            texttemplate="%{text}",
            hovertemplate="%{y}, sparsity %{x}: %{z:.4g} ms<br>%{customdata}<extra></extra>",
            colorscale="Viridis",
            colorbar={"title": {"text": "ms / call"}},
        )
    )
    shape = info.shape
    fig.update_layout(
        title=(
            f"Kernel latency table, {info.fingerprint.gpu}: best median per call, "
            f"{shape.batch}x{shape.heads}x{shape.tokens}x{shape.head_dim}"
        ),
        xaxis_title="sparsity",
        yaxis={"autorange": "reversed"},
        height=max(320, 30 * len(info.rows) + 160),
        margin={"l": 200},
    )
    return fig


def draw_fingerprints(rows: Sequence[tuple[str, HardwareFingerprint, int]]) -> go.Figure:
    """``rows``: (what it is, fingerprint, how many trials name it)."""
    fields = ("gpu", "sm_count", "capability", "driver", "torch", "triton", "fpstune")
    header = ["", *fields, "trials"]
    cols: list[list[str]] = [[r[0] for r in rows]]
    for f in fields:
        cols.append([_fmt(getattr(r[1], f)) for r in rows])
    cols.append([str(r[2]) for r in rows])
    fig = go.Figure(go.Table(header={"values": header}, cells={"values": cols}))
    fig.update_layout(
        title="Hardware fingerprint of the latencies",
        height=200 + 40 * len(rows),
        margin={"t": 60, "b": 20},
    )
    return fig


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-3-5-7 steps per decade over [lo, hi]: labelled ticks plotly's log axis lacks."""
    k = math.floor(math.log10(lo))
    ticks = []
    while 10**k <= hi:
        ticks += [m * 10**k for m in (1, 2, 3, 5, 7) if lo * 0.9 <= m * 10**k <= hi * 1.1]
        k += 1
    return ticks


def _fmt(v: object) -> str:
    if isinstance(v, tuple):
        return ".".join(str(x) for x in v)
    return "-" if v is None else str(v)


def _by_baseline(points: Sequence[TrialPoint]) -> dict[str, list[TrialPoint]]:
    out: dict[str, list[TrialPoint]] = {}
    for p in points:
        out.setdefault(str(p.baseline), []).append(p)
    return out


def _scatter(
    points: Sequence[TrialPoint], front: FrontInfo, *, name: str, symbol: str, colour: str
) -> go.Scatter:
    names = front.metric_names

    def hover(p: TrialPoint) -> str:
        vals = "<br>".join(f"{n} {v:.4g}" for n, v in zip(names, p.values, strict=True))
        state = "feasible" if p.feasible else "infeasible"
        tag = f"baseline {p.baseline}<br>" if p.baseline else ""
        return f"trial {p.number}<br>{tag}{vals}<br>{state}"

    return go.Scatter(
        x=[p.values[0] for p in points],
        y=[p.values[1] for p in points],
        mode="markers",
        name=name,
        marker={
            "symbol": symbol,
            "color": colour,
            "size": 10,
            "line": {"width": 1, "color": "#333"},
        },
        hovertext=[hover(p) for p in points],
        hoverinfo="text",
    )
