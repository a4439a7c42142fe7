"""The latency tables shipped in the package: ``fpstune/data/latency/<gpu-slug>.json``, in the JSON
form of `fpstune.latency.rows` (what ``fpstune latency export`` writes), one file per GPU type,
loaded on demand into an in-memory `LatencyTable`."""

from __future__ import annotations

import importlib.resources
import json
import re

from fpstune.kernels.fingerprint import HardwareFingerprint
from fpstune.latency.rows import NoLatencyRow, rows_of
from fpstune.latency.table import LatencyTable

PACKAGE_DATA = "fpstune.data.latency"


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (the shipped file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def shipped_tables() -> list[str]:
    """GPU slugs of the latency tables shipped in the package, sorted."""
    try:
        entries = list(importlib.resources.files(PACKAGE_DATA).iterdir())
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return []
    return sorted(p.name.removesuffix(".json") for p in entries if p.name.endswith(".json"))


def packaged_table(gpu: HardwareFingerprint | str) -> LatencyTable:
    """The latency table shipped in the package for a GPU name or slug (or a fingerprint's GPU),
    loaded into an in-memory SQLite. Raises `NoLatencyRow` when fpstune ships none for it."""
    name = gpu if isinstance(gpu, str) else gpu.gpu
    fname = f"{gpu_slug(name)}.json"
    try:
        res = importlib.resources.files(PACKAGE_DATA).joinpath(fname)
        text = res.read_text(encoding="utf-8") if res.is_file() else None
    except ModuleNotFoundError:
        text = None
    if text is None:
        raise NoLatencyRow(
            f"fpstune ships no latency table for GPU {name!r} (looked for {PACKAGE_DATA}/{fname}); "
            "measure one with a kernel-stage study on that GPU"
        )
    table = LatencyTable.in_memory()
    table.add(rows_of(json.loads(text), f"{PACKAGE_DATA}/{fname}"))
    return table
