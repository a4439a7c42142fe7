"""The kernel stage: one Optuna study per sparsity bucket, searching the tile and launch config
of one attention call, timed on the worker's GPU; every result is a latency-table row."""

from __future__ import annotations

from typing import Any, Literal

import optuna
import torch

from fpstune.latency.shape import AttentionShape
from fpstune.spec.study import Stage as StageName
from fpstune.spec.study import StudySpec
from fpstune.stages.candidates import KernelCandidate
from fpstune.stages.evaluation import Evaluation
from fpstune.stages.evaluators import LATENCY, KernelEvaluator
from fpstune.stages.kernel_space import KernelBucket, default_params, suggest_kernel
from fpstune.trial_attrs import BUCKET, KERNEL_STAGE, STAGE, STUDY


class KernelStage:
    """Kernel stage, one Optuna study per (mode, sparsity bucket): tile and launch config."""

    name: StageName = KERNEL_STAGE
    records_latency = True

    def __init__(self, spec: StudySpec, bucket: KernelBucket) -> None:
        self.spec = spec
        self.bucket = bucket
        self.study_name = spec.study_name(self.name, bucket.key)
        self.metric_names = [LATENCY]
        self.directions: list[Literal["minimize", "maximize"]] = ["minimize"]

    def suggest(self, trial: optuna.Trial) -> KernelCandidate:
        model = self.spec.model
        return KernelCandidate(
            suggest_kernel(trial, self.spec.kernel_space, model.head_dim, self.bucket)
        )

    def first_trials(self) -> list[tuple[dict[str, Any], str]]:
        """Measured before the sampler's picks: the runtime's default config, when the space
        holds it (a 3-trial table must never be slower than running without a policy)."""
        params = default_params(
            self.spec.kernel_space, self.spec.model.head_dim, self.bucket, self.spec.model.grid
        )
        return [(params, "runtime default")] if params else []

    def study_attrs(self) -> dict[str, Any]:
        return {STAGE: self.name, BUCKET: self.bucket.key, STUDY: self.spec.model_dump(mode="json")}

    def evaluator(self, device: torch.device, storage_url: str) -> KernelEvaluator:
        """Times the study's attention shape with the study's ``latency`` settings (every
        bucket of the stage runs the same evaluator: one worker pool serves them all)."""
        model, latency = self.spec.model, self.spec.latency
        return KernelEvaluator(
            AttentionShape.of_model(model, batch=model.batch),
            device=device,
            warmup=latency.warmup,
            reps=latency.reps,
            rotate_inputs=latency.rotate_inputs,
        )

    def constraints(self, ev: Evaluation) -> dict[str, float]:
        return {}  # constraints bound quality, which only the schedule stage measures
