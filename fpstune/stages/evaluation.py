"""What crosses Ray back from a worker: an `Evaluation`, or a `CandidateFailure` saying why the
candidate could not be evaluated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

C = TypeVar("C", contravariant=True)


@dataclass(frozen=True)
class Evaluation:
    """What one trial measured.

    values: objective name -> value, named as in the study file (e.g. ``latency_ms``, ``rel_l2``).
    constraints: constraint name -> value, feasible when <= 0 (Optuna's convention).
    attrs: JSON-serialisable facts stored as trial user attributes: the hardware fingerprint,
      where the latency came from (``measured`` on this GPU or ``table`` from a shipped table),
      timing statistics, per-layer/per-step errors.
    """

    values: dict[str, float]
    constraints: dict[str, float] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CandidateFailure:
    """The candidate itself is at fault (infeasible, OOM, a non-finite value): the trial fails
    with ``reason`` and is not retried."""

    reason: str


#: One trial's outcome, as a worker returns it.
TrialResult = Evaluation | CandidateFailure


class Evaluator(Protocol[C]):
    """Evaluates candidates on one device. Built once per worker and reused across trials, so
    expensive set-up (CUDA context, compiled kernels, calibration data, references) happens once.
    Raises `CandidateError` for a candidate that cannot run (the trial fails with that reason;
    the evaluator stays usable)."""

    def evaluate(self, candidate: C) -> Evaluation: ...


class CandidateError(RuntimeError):
    """The candidate itself is at fault (infeasible config, OOM, NaN output, compile error)."""
