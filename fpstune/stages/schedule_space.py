"""Schedule-level search: a few compact parameters → a `Policy` over every (step, layer).

With ``n`` denoising steps and ``L`` layers, a schedule is decided by (Optuna parameter names):

- ``bf16_until``, ``fp8_dense_until``: phase boundaries as fractions of ``n``. Steps
  ``[0, s1)`` run bf16_dense (the policy's default), ``[s1, s2)`` fp8_dense and ``[s2, n)`` the
  sparse phase, with ``s1 = round(bf16_until · n)``, ``s2 = max(s1, round(fp8_dense_until · n))``
  (halves round up).
- ``bf16_late`` (only when ``s1 < s2``): the FP8 phase's last ``round(bf16_late · n)`` steps run
  bf16_dense instead (never before ``s1``).
- ``tile``: a tile key (``2x8x8``), when some step runs FP8: the one 3D tile that every FP8 step
  and layer uses, for its quantisation scales and, when sparse, its blocks (FPSAttention's
  shared granularity).

Only when the sparse phase is not empty:

- ``dense_first_layers``, ``dense_last_layers``: layers that run the space's ``dense_mode`` (default
  fp8_dense) in the sparse phase; ``dense_last_layers`` only when some layer is left after the
  first ones.

Only when, in addition, some layer is sparse:

- ``sparsity.<i>``: sparsity of run ``i`` of the sparse phase, cut into ``splits`` equal runs of
  steps (a run with no step has no parameter);
- ``pattern`` and, for the window pattern, ``window`` (an aspect key such as ``1x2x2``) or, for
  cdf, ``mass``;
- ``group_offset.<g>``: when the layers are cut into more than one group, each group with at least
  one sparse layer adds this offset to the run's sparsity (clipped to the sparsity range).

A parameter whose space allows one value only is fixed, never suggested. `suggest_schedule`
suggests exactly the parameters that apply and builds the policy with `schedule_from_params`,
which is pure: the trial's ``params`` rebuild the same policy at export time. `phase_params`
goes the other way for plain phase schedules (the hand-set baselines): the parameters that
rebuild one exactly, when the space holds them.

Policies are canonical: entries are non-overlapping, adjacent layers with the same spec share an
entry, adjacent step runs with the same layer plan share an entry, and nothing equal to the
default (bf16_dense) is written as an entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import fpstune
from fpstune.kernels import AttentionSpec, Mode, Pattern
from fpstune.kernels.fingerprint import HardwareFingerprint, current_fingerprint
from fpstune.kernels.policy import ModelShape, Policy, PolicyEntry, Provenance
from fpstune.spec.space import FloatParam, IntParam, ScheduleSpace, aspect_key, tile_key

if TYPE_CHECKING:
    import optuna

    from fpstune.spec.study import ModelSpec

DEFAULT_SPEC = AttentionSpec(mode=Mode.BF16_DENSE)
_DECIMALS = 6  # sparsities and masses are rounded so float noise from the sampler never leaks


def suggest_schedule(
    trial: optuna.Trial,
    space: ScheduleSpace,
    model: ModelShape | ModelSpec,
    *,
    hardware: HardwareFingerprint | None = None,
) -> Policy:
    """Suggest the parameters that apply and return the trial's policy.

    ``hardware`` defaults to this machine's fingerprint; the provenance names the trial's study
    and number. Export re-measures and rebuilds with `schedule_from_params`.
    """
    _decide(_TrialDraw(trial), space, _shape(model))
    provenance = Provenance(
        study=trial.study.study_name,
        trial=trial.number,
        created=datetime.now(UTC),
        fpstune_version=fpstune.__version__,
    )
    return schedule_from_params(
        trial.params,
        space,
        model,
        hardware=hardware or current_fingerprint(),
        provenance=provenance,
    )


def schedule_from_params(
    params: Mapping[str, Any],
    space: ScheduleSpace,
    model: ModelShape | ModelSpec,
    *,
    hardware: HardwareFingerprint,
    provenance: Provenance,
    strict: bool = True,
) -> Policy:
    """The policy these parameters describe (pure). Raises ValueError for a missing parameter or
    a value outside the space, and, when ``strict``, for a parameter that does not apply (a
    hand-written superset, as baselines use, needs ``strict=False``)."""
    shape = _shape(model)
    draw = _ParamsDraw(params)
    plan = _decide(draw, space, shape)
    extra = sorted(set(params) - draw.used)
    if extra and strict:
        raise ValueError(f"parameters {extra} do not apply to this schedule")
    return Policy(
        model=shape,
        hardware=hardware,
        provenance=provenance,
        default=DEFAULT_SPEC,
        entries=_entries(plan, shape),
    )


def phase_params(
    space: ScheduleSpace,
    model: ModelShape | ModelSpec,
    *,
    bf16_steps: int,
    fp8_until: int,
    sparse: AttentionSpec | None,
    tile: tuple[int, int, int],
) -> dict[str, Any] | None:
    """Parameters that rebuild the plain phase schedule — BF16 dense on steps ``[0, bf16_steps)``,
    FP8 dense with ``tile`` on ``[bf16_steps, fp8_until)``, then ``sparse`` (an fp8_sparse spec
    on ``tile``; None: nothing after ``fp8_until``) on every layer — or None when the space
    cannot express it exactly (a boundary off its grid, a tile, sparsity or pattern it lacks, a
    fixed non-zero offset...). The result is checked by rebuilding it."""
    shape = _shape(model)
    n, sp, ly = shape.steps, space.sparse, space.layers
    s1, s2 = bf16_steps, max(bf16_steps, fp8_until)
    phase3 = None if sparse is None else sparse.model_copy(update={"tile": tile})
    params: dict[str, Any] = {
        "bf16_until": _fraction_for(space.phases.bf16_until, n, lambda v: v == s1),
        "fp8_dense_until": _fraction_for(
            space.phases.fp8_dense_until, n, lambda v: max(s1, v) == s2
        ),
        "bf16_late": _fraction_for(space.phases.bf16_late, n, lambda v: v == 0),
        "tile": tile_key(tile),
        "dense_first_layers": 0,
        "dense_last_layers": 0,
    }
    if phase3 is not None:
        pattern = phase3.pattern or Pattern(kind="window")
        params |= {f"sparsity.{i}": phase3.sparsity for i in range(sp.splits)}
        params |= {f"group_offset.{g}": 0.0 for g in range(ly.groups)}
        params["pattern"] = pattern.kind
        params["window"] = aspect_key(pattern.window)
        params["mass"] = pattern.mass
    expected = [(0, s1, (DEFAULT_SPEC,) * shape.layers)]
    fp8 = AttentionSpec(mode=Mode.FP8_DENSE, tile=tile)
    expected.append((s1, s2, (fp8,) * shape.layers))
    if s2 < n:
        if phase3 is None:
            return None
        expected.append((s2, n, (phase3,) * shape.layers))
    draw = _ParamsDraw({k: v for k, v in params.items() if v is not None})
    try:
        plan = _decide(draw, space, shape)
    except ValueError:
        return None  # a value the space does not hold
    runs = tuple((a, b, specs) for a, b, specs in expected if a < b)
    if _entries(plan, shape) != _entries(_Plan(runs), shape):
        return None
    return {k: params[k] for k in params if k in draw.used}


def _fraction_for(param: FloatParam, steps: int, accept: Any) -> float | None:
    """A value of ``param`` whose step index (`_step_index`) ``accept`` takes, or None."""
    if param.fixed is not None:
        values: list[float] = [float(param.fixed)]
    elif param.choices is not None:
        values = [float(c) for c in param.choices]
    else:
        assert param.low is not None and param.high is not None
        if param.step is None:
            values = [k / steps for k in range(steps + 1) if param.contains(k / steps)]
        else:
            count = math.floor((param.high - param.low) / param.step + 1e-9)
            values = [round(param.low + k * param.step, _DECIMALS) for k in range(count + 1)]
    return next((v for v in values if accept(_step_index(v, steps))), None)


# -- deciding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Resolved decisions: step runs with their per-layer specs, in step order."""

    runs: tuple[tuple[int, int, tuple[AttentionSpec, ...]], ...]


