"""Before a schedule study starts: has it kernel latencies for its shape?

`check_schedule_latency` builds the latency source a schedule worker on this machine would compose
from (the storage's measured rows, else the table fpstune ships for this GPU; on a CPU, or for a
``latency.target`` proxy, the one shipped table) and looks up one call of the study's shape. When
nothing serves it, the study is bad input: one line naming the study file and field, the command
that measures the rows and how long that takes, said before Ray starts or the storage is written.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
import torch

from fpstune.errors import BadInput, one_line
from fpstune.kernels import AttentionSpec, Mode
from fpstune.kernels.fingerprint import current_fingerprint
from fpstune.latency.rows import LatencyRow, NoLatencyRow
from fpstune.latency.shape import AttentionShape
from fpstune.latency.shipped import packaged_table, shipped_tables
from fpstune.latency.table import LatencyRecord, LatencyTable, create_engine
from fpstune.spec.study import StudySpec
from fpstune.stages.evaluators import schedule_latency
from fpstune.stages.kernel_space import kernel_buckets
from fpstune.storage import mask_url, sqlite_path


def check_schedule_latency(
    spec: StudySpec,
    study_file: Path,
    storage_url: str,
    *,
    device: torch.device | None = None,
) -> None:
    """`BadInput` (one line) when no latency table serves the study's shape on ``device``
    (default: this machine's GPU, else the CPU). Reads the storage, never creates or writes it."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, target = spec.model, spec.latency.target
    engine, stored = _stored_table(storage_url)
    try:
        source = schedule_latency(spec, device=device, latency_table=stored, latency="table")
        # a `latency.target` source looks every call up at the target shape itself
        if not isinstance(source, str):  # never "measure": a table was asked for
            shape = AttentionShape.of_model(model, batch=model.batch)
            source.cost(AttentionSpec(mode=Mode.BF16_DENSE), shape)
        return
    except (NoLatencyRow, ValueError) as e:
        rows = stored.rows(source="measured") if stored is not None else []
        if device.type != "cuda" and isinstance(e, ValueError) and _gpu_fingerprints(rows) > 1:
            # a CPU composes from the table's only GPU: more rows would not settle which
            raise BadInput(f"{study_file}: latency: {one_line(e)}") from None
    finally:
        if engine is not None:
            engine.dispose()
    shape = AttentionShape.of_model(target or model, batch=model.batch)
    where = current_fingerprint(device).gpu if device.type == "cuda" else None
    on = f"on {where}" if where else "in the storage or the tables fpstune ships"
    what = f"no kernel latencies for {shape.heads}x{shape.tokens}x{shape.head_dim} {on}"
    store = f" --storage {mask_url(storage_url)}"
    estimate = kernel_trial_seconds(
        [*rows, *_shipped_rows()], shape, warmup=spec.latency.warmup, reps=spec.latency.reps
    )
    per = "" if estimate is None else f"~{estimate[0]:.1f} s per trial {estimate[1]}"
    if target is not None:
        how = (
            "measure them first with the kernel stage of a study of that shape, on a GPU: "
            f"fpstune study run STUDY --stage kernel{store}" + (f" ({per})" if per else "")
        )
        raise BadInput(f"{study_file}: latency.target: {what}; {how}")
    trials = spec.trials.kernel * len(kernel_buckets(spec.kernel_space))
    cost = f"{trials} kernel trials"
    if estimate is not None:
        cost += f", about {math.ceil(trials * estimate[0] / 60)} min at {per}"
    gpu = "" if where else " on a GPU"
    raise BadInput(
        f"{study_file}: latency: {what}; measure them first{gpu}: "
        f"fpstune study run {study_file} --stage kernel{store} ({cost})"
    )


def kernel_trial_seconds(
    rows: Sequence[LatencyRow], shape: AttentionShape, *, warmup: int, reps: int
) -> tuple[float, str] | None:
    """Wall seconds one kernel-stage trial at ``shape`` takes, from measured rows, and a phrase
    saying what it is based on; None without rows.

    A trial is a fixed overhead plus ``warmup + reps`` timed calls:
    - the overhead is the median, over consecutive rows of one kernel study (one bucket's
      controller, trials back to back), of the time between their ``created`` stamps less the
      calls they timed ((warmup + reps) x median): compile, feasibility check, input set-up,
      storage write, as the kernel stage itself clocked them;
    - a call is the mean median of the rows at the measured shape nearest in attention work
      (batch x heads x tokens^2 x head_dim, log scale), times the work ratio (attention is
      quadratic in tokens; the mean over modes and sparsities stands in for the stage's mix).
    """
    if not rows:
        return None
    gaps = []
    ordered = sorted(rows, key=lambda r: r.created)
    for a, b in itertools.pairwise(ordered):
        if a.study is not None and a.study == b.study:
            wall = (b.created - a.created).total_seconds()
            gaps.append(max(0.0, wall - (b.warmup + b.reps) * b.median_ms / 1000))
    overhead = statistics.median(gaps) if gaps else 0.0

    def work(s: AttentionShape) -> float:
        return float(s.batch * s.heads * s.tokens**2 * s.head_dim)

    near = min({r.shape for r in rows}, key=lambda s: abs(math.log(work(s) / work(shape))))
    at = [r for r in rows if r.shape == near]
    call_ms = statistics.fmean(r.median_ms for r in at) * work(shape) / work(near)
    seconds = overhead + (warmup + reps) * call_ms / 1000
    basis = (
        f"by the kernel stage's own timing: {overhead:.2f} s overhead + {warmup + reps} calls of "
        f"~{call_ms:.3g} ms, scaled from {near.heads}x{near.tokens}x{near.head_dim} "
        f"on {at[0].fingerprint.gpu}"
    )
    return seconds, basis


def _gpu_fingerprints(rows: Sequence[LatencyRow]) -> int:
    return len({r.fingerprint for r in rows if not r.fingerprint.is_cpu})


def _stored_table(url: str) -> tuple[sa.Engine | None, LatencyTable | None]:
    """The storage's latency table when it holds measured rows, read without creating an SQLite
    file or the table (a fresh storage stays untouched)."""
    db = sqlite_path(url)
    if db is not None and not db.exists():
        return None, None
    engine = create_engine(url)
    if sa.inspect(engine).has_table(LatencyRecord.__tablename__):
        table = LatencyTable(engine)
        if table.rows(source="measured"):
            return engine, table
    engine.dispose()
    return None, None


def _shipped_rows() -> list[LatencyRow]:
    return [r for slug in shipped_tables() for r in packaged_table(slug).rows(source="measured")]


__all__ = ["check_schedule_latency", "kernel_trial_seconds"]
