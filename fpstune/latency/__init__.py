"""Latency: timing one op on a GPU, the latency table of measured calls, and a policy's latency
composed from it."""

from __future__ import annotations

from fpstune.latency.compose import (
    CallCost,
    CallLatency,
    ComposedLatency,
    MeasuredLatency,
    TableLatency,
    compose,
    compose_with,
)
from fpstune.latency.measure import Timing, measure, summarize
from fpstune.latency.table import (
    AttentionShape,
    LatencyRow,
    LatencyTable,
    NoLatencyRow,
    gpu_slug,
    packaged_table,
    read_json,
    resolve_spec,
    shipped_tables,
)

__all__ = [
    "AttentionShape",
    "CallCost",
    "CallLatency",
    "ComposedLatency",
    "LatencyRow",
    "LatencyTable",
    "MeasuredLatency",
    "NoLatencyRow",
    "TableLatency",
    "Timing",
    "compose",
    "compose_with",
    "gpu_slug",
    "measure",
    "packaged_table",
    "read_json",
    "resolve_spec",
    "shipped_tables",
    "summarize",
]