class _Draw(Protocol):
    def real(self, name: str, param: FloatParam) -> float: ...
    def integer(self, name: str, param: IntParam) -> int: ...
    def choice(self, name: str, keys: list[str]) -> str: ...


def _decide(draw: _Draw, space: ScheduleSpace, shape: ModelShape) -> _Plan:
    """All of the schedule's logic; ``draw`` either suggests (a trial) or reads (params)."""
    n, n_layers = shape.steps, shape.layers
    s1 = _step_index(draw.real("bf16_until", space.phases.bf16_until), n)
    s2 = max(s1, _step_index(draw.real("fp8_dense_until", space.phases.fp8_dense_until), n))
    runs: list[tuple[int, int, tuple[AttentionSpec, ...]]] = []
    if s1 >= n:
        return _Plan(())
    # The FP8 phase's last steps may run BF16 again: [s1, s_late) FP8, [s_late, s2) BF16.
    s_late = s2
    if s1 < s2:
        late = _step_index(draw.real("bf16_late", space.phases.bf16_late), n)
        s_late = max(s1, s2 - late)
    if s_late <= s1 and s2 >= n:
        return _Plan(())  # no FP8 step at all: BF16 dense everywhere, no tile to choose
    # One 3D tile for every FP8 step and layer: quantisation scales and sparse blocks share it.
    sp = space.sparse
    tiles = {tile_key(t): t for t in sp.tile}
    tile = tiles[draw.choice("tile", list(tiles))]
    fp8 = AttentionSpec(mode=Mode.FP8_DENSE, tile=tile)
    if s1 < s_late:
        runs.append((s1, s_late, (fp8,) * n_layers))
    if s2 >= n:
        return _Plan(tuple(runs))

    ly = space.layers
    dense = fp8 if ly.dense_mode == Mode.FP8_DENSE.value else AttentionSpec(mode=Mode.BF16_DENSE)
    first = min(draw.integer("dense_first_layers", ly.dense_first), n_layers)
    last = 0
    if first < n_layers:
        last = min(draw.integer("dense_last_layers", ly.dense_last), n_layers - first)
    sparse_layers = range(first, n_layers - last)
    if not sparse_layers:
        runs.append((s2, n, (dense,) * n_layers))
        return _Plan(tuple(runs))

    splits = [
        (s2 + i * (n - s2) // sp.splits, s2 + (i + 1) * (n - s2) // sp.splits)
        for i in range(sp.splits)
    ]
    sparsity = {
        i: draw.real(f"sparsity.{i}", sp.sparsity) for i, (a, b) in enumerate(splits) if a < b
    }
    pattern = _pattern(draw, space)
    groups = _groups(n_layers, ly.groups)
    offsets = [0.0] * len(groups)
    if len(groups) > 1:
        for g, (a, b) in enumerate(groups):
            if a < b and max(a, first) < min(b, n_layers - last):  # a sparse layer in the group
                offsets[g] = draw.real(f"group_offset.{g}", ly.group_offset)

    lo, hi = sp.sparsity.bounds
    group_of = [g for g, (a, b) in enumerate(groups) for _ in range(a, b)]
    for i, (a, b) in enumerate(splits):
        if a >= b:
            continue
        specs = tuple(
            AttentionSpec(
                mode=Mode.FP8_SPARSE,
                tile=tile,
                sparsity=min(hi, max(lo, round(sparsity[i] + offsets[group_of[layer]], _DECIMALS))),
                pattern=pattern,
            )
            if layer in sparse_layers
            else dense
            for layer in range(n_layers)
        )
        runs.append((a, b, specs))
    return _Plan(tuple(runs))


def _pattern(draw: _Draw, space: ScheduleSpace) -> Pattern:
    sp = space.sparse
    kind = draw.choice("pattern", list(sp.pattern))
    if kind == "window":
        aspects = {aspect_key(a): a for a in sp.window}
        return Pattern(kind="window", window=aspects[draw.choice("window", list(aspects))])
    if kind == "cdf":
        return Pattern(kind="cdf", mass=round(draw.real("mass", sp.mass), _DECIMALS))
    return Pattern(kind="topk")


def _step_index(fraction: float, steps: int) -> int:
    """round(fraction · steps), halves up, robust to float noise (0.1 · 50 is 5, not 4)."""
    return min(steps, max(0, math.floor(fraction * steps + 0.5 + 1e-9)))


def _groups(n_layers: int, groups: int) -> list[tuple[int, int]]:
    """``groups`` contiguous layer ranges of near-equal size (empty ones when groups > layers)."""
    return [(g * n_layers // groups, (g + 1) * n_layers // groups) for g in range(groups)]


def _entries(plan: _Plan, shape: ModelShape) -> tuple[PolicyEntry, ...]:
    merged: list[tuple[int, int, tuple[AttentionSpec, ...]]] = []
    for a, b, specs in plan.runs:
        if merged and merged[-1][1] == a and merged[-1][2] == specs:
            merged[-1] = (merged[-1][0], b, specs)
        else:
            merged.append((a, b, specs))
    entries: list[PolicyEntry] = []
    for a, b, specs in merged:
        start = 0
        for layer in range(1, shape.layers + 1):
            if layer == shape.layers or specs[layer] != specs[start]:
                if specs[start] != DEFAULT_SPEC:
                    entries.append(
                        PolicyEntry(steps=(a, b), layers=(start, layer), spec=specs[start])
                    )
                start = layer
    return tuple(entries)


def _shape(model: ModelShape | ModelSpec) -> ModelShape:
    return model if isinstance(model, ModelShape) else model.shape()


# -- drawing values -----------------------------------------------------------------------------


class _TrialDraw:
    """Suggests through an Optuna trial; fixed parameters are not suggested."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def real(self, name: str, param: FloatParam) -> float:
        if param.fixed is not None:
            return float(param.fixed)
        if param.choices is not None:
            return float(self.trial.suggest_categorical(name, list(param.choices)))
        assert param.low is not None and param.high is not None
        return self.trial.suggest_float(name, param.low, param.high, step=param.step)

    def integer(self, name: str, param: IntParam) -> int:
        if param.fixed is not None:
            return int(param.fixed)
        if param.choices is not None:
            return int(self.trial.suggest_categorical(name, list(param.choices)))
        assert param.low is not None and param.high is not None
        return self.trial.suggest_int(name, param.low, param.high, step=param.step or 1)

    def choice(self, name: str, keys: list[str]) -> str:
        if len(keys) == 1:
            return keys[0]
        return str(self.trial.suggest_categorical(name, keys))


class _ParamsDraw:
    """Reads values from a params mapping, checking each against the space."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params
        self.used: set[str] = set()

    def _get(self, name: str) -> Any:
        if name not in self.params:
            raise ValueError(f"parameter {name!r} is missing")
        self.used.add(name)
        return self.params[name]

    def real(self, name: str, param: FloatParam) -> float:
        if param.fixed is not None:
            return float(param.fixed)
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"parameter {name}={value!r} is not a number")
        if not param.contains(float(value)):
            raise ValueError(f"parameter {name}={value!r} is outside its space")
        return float(value)

    def integer(self, name: str, param: IntParam) -> int:
        if param.fixed is not None:
            return int(param.fixed)
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"parameter {name}={value!r} is not an integer")
        if not param.contains(value):
            raise ValueError(f"parameter {name}={value!r} is outside its space")
        return value

    def choice(self, name: str, keys: list[str]) -> str:
        if len(keys) == 1:
            return keys[0]
        value = self._get(name)
        if value not in keys:
            raise ValueError(f"parameter {name}={value!r} is not one of {keys}")
        return str(value)
