"""What a stored study and its trials say, read the same way by the CLI, export and dashboard."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial


def metric_names(study: optuna.Study) -> tuple[str, ...]:
    """The study's objective names (``objective_<i>`` where none were set)."""
    names = study.metric_names
    return tuple(names) if names else tuple(f"objective_{i}" for i in range(len(study.directions)))


def is_feasible(trial: FrozenTrial) -> bool:
    """Every constraint of the trial is met (Optuna's convention: a value <= 0); True without
    constraints."""
    return all(v <= 0.0 for v in trial.constraints.values())


__all__ = ["is_feasible", "metric_names"]
