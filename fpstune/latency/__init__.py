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
from fpstune.latency.rows import LatencyRow, NoLatencyRow, read_json
from fpstune.latency.shape import AttentionShape, resolve_spec
from fpstune.latency.shipped import gpu_slug, packaged_table, shipped_tables
from fpstune.latency.table import LatencyTable

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
