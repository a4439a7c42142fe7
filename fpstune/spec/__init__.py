"""Declarative inputs: study files and search spaces, validated on load.

Every mistake in a file a user hands in is a `BadInput` whose text is one line naming the file
and the field (the CLI exits with status 2 on it).
"""

from __future__ import annotations

from fpstune.spec.loading import BadInput, read_mapping
from fpstune.spec.space import FloatParam, IntParam, KernelSpace, ScheduleSpace
from fpstune.spec.study import (
    CalibrationSpec,
    Constraint,
    LatencySpec,
    ModelSpec,
    Objective,
    SamplerSpec,
    StudySpec,
    TrialBudget,
    load_space,
    load_study,
)

__all__ = [
    "BadInput",
    "CalibrationSpec",
    "Constraint",
    "FloatParam",
    "IntParam",
    "KernelSpace",
    "LatencySpec",
    "ModelSpec",
    "Objective",
    "SamplerSpec",
    "ScheduleSpace",
    "StudySpec",
    "TrialBudget",
    "load_space",
    "load_study",
    "read_mapping",
]
