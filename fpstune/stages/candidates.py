"""What a trial evaluates: one frozen candidate type per stage, sent to a worker through Ray and
stored with the trial (``candidate`` attribute) in the dict form studies have always held."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fpstune.kernels import AttentionSpec, SpecError
from fpstune.kernels.policy import Policy
from fpstune.spec.study import Stage as StageName
from fpstune.stages.evaluation import CandidateError
from fpstune.trial_attrs import KERNEL_STAGE, SCHEDULE_STAGE


def _check_stored(stored: Mapping[str, Any], stage: StageName, key: str) -> Any:
    if stored.get("stage") != stage or key not in stored:
        raise CandidateError(
            f"expected a {stage} candidate {{'stage': '{stage}', '{key}': ...}}, got keys "
            f"{sorted(stored)} with stage {stored.get('stage')!r}"
        )
    return stored[key]


@dataclass(frozen=True)
class KernelCandidate:
    """One attention call's spec to time (kernel stage)."""

    stage: ClassVar[StageName] = KERNEL_STAGE
    spec: AttentionSpec

    def to_attr(self) -> dict[str, Any]:
        return {"stage": self.stage, "spec": self.spec.to_dict()}

    @classmethod
    def from_attr(cls, stored: Mapping[str, Any]) -> KernelCandidate:
        """A stored ``candidate`` attribute; `CandidateError` when it is not a kernel's."""
        try:
            return cls(AttentionSpec.from_dict(_check_stored(stored, cls.stage, "spec")))
        except SpecError as e:
            raise CandidateError(f"spec: {e}") from None


@dataclass(frozen=True)
class ScheduleCandidate:
    """One policy to score (schedule stage)."""

    stage: ClassVar[StageName] = SCHEDULE_STAGE
    policy: Policy

    def to_attr(self) -> dict[str, Any]:
        return {"stage": self.stage, "policy": self.policy.to_dict()}

    @classmethod
    def from_attr(cls, stored: Mapping[str, Any]) -> ScheduleCandidate:
        """A stored ``candidate`` attribute; `CandidateError` when it is not a schedule's."""
        try:
            return cls(Policy.from_dict(_check_stored(stored, cls.stage, "policy")))
        except SpecError as e:
            raise CandidateError(f"policy: {e}") from None
