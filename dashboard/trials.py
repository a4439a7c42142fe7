"""Per-trial facts: the trial's policy, its step x layer schedule and how its latency splits.

Read from what the controller stores on a COMPLETE schedule trial: the ``candidate`` user attribute
(the policy the worker evaluated) and ``details`` (the composed latency's lookups and fingerprint).
A trial without a stored policy (a hand-enqueued baseline, say) is rebuilt from its parameters.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from optuna.trial import FrozenTrial

from fpstune import __version__, trial_attrs
from fpstune.kernels import AttentionSpec, HardwareFingerprint, Mode, Policy, SpecError
from fpstune.pinning import pin_kernels
from fpstune.spec.study import StudySpec

#: how a cell is drawn: its mode and, when sparse, its sparsity
MODE_LABELS = {
    Mode.BF16_DENSE: "bf16",
    Mode.FP8_DENSE: "fp8",
    Mode.FP8_SPARSE: "fp8 sparse",
    Mode.BF16_SPARSE: "bf16 sparse",
}


@dataclass(frozen=True)
class ScheduleInfo:
    """``modes[step][layer]`` and ``sparsity[step][layer]`` (0 for dense) of one trial."""

    trial: int
    title: str
    modes: tuple[tuple[Mode, ...], ...]
    sparsity: tuple[tuple[float, ...], ...]
    #: ``AttentionSpec.describe()`` of every cell, for hover text
    specs: tuple[tuple[str, ...], ...]

    @property
    def steps(self) -> int:
        return len(self.modes)

    @property
    def layers(self) -> int:
        return len(self.modes[0]) if self.modes else 0


@dataclass(frozen=True)
class LatencyPart:
    """One distinct spec of the schedule: how many calls, at what cost each."""

    mode: str
    spec: str
    calls: int
    ms_per_call: float
    method: str

    @property
    def total_ms(self) -> float:
        return self.calls * self.ms_per_call


@dataclass(frozen=True)
class LatencyBreakdown:
    trial: int
    #: ``table`` (composed from a latency table) or ``measured``
    source: str
    #: whether the table rows were ``measured`` or ``estimated``
    row_source: str
    fingerprint: HardwareFingerprint | None
    parts: tuple[LatencyPart, ...]

    @property
    def total_ms(self) -> float:
        return sum(p.total_ms for p in self.parts)

    def by_mode(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in sorted(self.parts, key=lambda p: -p.total_ms):
            out[p.mode] = out.get(p.mode, 0.0) + p.total_ms
        return out


def trial_policy(trial: FrozenTrial, spec: StudySpec | None) -> Policy | None:
    """The policy the trial ran: the stored candidate's (a searched trial), the ``policy``
    attribute (a baseline), else rebuilt from its parameters."""
    candidate = trial.user_attrs.get(trial_attrs.CANDIDATE)
    stored = candidate.get("policy") if isinstance(candidate, dict) else None
    stored = stored or trial.user_attrs.get("policy")
    if isinstance(stored, dict):
        try:
            return Policy.from_dict(stored)
        except SpecError:
            return None
    if spec is None or not trial.params:
        return None
    from fpstune.kernels.fingerprint import current_fingerprint
    from fpstune.kernels.policy import Provenance
    from fpstune.stages.schedule_space import schedule_from_params

    try:
        return schedule_from_params(
            trial.params,
            spec.schedule_space,
            spec.model,
            hardware=current_fingerprint("cpu"),
            provenance=Provenance(
                study=spec.study_name(trial_attrs.SCHEDULE_STAGE),
                trial=trial.number if trial.number >= 0 else None,  # -1: not in a study
                # Optuna's datetimes are naive local time
                created=(trial.datetime_start or dt.datetime.now()).astimezone(dt.UTC),
                fpstune_version=__version__,
            ),
            strict=False,  # baselines are hand-written supersets of the parameters
        )
    except (ValueError, SpecError):
        return None


def schedule_info(policy: Policy, *, trial: int, title: str = "") -> ScheduleInfo:
    table = policy.spec_table()
    return ScheduleInfo(
        trial=trial,
        title=title or f"trial {trial}",
        modes=tuple(tuple(s.mode for s in row) for row in table),
        sparsity=tuple(tuple(float(s.sparsity) for s in row) for row in table),
        specs=tuple(tuple(s.describe() for s in row) for row in table),
    )


def latency_breakdown(trial: FrozenTrial) -> LatencyBreakdown | None:
    """How the trial's latency splits over its distinct specs (None when it stored no lookups)."""
    attrs = trial_attrs.evaluation_attrs(trial)
    lookups = trial_attrs.latency_lookups(attrs)
    if not lookups:
        return None
    parts = []
    for lk in lookups:
        used = AttentionSpec.from_dict(lk.get("used") or lk["requested"])
        parts.append(
            LatencyPart(
                mode=used.mode.value,
                spec=used.describe(),
                calls=int(lk["calls"]),
                ms_per_call=float(lk["median_ms"]),
                method=str(lk.get("method", "")),
            )
        )
    return LatencyBreakdown(
        trial=trial.number,
        source=trial_attrs.latency_source(attrs),
        row_source=str(attrs.get(trial_attrs.LATENCY_ROW_SOURCE, "?")),
        fingerprint=trial_attrs.latency_fingerprint(attrs),
        parts=tuple(sorted(parts, key=lambda p: -p.total_ms)),
    )


def export_preview(
    trial: FrozenTrial, policy: Policy, *, study: str, storage: str, metric_names: tuple[str, ...]
) -> Policy:
    """The policy `fpstune export --trial N` would write, before its re-measurement: kernel
    configs pinned to the ones its latency was composed from, the latency table's GPU as the
    hardware, provenance naming the trial."""
    attrs = trial_attrs.evaluation_attrs(trial)
    policy = pin_kernels(policy, trial_attrs.latency_lookups(attrs))
    if (fingerprint := trial_attrs.latency_fingerprint(attrs)) is not None:
        policy = policy.replace(hardware=fingerprint)
    return policy.with_provenance(
        {
            "study": study,
            "trial": trial.number,
            "storage": storage,
            "objectives": dict(zip(metric_names, trial.values, strict=True)),
            "latency_source": trial.user_attrs.get(trial_attrs.LATENCY_SOURCE),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "fpstune_version": __version__,
            "notes": "preview from the study; `fpstune export --trial` re-measures before shipping",
        }
    )
