"""The study-level facts behind the report: the Pareto front, its knee points, hypervolume.

Computed from a study into frozen info objects (optuna.visualization's pattern: compute, test the
info, then draw). Feasibility and the front follow Optuna's own rules (`Study.best_trials`): a
trial is feasible when every constraint value is <= 0, the front holds feasible trials only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from fpstune.trial_attrs import is_feasible, metric_names

#: The user attribute that marks a baseline trial (its short name, e.g. ``fp8_dense_all``).
BASELINE_ATTR = "baseline"


@dataclass(frozen=True)
class TrialPoint:
    """One COMPLETE trial in objective space."""

    number: int
    values: tuple[float, ...]
    feasible: bool
    on_front: bool
    baseline: str | None = None


@dataclass(frozen=True)
class FrontInfo:
    study: str
    metric_names: tuple[str, ...]
    directions: tuple[StudyDirection, ...]
    #: every COMPLETE trial, by trial number
    points: tuple[TrialPoint, ...]
    #: knee points, nearest the ideal point first (the first is `fpstune export`'s default pick)
    knees: tuple[int, ...]

    @property
    def front(self) -> tuple[TrialPoint, ...]:
        """The feasible Pareto front, sorted by the first objective."""
        return tuple(sorted((p for p in self.points if p.on_front), key=lambda p: p.values))

    @property
    def baselines(self) -> tuple[TrialPoint, ...]:
        return tuple(p for p in self.points if p.baseline is not None)

    def point(self, number: int) -> TrialPoint:
        return next(p for p in self.points if p.number == number)


@dataclass(frozen=True)
class HypervolumeInfo:
    """Hypervolume of the feasible front after each COMPLETE trial, in trial-number order."""

    #: in objective units, as the study reports them (not sign-flipped)
    reference_point: tuple[float, ...]
    trial_numbers: tuple[int, ...]
    values: tuple[float, ...]
    #: hypervolume of the feasible baselines alone (None when the study has none)
    baselines: float | None


def baseline_name(trial: FrozenTrial) -> str | None:
    name = trial.user_attrs.get(BASELINE_ATTR)
    return str(name) if name else None


def front_info(study: optuna.Study, *, knees: int = 3) -> FrontInfo:
    """The study's COMPLETE trials, which are feasible, which are on the front, and its knees."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    on_front = {t.number for t in study.best_trials} if trials else set()
    points = tuple(
        TrialPoint(
            number=t.number,
            values=tuple(float(v) for v in t.values),
            feasible=is_feasible(t),
            on_front=t.number in on_front,
            baseline=baseline_name(t),
        )
        for t in sorted(trials, key=lambda t: t.number)
    )
    directions = tuple(study.directions)
    front = [p for p in points if p.on_front]
    return FrontInfo(
        study=study.study_name,
        metric_names=metric_names(study),
        directions=directions,
        points=points,
        knees=knee_points(front, directions, k=knees),
    )


def knee_points(
    front: Sequence[TrialPoint], directions: Sequence[StudyDirection], *, k: int = 3
) -> tuple[int, ...]:
    """The ``k`` front points nearest the ideal point after scaling each objective to [0, 1]
    over the front (ties by trial number): the same rule `fpstune export` picks by."""
    if not front or k < 1:
        return ()
    losses = _losses([p.values for p in front], directions)
    lo, hi = losses.min(axis=0), losses.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    dist = (((losses - lo) / span) ** 2).sum(axis=1)
    order = sorted(range(len(front)), key=lambda i: (float(dist[i]), front[i].number))
    return tuple(front[i].number for i in order[:k])


def hypervolume_info(
    front: FrontInfo, *, reference_point: Sequence[float] | None = None
) -> HypervolumeInfo:
    """Hypervolume history over the feasible trials. The default reference point is the worst
    feasible value of each objective pushed 10 % of its range further (so every feasible trial
    counts); it is part of the info, so the page can say which it was."""
    # Optuna's exact hypervolume (WFG); the module is private but is what its own
    # plot_hypervolume_history uses.
    from optuna._hypervolume import compute_hypervolume

    feasible = [p for p in front.points if p.feasible]
    dirs = front.directions
    if reference_point is None:
        ref_loss = _default_reference(_losses([p.values for p in feasible], dirs), len(dirs))
    else:
        ref_loss = _losses([tuple(reference_point)], dirs)[0]

    def volume(points: Sequence[TrialPoint]) -> float:
        if not points:
            return 0.0
        losses = _losses([p.values for p in points], dirs)
        inside = losses[(losses < ref_loss).all(axis=1)]
        return float(compute_hypervolume(inside, ref_loss)) if len(inside) else 0.0

    numbers, values, seen = [], [], []
    for p in front.points:
        if p.feasible:
            seen.append(p)
        numbers.append(p.number)
        values.append(volume(seen))
    baselines = [p for p in feasible if p.baseline is not None]
    reference = tuple(float(v) * _sign(d) for v, d in zip(ref_loss, dirs, strict=True))
    return HypervolumeInfo(
        reference_point=reference,
        trial_numbers=tuple(numbers),
        values=tuple(values),
        baselines=volume(baselines) if front.baselines else None,
    )


def _sign(direction: StudyDirection) -> float:
    return 1.0 if direction == StudyDirection.MINIMIZE else -1.0


def _losses(values: Sequence[Sequence[float]], directions: Sequence[StudyDirection]) -> np.ndarray:
    """Objective values as losses (every objective minimised)."""
    signs = np.array([_sign(d) for d in directions])
    return np.asarray(values, dtype=float).reshape(-1, len(signs)) * signs


def _default_reference(losses: np.ndarray, n: int) -> np.ndarray:
    if not len(losses):
        return np.ones(n)
    lo, hi = losses.min(axis=0), losses.max(axis=0)
    margin = np.where(hi > lo, 0.1 * (hi - lo), np.maximum(0.1 * np.abs(hi), 1e-12))
    return hi + margin
