"""The `Stage` protocol: what a search stage brings to a run.

A stage is a small picklable object (the validated study and, for the kernel stage, one sparsity
bucket): the controller asks it for candidates (frozen, `fpstune.stages.candidates`), Ray ships
it to each worker, which asks it once for its evaluator and sends back one `TrialResult` per
candidate. `KernelStage` (fpstune/stages/kernel.py) and `ScheduleStage` (schedule.py) implement it.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, TypeVar

import optuna
import torch

from fpstune.spec.study import Stage as StageName
from fpstune.spec.study import StudySpec
from fpstune.stages.evaluation import Evaluation, Evaluator


class Candidate(Protocol):
    def to_attr(self) -> dict[str, Any]:
        """The form stored as the trial's ``candidate`` attribute."""
        ...


C = TypeVar("C", bound=Candidate)


class Stage(Protocol[C]):
    """name: as the study file, ``--stage`` and stored studies (``fpstune_stage``) say it;
    records_latency: each evaluation is also a row of the storage's latency table."""

    name: StageName
    records_latency: bool
    spec: StudySpec
    study_name: str
    metric_names: list[str]
    directions: list[Literal["minimize", "maximize"]]

    def suggest(self, trial: optuna.Trial) -> C: ...

    def first_trials(self) -> list[tuple[dict[str, Any], str]]:
        """Parameters run before the sampler's picks, each with its ``queued_as`` label."""
        ...

    def study_attrs(self) -> dict[str, Any]: ...

    def evaluator(self, device: torch.device, storage_url: str) -> Evaluator[C]:
        """Built once per worker, on its device (it may read the storage)."""
        ...

    def constraints(self, ev: Evaluation) -> dict[str, float]:
        """The trial's constraint values (feasible when <= 0); empty when it has none."""
        ...
