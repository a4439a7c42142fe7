"""The schedule stage: a compact per-step / per-layer policy for the study's model, scored on
latency composed from kernel latencies and on quality from the study's probes."""

from __future__ import annotations

from typing import Any, Literal

import optuna
import torch

from fpstune.latency.table import stored_latency_table
from fpstune.spec.study import Stage as StageName
from fpstune.spec.study import StudySpec
from fpstune.stages.candidates import ScheduleCandidate
from fpstune.stages.evaluation import Evaluation
from fpstune.stages.evaluators import ScheduleEvaluator, build_schedule_evaluator
from fpstune.stages.schedule_space import suggest_schedule
from fpstune.trial_attrs import SCHEDULE_STAGE, STAGE, STUDY


class ScheduleStage:
    """Schedule stage: one Optuna study of policies for the study's model."""

    name: StageName = SCHEDULE_STAGE
    records_latency = False

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self.study_name = spec.study_name(self.name)
        self.metric_names = spec.metric_names
        self.directions: list[Literal["minimize", "maximize"]] = list(spec.directions)

    def suggest(self, trial: optuna.Trial) -> ScheduleCandidate:
        return ScheduleCandidate(suggest_schedule(trial, self.spec.schedule_space, self.spec.model))

    def first_trials(self) -> list[tuple[dict[str, Any], str]]:
        """With ``sampler.start_from_baselines``: the hand-set baselines' schedules that the
        space holds, evaluated before the sampler's picks, each with its ``queued_as`` label."""
        if not self.spec.sampler.start_from_baselines:
            return []
        from fpstune.baselines import baseline_params

        found = baseline_params(self.spec.schedule_space, self.spec.model.shape())
        return [(params, f"baseline {name}") for name, params in found.items()]

    def study_attrs(self) -> dict[str, Any]:
        return {STAGE: self.name, STUDY: self.spec.model_dump(mode="json")}

    def evaluator(self, device: torch.device, storage_url: str) -> ScheduleEvaluator:
        # Latencies measured by this study's kernel stage, if any; else the evaluator measures
        # (GPU) or uses the table shipped with fpstune (CPU), and labels which.
        table = stored_latency_table(storage_url)
        return build_schedule_evaluator(self.spec, device=device, latency_table=table)

    def constraints(self, ev: Evaluation) -> dict[str, float]:
        numbers = {k: float(v) for k, v in ev.attrs.items() if isinstance(v, int | float)}
        return ev.constraints or self.spec.constraint_values({**numbers, **ev.values})
