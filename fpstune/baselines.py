"""Hand-set schedules the search must beat, scored with the study's own evaluator.

- ``fp8_dense_all``: every step and layer FP8 dense.
- ``fpsattention_3phase``: an FPSAttention-like hand-set schedule: the first 20 % of steps BF16
  dense (layout forms), then FP8 dense to 50 %, then FP8 + a 3D-window at 75 % sparsity.
- ``sta_window``: STA-like: the first 25 % of steps dense (BF16), then a fixed 3D window at 90 %
  sparsity (STA runs its window in BF16; fpstune's sparse kernels are FP8, so FP8 here).
- ``ditfastattn_greedy``: DiTFastAttn-style plan: per step and layer, the most aggressive option
  (window 90 / 75 / 50 %, then FP8 dense, then BF16 dense) whose attention output stays within
  ``threshold`` relative L2 of BF16 dense on that cell's Q/K/V along the reference trajectory.

`add_baselines` evaluates each through the study's `ScheduleEvaluator` (same latency accounting
and quality probes as every trial) and stores it as a COMPLETE trial with the user attribute
``baseline`` = its name, so the dashboard and reports show it beside the front; the search budget
does not count them. Re-running skips baselines already stored.

`baseline_params` gives the three hand-set schedules as schedule-space parameters where the space
holds them exactly; with ``sampler.start_from_baselines`` the search evaluates those first, so
its front starts at the baselines and can only move past them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import torch

from fpstune import trial_attrs
from fpstune.errors import BadInput
from fpstune.kernels import AttentionSpec, Mode, attention, default_tile
from fpstune.kernels.fingerprint import current_fingerprint
from fpstune.kernels.policy import ModelShape, Policy, PolicyEntry
from fpstune.quality.calibration import CalibrationSet
from fpstune.run.trial_writes import constraint_system_attrs, user_attrs_of
from fpstune.spec.space import ScheduleSpace
from fpstune.stages.schedule_space import phase_params

NAMES = ("fp8_dense_all", "fpsattention_3phase", "sta_window", "ditfastattn_greedy")
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)
FP8 = AttentionSpec(mode=Mode.FP8_DENSE)


def window(sparsity: float) -> AttentionSpec:
    return AttentionSpec.from_dict(
        {"mode": "fp8_sparse", "sparsity": sparsity, "pattern": {"kind": "window"}}
    )


GREEDY_OPTIONS = (window(0.9), window(0.75), window(0.5), FP8, BF16)

Cells = Mapping[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


Phases = tuple[tuple[float, AttentionSpec], ...]

#: The hand-set schedules: (fraction of the steps where the phase ends, spec), in step order.
PHASES: dict[str, Phases] = {
    "fp8_dense_all": ((1.0, FP8),),
    "fpsattention_3phase": ((0.2, BF16), (0.5, FP8), (1.0, window(0.75))),
    "sta_window": ((0.25, BF16), (1.0, window(0.9))),
}


def _runs(steps: int, phases: Phases) -> list[tuple[int, int, AttentionSpec]]:
    """(start, stop, spec) of each phase; a phase ends at ``ceil(end · steps)``."""
    runs, start = [], 0
    for i, (end, spec) in enumerate(phases):
        stop = steps if i == len(phases) - 1 else max(start, min(steps, math.ceil(end * steps)))
        runs.append((start, stop, spec))
        start = stop
    return runs


def _phases(model: ModelShape, hardware: Any, phases: Phases) -> Policy:
    """The policy of ``phases``; the last phase is the default."""
    entries = [
        PolicyEntry(steps=(a, b), layers=(0, model.layers), spec=spec)
        for a, b, spec in _runs(model.steps, phases)[:-1]
        if b > a
    ]
    return Policy(model=model, hardware=hardware, default=phases[-1][1], entries=tuple(entries))


def fixed_baselines(model: ModelShape, hardware: Any) -> dict[str, Policy]:
    """The three hand-set schedules (no data needed)."""
    return {name: _phases(model, hardware, phases) for name, phases in PHASES.items()}


def baseline_params(space: ScheduleSpace, model: ModelShape) -> dict[str, dict[str, Any]]:
    """The hand-set schedules that ``space`` expresses exactly, as its parameters (what
    ``study.enqueue_trial`` takes). Their FP8 steps use the runtime's default tile for the
    model's grid, so the space's tiles must include it."""
    tile = default_tile(model.grid)
    out = {}
    for name, phases in PHASES.items():
        runs = {spec.mode: (a, b) for a, b, spec in _runs(model.steps, phases)}
        bf16 = runs.get(Mode.BF16_DENSE, (0, 0))[1]
        fp8_until = runs.get(Mode.FP8_DENSE, (bf16, bf16))[1]
        sparse = next((spec for _, spec in phases if spec.mode is Mode.FP8_SPARSE), None)
        params = phase_params(
            space, model, bf16_steps=bf16, fp8_until=fp8_until, sparse=sparse, tile=tile
        )
        if params is not None:
            out[name] = params
    return out


def greedy_plan(
    model: ModelShape,
    hardware: Any,
    cells: Cells,
    *,
    grid: tuple[int, int, int],
    threshold: float = 0.05,
    options: tuple[AttentionSpec, ...] = GREEDY_OPTIONS,
) -> tuple[Policy, dict[str, Any]]:
    """DiTFastAttn-style greedy plan from the Q/K/V of every (layer, step) cell."""
    entries, chosen = [], {}
    for (layer, step), (q, k, v) in sorted(cells.items()):
        ref = attention(q, k, v, grid=grid, spec=BF16).float()
        pick = options[-1]
        for spec in options:
            out = attention(q, k, v, grid=grid, spec=spec).float()
            err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            if err <= threshold:
                pick = spec
                break
        chosen[f"{layer},{step}"] = pick.describe()
        if pick != BF16:
            entries.append(
                PolicyEntry(steps=(step, step + 1), layers=(layer, layer + 1), spec=pick)
            )
    policy = Policy(model=model, hardware=hardware, default=BF16, entries=tuple(entries))
    return policy, {"threshold": threshold, "cells": chosen}


def reference_cells(
    probe: Any,
) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Q/K/V of every self-attention call of the BF16-dense reference run of an
    `EndToEndProbe` (its transformer, seeds and sampling)."""
    from fpstune.models.loop import denoise

    cells: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def keep(layer: int, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        cells[(layer, step)] = (q.detach().clone(), k.detach().clone(), v.detach().clone())

    router = probe.router
    router.reset()
    router.policy, router.observer, tracking = None, keep, router.track_errors
    router.track_errors = False
    try:
        denoise(probe.transformer, router, probe.conditions, probe.sampling)
    finally:
        router.observer, router.track_errors = None, tracking
    return cells


def add_baselines(
    study: optuna.Study,
    evaluator: Any,
    policies: Mapping[str, Policy],
    *,
    metric_names: list[str],
    notes: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate and store each baseline as a marked COMPLETE trial (skipping stored ones);
    returns name -> objective values."""
    from fpstune.stages.candidates import ScheduleCandidate

    stored = baseline_values(study, metric_names)
    out: dict[str, dict[str, float]] = {}
    for name, policy in policies.items():
        if name in stored:
            out[name] = stored[name]
            continue
        ev = evaluator.evaluate(ScheduleCandidate(policy))
        attrs = dict(ev.attrs)
        if notes and name in notes:
            attrs["baseline_notes"] = notes[name]
        user: dict[str, Any] = {
            "baseline": name,
            "policy": policy.to_dict(),
            **user_attrs_of(attrs),
        }
        if ev.constraints:
            user["constraints"] = ev.constraints
        trial = optuna.trial.create_trial(
            values=[ev.values[m] for m in metric_names],
            user_attrs=user,
            system_attrs=constraint_system_attrs(ev.constraints) if ev.constraints else {},
        )
        study.add_trial(trial)
        out[name] = {m: ev.values[m] for m in metric_names}
    return out


def calibration_cells(
    cal: CalibrationSet, study_file: str | Path
) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every cell's q, k, v for the greedy plan, which scores whole attention outputs: a set
    that holds only sampled query rows (`fpstune capture --max-tokens`) is refused in one line."""
    if cal.query_index is not None:
        raise BadInput(
            f"{study_file}: calibration.source: the greedy baseline scores every query row; this "
            f"set holds {cal.meta.queries} of {cal.meta.tokens} (captured with --max-tokens)"
        )
    return {cell: cal.qkv(*cell) for cell in cal.cells}


def run_baselines(
    study_file: str | Path,
    *,
    storage_url: str,
    threshold: float = 0.05,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """`fpstune baselines`: evaluate the four baselines with the study's schedule evaluator and
    store them in its schedule study (created if the search has not run yet)."""
    from fpstune.quality.e2e import EndToEndProbe
    from fpstune.quality.probe import AttentionProbe
    from fpstune.spec import load_study
    from fpstune.stages.evaluators import build_schedule_evaluator
    from fpstune.storage import open_storage, retry_db

    spec = load_study(study_file)
    storage = open_storage(storage_url)
    name = spec.study_name(trial_attrs.SCHEDULE_STAGE)
    stored = retry_db(lambda: _stored_baselines(storage, name, spec.metric_names))
    if set(NAMES) <= stored.keys():
        return {n: stored[n] for n in NAMES}  # stored once: nothing to evaluate
    evaluator = build_schedule_evaluator(spec, device=device)
    model = spec.model.shape()
    hardware = current_fingerprint()
    policies: dict[str, Policy] = fixed_baselines(model, hardware)
    notes = {}
    if "ditfastattn_greedy" not in stored:
        e2e = [p for p in evaluator.probes if isinstance(p, EndToEndProbe)]
        if e2e:
            cells = reference_cells(e2e[0])
        else:
            probe = next(p for p in evaluator.probes if isinstance(p, AttentionProbe))
            cells = calibration_cells(probe.calibration, study_file)
        greedy, notes["ditfastattn_greedy"] = greedy_plan(
            model, hardware, cells, grid=model.grid, threshold=threshold
        )
        policies["ditfastattn_greedy"] = greedy
    study = retry_db(
        lambda: optuna.create_study(
            study_name=name,
            storage=storage,
            directions=list(spec.directions),
            load_if_exists=True,
        )
    )
    study.set_metric_names(spec.metric_names)
    return add_baselines(
        study,
        evaluator,
        policies,
        metric_names=spec.metric_names,
        notes=notes,
    ) | {n: stored[n] for n in stored.keys() - policies.keys()}


def baseline_values(study: optuna.Study, metric_names: list[str]) -> dict[str, dict[str, float]]:
    """name -> objective values of the baselines ``study`` holds."""
    return {
        t.user_attrs["baseline"]: dict(zip(metric_names, t.values or [], strict=False))
        for t in study.get_trials(deepcopy=False)
        if "baseline" in t.user_attrs
    }


def _stored_baselines(
    storage: optuna.storages.BaseStorage, study_name: str, metric_names: list[str]
) -> dict[str, dict[str, float]]:
    """The baselines ``study_name`` holds already (none when the study does not exist yet)."""
    if study_name not in optuna.get_all_study_names(storage):
        return {}
    return baseline_values(optuna.load_study(study_name=study_name, storage=storage), metric_names)


__all__ = [
    "GREEDY_OPTIONS",
    "NAMES",
    "PHASES",
    "add_baselines",
    "baseline_params",
    "baseline_values",
    "calibration_cells",
    "fixed_baselines",
    "greedy_plan",
    "reference_cells",
    "run_baselines",
]
