"""Where a stage's candidates come from: an Optuna trial in, a worker's candidate dict out."""

from __future__ import annotations

from typing import Any, Literal, Protocol

import optuna

from fpstune.spec.study import StudySpec
from fpstune.stages.kernel_space import Bucket, default_params, suggest_kernel
from fpstune.stages.schedule_space import suggest_schedule


class CandidateSource(Protocol):
    stage: str
    study_name: str
    metric_names: list[str]
    directions: list[Literal["minimize", "maximize"]]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]: ...

    def study_attrs(self) -> dict[str, Any]: ...


class ScheduleSource:
    """Schedule stage: a compact per-step / per-layer policy for the study's model."""

    stage = "schedule"

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self.study_name = spec.study_name("schedule")
        self.metric_names = spec.metric_names
        self.directions = list(spec.directions)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        policy = suggest_schedule(trial, self.spec.schedule_space, self.spec.model)
        return {"stage": "schedule", "policy": policy.to_dict()}

    def first_trials(self) -> list[tuple[dict[str, Any], str]]:
        """With ``sampler.start_from_baselines``: the hand-set baselines' schedules that the
        space holds, evaluated before the sampler's picks, each with its ``queued_as`` label."""
        if not self.spec.sampler.start_from_baselines:
            return []
        from fpstune.baselines import baseline_params

        found = baseline_params(self.spec.schedule_space, self.spec.model.shape())
        return [(params, f"baseline {name}") for name, params in found.items()]

    def study_attrs(self) -> dict[str, Any]:
        return {"fpstune_stage": "schedule", "fpstune_study": self.spec.model_dump(mode="json")}


class KernelSource:
    """Kernel stage, one Optuna study per (mode, sparsity bucket): tile and launch config."""

    stage = "kernel"

    def __init__(self, spec: StudySpec, bucket: Bucket) -> None:
        self.spec = spec
        self.bucket = bucket
        self.study_name = spec.study_name("kernel", bucket.key)
        self.metric_names = ["latency_ms"]
        self.directions: list[Literal["minimize", "maximize"]] = ["minimize"]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        spec = suggest_kernel(trial, self.spec.kernel_space, self.spec.model.head_dim, self.bucket)
        return {"stage": "kernel", "spec": spec.to_dict()}

    def first_trials(self) -> list[tuple[dict[str, Any], str]]:
        """Measured before the sampler's picks: the runtime's default config, when the space
        holds it (a 3-trial table must never be slower than running without a policy)."""
        params = default_params(
            self.spec.kernel_space, self.spec.model.head_dim, self.bucket, self.spec.model.grid
        )
        return [(params, "runtime default")] if params else []

    def study_attrs(self) -> dict[str, Any]:
        return {
            "fpstune_stage": "kernel",
            "fpstune_bucket": self.bucket.key,
            "fpstune_study": self.spec.model_dump(mode="json"),
        }
