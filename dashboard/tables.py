"""The kernel latency table a study's latencies were composed from, as a heatmap's info.

Rows are (mode, pattern, tile), columns sparsity buckets; a cell holds the lowest median over the
kernel configs measured for it. Only rows of the study's attention shape and of the GPU type the
trials' latencies name are shown: the table the workers actually read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from fpstune.kernels import HardwareFingerprint
from fpstune.kernels.fingerprint import same_gpu_type
from fpstune.latency.rows import LatencyRow, NoLatencyRow
from fpstune.latency.shape import AttentionShape
from fpstune.latency.shipped import PACKAGE_DATA, gpu_slug, packaged_table
from fpstune.latency.table import LatencyRecord, LatencyTable, create_engine


@dataclass(frozen=True)
class LatencyTableInfo:
    fingerprint: HardwareFingerprint
    shape: AttentionShape
    #: where the rows come from: the study storage, or the table shipped with fpstune
    origin: str
    rows: tuple[str, ...]
    sparsities: tuple[float, ...]
    #: ``ms[row][column]``: lowest median in ms per call, None where nothing was measured
    ms: tuple[tuple[float | None, ...], ...]
    #: the best row's kernel config, IQR and repetitions, for hover text
    detail: tuple[tuple[str, ...], ...]


def table_rows(storage_url: str, fingerprint: HardwareFingerprint) -> tuple[list[LatencyRow], str]:
    """The measured rows the study's workers read: the storage's own table when a kernel stage
    (or an import) filled it, else the table fpstune ships for that GPU. Never creates tables."""
    engine = create_engine(storage_url)
    try:
        if sa.inspect(engine).has_table(LatencyRecord.__tablename__):
            rows = LatencyTable(engine).rows(source="measured")
            if rows:
                return rows, "study storage"
    finally:
        engine.dispose()
    try:
        table = packaged_table(fingerprint)
    except NoLatencyRow:
        return [], "none"
    return table.rows(source="measured"), f"{PACKAGE_DATA}/{gpu_slug(fingerprint.gpu)}.json"


def latency_table_info(
    rows: Sequence[LatencyRow],
    *,
    shape: AttentionShape,
    fingerprint: HardwareFingerprint,
    origin: str,
) -> LatencyTableInfo | None:
    """The heatmap of ``rows`` for ``shape`` on ``fingerprint``'s GPU type (None if none)."""
    mine = [
        r
        for r in rows
        if r.shape == shape and same_gpu_type(r.fingerprint, fingerprint) and r.median_ms > 0
    ]
    if not mine:
        return None
    best: dict[tuple[str, float], LatencyRow] = {}
    for r in mine:
        key = (_row_label(r), round(r.sparsity, 6))
        if key not in best or r.median_ms < best[key].median_ms:
            best[key] = r
    labels = sorted({k[0] for k in best}, key=_label_order)
    sparsities = sorted({k[1] for k in best})
    ms: list[tuple[float | None, ...]] = []
    detail: list[tuple[str, ...]] = []
    for label in labels:
        cells = [best.get((label, s)) for s in sparsities]
        ms.append(tuple(c.median_ms if c else None for c in cells))
        detail.append(tuple(_detail(c) if c else "" for c in cells))
    return LatencyTableInfo(
        fingerprint=fingerprint,
        shape=shape,
        origin=origin,
        rows=tuple(labels),
        sparsities=tuple(sparsities),
        ms=tuple(ms),
        detail=tuple(detail),
    )


def _row_label(r: LatencyRow) -> str:
    parts = [r.mode.value]
    if r.pattern:
        parts.append(r.pattern)
    if r.tile:
        parts.append("x".join(str(t) for t in r.tile))
    return " ".join(parts)


def _label_order(label: str) -> tuple[int, str]:
    order = ("bf16_dense", "fp8_dense", "bf16_sparse", "fp8_sparse")
    mode = label.split(" ")[0]
    return (order.index(mode) if mode in order else len(order), label)


def _detail(r: LatencyRow) -> str:
    k = r.kernel
    config = f"m{k.block_m} n{k.block_n} w{k.num_warps} s{k.num_stages}" if k else "torch SDPA"
    return f"{config}; IQR {r.iqr_ms:.3g} ms; {r.reps} reps; {r.method}"
