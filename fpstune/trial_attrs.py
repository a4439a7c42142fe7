"""What a stored study and its trials say, read the same way by the CLI, export and dashboard.

The keys below are in databases written by every fpstune version: they never change. Study
attributes: `STAGE`, `BUCKET` (a kernel study's), `STUDY` (the study file). Trial attributes:
`CANDIDATE`, `QUEUED_AS`, `FAIL_REASON`, `DETAILS` (an evaluation's list and mapping attributes,
bundled: `evaluation_attrs` unpacks them) and the ``latency_*`` family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from fpstune.kernels.fingerprint import HardwareFingerprint
from fpstune.spec.study import Stage, StudySpec

STAGE = "fpstune_stage"
#: `STAGE`'s values (and the ``stage`` of a stored `CANDIDATE`)
KERNEL_STAGE: Stage = "kernel"
SCHEDULE_STAGE: Stage = "schedule"
BUCKET = "fpstune_bucket"
STUDY = "fpstune_study"
CANDIDATE = "candidate"
QUEUED_AS = "queued_as"
FAIL_REASON = "fail_reason"
DETAILS = "details"
LATENCY_SOURCE = "latency_source"
LATENCY_ROW_SOURCE = "latency_row_source"
LATENCY_FINGERPRINT = "latency_fingerprint"
LATENCY_LOOKUPS = "latency_lookups"
LATENCY_PROVENANCE = "latency_provenance"


def metric_names(study: optuna.Study) -> tuple[str, ...]:
    """The study's objective names (``objective_<i>`` where none were set)."""
    names = study.metric_names
    return tuple(names) if names else tuple(f"objective_{i}" for i in range(len(study.directions)))


def is_feasible(trial: FrozenTrial) -> bool:
    """Every constraint of the trial is met (Optuna's convention: a value <= 0); True without
    constraints."""
    return all(v <= 0.0 for v in trial.constraints.values())


def study_spec(study_attrs: Mapping[str, Any]) -> StudySpec | None:
    """The study file a stored study ran (None: not an fpstune study)."""
    raw = study_attrs.get(STUDY)
    return StudySpec.model_validate(raw) if raw is not None else None


def evaluation_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's evaluation attributes as the evaluator returned them: the `DETAILS` bundle
    unpacked beside the scalar user attributes (which win)."""
    details = trial.user_attrs.get(DETAILS)
    return {**(details if isinstance(details, dict) else {}), **trial.user_attrs}


def latency_fingerprint(attrs: Mapping[str, Any]) -> HardwareFingerprint | None:
    """The GPU the latencies of an evaluation (`evaluation_attrs`) were measured on."""
    raw = attrs.get(LATENCY_FINGERPRINT)
    return HardwareFingerprint.model_validate(raw) if raw else None


def latency_lookups(attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The latency-table rows a composed latency used, one per distinct spec."""
    return list(attrs.get(LATENCY_LOOKUPS) or [])


def latency_source(attrs: Mapping[str, Any]) -> str:
    """``measured`` or ``table`` (``?`` for an evaluation that did not say)."""
    return str(attrs.get(LATENCY_SOURCE, "?"))


__all__ = [
    "evaluation_attrs",
    "is_feasible",
    "latency_fingerprint",
    "latency_lookups",
    "latency_source",
    "metric_names",
    "study_spec",
]
