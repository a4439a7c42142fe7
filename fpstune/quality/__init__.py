"""Quality: calibration sets of Q/K/V, metrics against the BF16-dense reference, and the probes
that score a policy with them.

The names below are imported from their modules on first use (PEP 562), so validating a
study (`fpstune.spec.study` reads `registry`) starts no torch."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOME = {
    **dict.fromkeys(
        (
            "CalibrationError",
            "CalibrationMeta",
            "CalibrationSet",
            "cap_grid",
            "check_fits",
            "evenly_spaced",
            "load_calibration",
            "save_calibration",
            "synthetic_calibration",
            "tensor_name",
        ),
        "calibration",
    ),
    **dict.fromkeys(("METRICS", "Metric", "compare", "cosine", "rel_l2"), "metrics"),
    **dict.fromkeys(("AttentionProbe", "QualityProbe", "QualityResult"), "probe"),
}
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


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value
