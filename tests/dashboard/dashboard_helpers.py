"""Studies for the dashboard tests: hand-made points, and a mini schedule study whose trials
carry what the controller stores (policy, composed latency, constraints), built in a second.

The realistic study's latencies are composed from the H100 table shipped with fpstune (real
figures); its quality is a stand-in computed from the schedule (``quality_source`` says so), so
the study builds without running the quality probe (seconds per trial on 2 CPU cores).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from fpstune.kernels import Policy
from fpstune.latency.compose import compose
from fpstune.latency.shipped import packaged_table, shipped_tables
from fpstune.spec.study import StudySpec, load_study
from fpstune.stages.candidates import ScheduleCandidate
from fpstune.stages.schedule import ScheduleStage

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "studies" / "mini.yaml"
BASELINES = ("fp8_dense_all", "fpsattention_3phase")


def hand_made(
    points: Sequence[tuple[float, float]],
    *,
    infeasible: Sequence[int] = (),
    baselines: dict[int, str] | None = None,
    failed: int = 0,
    directions: Sequence[Literal["minimize", "maximize"]] = ("minimize", "minimize"),
) -> optuna.Study:
    """An in-memory study with one COMPLETE trial per point (trial number = index), constraint
    values > 0 for ``infeasible`` indices, ``baseline`` user attrs, then ``failed`` FAIL trials."""
    study = optuna.create_study(directions=list(directions))
    study.set_metric_names(["latency_ms", "rel_l2" if directions[1] == "minimize" else "psnr"])
    baselines = baselines or {}
    for i, values in enumerate(points):
        c = 0.05 if i in infeasible else -0.05
        study.add_trial(
            optuna.create_trial(
                values=list(values),
                constraints={"rel_l2": c},
                system_attrs={"constraints": [c]},
                user_attrs={"baseline": baselines[i]} if i in baselines else {},
            )
        )
    for _ in range(failed):
        study.add_trial(optuna.create_trial(state=TrialState.FAIL))
    return study


def stand_in_rel_l2(policy: Policy) -> float:
    """Test-only quality: error grows with FP8 and with sparsity (not a measurement)."""
    cells = [s for row in policy.spec_table() for s in row]
    err = [
        0.0 if not s.mode.fp8 else 0.03 + (0.3 * s.sparsity**2 if s.mode.sparse else 0)
        for s in cells
    ]
    return sum(err) / len(err)


def mini_study(url: str, *, trials: int = 14, seed: int = 0) -> optuna.Study:
    """A ``mini:schedule`` study as the controller leaves it, plus the two `BASELINES` and one
    FAIL trial. Some trials are infeasible (rel_l2 above the study's 0.1 bound)."""
    spec = load_study(MINI)
    source = ScheduleStage(spec)
    table = packaged_table(shipped_tables()[0])
    fingerprint = table.fingerprints()[0]
    study = optuna.create_study(
        study_name=source.study_name,
        storage=url,
        directions=source.directions,
        sampler=optuna.samplers.RandomSampler(seed=seed),
    )
    study.set_metric_names(source.metric_names)
    for key, value in source.study_attrs().items():
        study.set_user_attr(key, value)
    for _ in range(trials):
        trial = study.ask()
        policy = source.suggest(trial).policy
        _record(study, trial, spec, policy, table, fingerprint)
    for name, policy in _baseline_policies(spec).items():
        values, attrs, cons = _evaluate(spec, policy, table, fingerprint)
        study.add_trial(
            optuna.create_trial(
                values=values,
                # as `fpstune baselines` stores them: the policy as its own attribute
                user_attrs={
                    **{k: v for k, v in attrs.items() if k != "candidate"},
                    "policy": policy.to_dict(),
                    "baseline": name,
                },
                constraints=cons,
                system_attrs={"constraints": list(cons.values())},
            )
        )
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    return study


def _record(
    study: optuna.Study,
    trial: optuna.Trial,
    spec: StudySpec,
    policy: Policy,
    table: Any,
    fingerprint: Any,
) -> None:
    """What the controller writes for a finished evaluation, then tell."""
    values, attrs, cons = _evaluate(spec, policy, table, fingerprint)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    for name, value in cons.items():
        trial.set_constraint(name, value)
    study._storage.set_trial_system_attr(trial._trial_id, "constraints", list(cons.values()))
    study.tell(trial, values)


def _evaluate(
    spec: StudySpec, policy: Policy, table: Any, fingerprint: Any
) -> tuple[list[float], dict[str, Any], dict[str, float]]:
    latency = compose(policy, table, fingerprint=fingerprint, batch=spec.model.batch)
    rel = stand_in_rel_l2(policy)
    la = latency.attrs()
    attrs = {
        "latency_source": la.pop("latency_source"),
        "latency_row_source": la.pop("latency_row_source"),
        "quality_source": "test stand-in",
        "details": la,
        "candidate": ScheduleCandidate(policy).to_attr(),
    }
    cons = spec.constraint_values({"rel_l2": rel})
    return [latency.total_ms, rel], attrs, cons


def _baseline_policies(spec: StudySpec) -> dict[str, Policy]:
    """Two of `fpstune.baselines`' hand-set schedules, written out here so the test does not
    run their evaluator: every cell FP8 dense; BF16, FP8 dense, FP8 75 % window-sparse."""
    shape = spec.model.shape().model_dump(mode="json")
    steps, layers = spec.model.steps, spec.model.layers
    tile = [1, 4, 8]
    fp8 = {"mode": "fp8_dense", "tile": tile}
    sparse = {"mode": "fp8_sparse", "tile": tile, "sparsity": 0.75, "pattern": {"kind": "window"}}
    base = {
        "schema_version": 1,
        "model": shape,
        "hardware": {
            "gpu": "cpu",
            "sm_count": 0,
            "capability": [0, 0],
            "torch": "t",
            "fpstune": "t",
        },
        "default": {"mode": "bf16_dense"},
    }
    s1, s2 = steps // 5, steps // 2
    return {
        "fp8_dense_all": Policy.from_dict(
            {**base, "entries": [{"steps": [0, steps], "layers": [0, layers], "spec": fp8}]}
        ),
        "fpsattention_3phase": Policy.from_dict(
            {
                **base,
                "entries": [
                    {"steps": [s1, s2], "layers": [0, layers], "spec": fp8},
                    {"steps": [s2, steps], "layers": [0, layers], "spec": sparse},
                ],
            }
        ),
    }
