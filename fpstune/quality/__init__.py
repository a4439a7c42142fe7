"""Quality: calibration sets of Q/K/V, metrics against the BF16-dense reference, and the probes
that score a policy with them."""

from __future__ import annotations

from fpstune.quality.calibration import (
    CalibrationError,
    CalibrationMeta,
    CalibrationSet,
    cap_grid,
    check_fits,
    evenly_spaced,
    load_calibration,
    save_calibration,
    synthetic_calibration,
    tensor_name,
)
from fpstune.quality.metrics import METRICS, Metric, compare, cosine, rel_l2
from fpstune.quality.probe import AttentionProbe, QualityProbe, QualityResult

__all__ = [
    "METRICS",
    "AttentionProbe",
    "CalibrationError",
    "CalibrationMeta",
    "CalibrationSet",
    "Metric",
    "QualityProbe",
    "QualityResult",
    "cap_grid",
    "check_fits",
    "compare",
    "cosine",
    "evenly_spaced",
    "load_calibration",
    "rel_l2",
    "save_calibration",
    "synthetic_calibration",
    "tensor_name",
]
