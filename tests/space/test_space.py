"""Search spaces → Optuna suggestions: feasible kernel points per bucket, schedules as policies."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fpstune.kernels import AttentionSpec, KernelConfig, Mode, Pattern, infeasibility
from fpstune.kernels.fingerprint import HardwareFingerprint
from fpstune.kernels.policy import ModelShape, Policy, Provenance
from fpstune.spec import FloatParam, IntParam, ScheduleSpace, StudySpec, load_study
from fpstune.spec.space import KernelSpace, aspect_key, tile_key
from fpstune.stages.kernel_space import (
    KernelBucket,
    feasible_kernel_points,
    kernel_buckets,
    kernel_from_params,
    suggest_kernel,
)
from fpstune.stages.schedule_space import schedule_from_params, suggest_schedule

ROOT = Path(__file__).resolve().parents[2]
MINI = load_study(ROOT / "studies" / "mini.yaml")
WAN = load_study(ROOT / "studies" / "wan2.1-t2v-14b-720p.yaml")
HW = HardwareFingerprint(
    gpu="NVIDIA H100 80GB HBM3", sm_count=132, capability=(9, 0), torch="2.11", fpstune="0.1.0"
)
PROV = Provenance(study="test", created=datetime(2026, 1, 1, tzinfo=UTC), fpstune_version="0.1.0")

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _study(spec: StudySpec, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    return optuna.create_study(directions=spec.directions, sampler=sampler or spec.sampler.build())


# -- kernel level -------------------------------------------------------------------------------


def test_kernel_buckets() -> None:
    keys = [b.key for b in kernel_buckets(MINI.kernel_space)]
    assert keys[:2] == ["bf16_dense", "fp8_dense"]
    assert keys[2:] == [
        f"fp8_sparse:{s}:{p}" for s in ("0.5", "0.75", "0.9") for p in ("window", "topk", "cdf")
    ]
    assert MINI.study_name("kernel", keys[-1]) == "mini:kernel:fp8_sparse:0.9:cdf"


@pytest.mark.parametrize("study", [MINI, WAN], ids=["mini", "wan"])
def test_feasible_points_are_exactly_the_feasible_grid(study: StudySpec) -> None:
    space, head_dim = study.kernel_space, study.model.head_dim
    points = feasible_kernel_points(space, head_dim)

    def configs(mode: Mode) -> list[KernelConfig]:
        # the kernel implementation is an fp8 knob; bf16 keeps the default
        impls = space.impl if mode.fp8 else ("triton",)
        return [
            KernelConfig(block_m=m, block_n=n, num_warps=w, num_stages=s, impl=i)
            for m, n, w, s, i in itertools.product(
                space.block_m, space.block_n, space.num_warps, space.num_stages, impls
            )
        ]

    for bucket in kernel_buckets(space):
        got = [(p.tile, p.config) for p in points if p.bucket == bucket]
        if bucket.mode is Mode.BF16_DENSE:
            assert got == [(None, None)]
            continue
        want = [
            (t, c)
            for t in space.tiles
            for c in configs(bucket.mode)
            if not infeasibility(c, tile=t, head_dim=head_dim, mode=bucket.mode)
        ]
        assert got == want and want
    # the grid really had infeasible points to remove
    grid = sum(len(space.tiles) * len(configs(b.mode)) for b in kernel_buckets(space))
    assert len(points) < grid


@pytest.mark.parametrize("study", [MINI, WAN], ids=["mini", "wan"])
def test_suggest_kernel_every_bucket(study: StudySpec) -> None:
    space, head_dim = study.kernel_space, study.model.head_dim
    for bucket in kernel_buckets(space):
        opt = optuna.create_study(sampler=study.sampler.build())
        for _ in range(12):
            trial = opt.ask()
            spec = suggest_kernel(trial, space, head_dim, bucket)
            assert (spec.mode, spec.sparsity, spec.pattern) == (
                bucket.mode,
                bucket.sparsity,
                bucket.pattern,
            )
            assert kernel_from_params(trial.params, space, head_dim, bucket) == spec
            assert AttentionSpec.from_dict(spec.to_dict()) == spec
            if bucket.mode is Mode.BF16_DENSE:
                assert trial.params == {} and spec.tile is None and spec.kernel is None
            else:
                assert spec.tile in space.tiles and spec.kernel is not None
                assert not infeasibility(
                    spec.kernel, tile=spec.tile, head_dim=head_dim, mode=spec.mode
                )
            opt.tell(trial, 1.0 + len(trial.params))


def test_config_parameter_per_tile_only_when_config_sets_differ() -> None:
    # kernel-mini: 32- and 48-token tiles cannot take 64-row blocks, so configs differ per tile.
    bucket = KernelBucket(Mode.FP8_DENSE)
    opt = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    names: set[str] = set()
    for _ in range(30):
        trial = opt.ask()
        spec = suggest_kernel(trial, MINI.kernel_space, 64, bucket)
        assert spec.tile is not None
        assert set(trial.params) == {"tile", f"config.{tile_key(spec.tile)}"}
        names |= set(trial.params)
        opt.tell(trial, 1.0)
    assert len(names) > 2
    # kernel-default: every tile is a multiple of 128 tokens, so one shared `config` parameter.
    trial = optuna.create_study().ask()
    suggest_kernel(trial, WAN.kernel_space, 128, bucket)
    assert set(trial.params) == {"tile", "config"}


def test_kernel_from_params_rejects_what_is_not_in_the_bucket() -> None:
    space, bucket = WAN.kernel_space, KernelBucket(Mode.FP8_DENSE)
    good = {"tile": "1x16x8", "config": "m128_n64_w8_s3"}
    assert kernel_from_params(good, space, 128, bucket).kernel == KernelConfig(
        block_m=128, block_n=64, num_warps=8, num_stages=3
    )
    with pytest.raises(ValueError, match="'config' is missing"):
        kernel_from_params({"tile": "1x16x8"}, space, 128, bucket)
    with pytest.raises(ValueError, match="not one of"):
        kernel_from_params({**good, "config": "m128_n128_w4_s4"}, space, 128, bucket)  # infeasible
    with pytest.raises(ValueError, match="do not belong"):
        kernel_from_params({**good, "pattern": "window"}, space, 128, bucket)
    foreign = KernelBucket(Mode.FP8_SPARSE, 0.6, Pattern(kind="window"))
    with pytest.raises(ValueError, match="not in the kernel space"):
        kernel_from_params(good, space, 128, foreign)


# -- schedule level: an oracle written cell by cell ----------------------------------------------


def _value(params: dict[str, Any], name: str, param: FloatParam | IntParam) -> Any:
    return param.fixed if param.fixed is not None else params[name]


def _oracle(
    params: dict[str, Any], space: ScheduleSpace, shape: ModelShape, step: int, layer: int
) -> AttentionSpec:
    """What (step, layer) must run, straight from the parameter definitions."""
    n, n_layers = shape.steps, shape.layers
    s1 = math.floor(_value(params, "bf16_until", space.phases.bf16_until) * n + 0.5 + 1e-9)
    s2 = math.floor(
        _value(params, "fp8_dense_until", space.phases.fp8_dense_until) * n + 0.5 + 1e-9
    )
    s1, s2 = min(s1, n), max(min(s1, n), min(s2, n))
    late = 0
    if s1 < s2:
        late = math.floor(_value(params, "bf16_late", space.phases.bf16_late) * n + 0.5 + 1e-9)
    if step < s1 or s2 - late <= step < s2:
        return AttentionSpec(mode=Mode.BF16_DENSE)
    ly, sp = space.layers, space.sparse
    tiles = {tile_key(t): t for t in sp.tile}
    tile = tiles[params["tile"]] if len(sp.tile) > 1 else sp.tile[0]
    # Every FP8 cell shares the one tile.
    dense = AttentionSpec(
        mode=Mode(ly.dense_mode), tile=tile if ly.dense_mode == "fp8_dense" else None
    )
    if step < s2:
        return AttentionSpec(mode=Mode.FP8_DENSE, tile=tile)
    first = min(_value(params, "dense_first_layers", ly.dense_first), n_layers)
    if layer < first:
        return dense
    last = min(_value(params, "dense_last_layers", ly.dense_last), n_layers - first)
    if layer >= n_layers - last:
        return dense
    split = max(i for i in range(sp.splits) if s2 + i * (n - s2) // sp.splits <= step)
    group = max(g for g in range(ly.groups) if g * n_layers // ly.groups <= layer)
    offset = _value(params, f"group_offset.{group}", ly.group_offset) if ly.groups > 1 else 0.0
    lo, hi = sp.sparsity.bounds
    sparsity = _value(params, f"sparsity.{split}", sp.sparsity) + offset
    kind = params["pattern"] if len(sp.pattern) > 1 else sp.pattern[0]
    if kind == "window":
        aspects = {aspect_key(a): a for a in sp.window}
        key = params["window"] if len(sp.window) > 1 else aspect_key(sp.window[0])
        pattern = Pattern(kind="window", window=aspects[key])
    elif kind == "cdf":
        pattern = Pattern(kind="cdf", mass=round(_value(params, "mass", sp.mass), 6))
    else:
        pattern = Pattern(kind="topk")
    return AttentionSpec(
        mode=Mode.FP8_SPARSE,
        tile=tile,
        sparsity=min(hi, max(lo, round(sparsity, 6))),
        pattern=pattern,
    )


def _check_policy(
    policy: Policy, params: dict[str, Any], space: ScheduleSpace, shape: ModelShape
) -> None:
    assert Policy.from_dict(policy.to_dict()) == policy
    assert policy.default == AttentionSpec(mode=Mode.BF16_DENSE)
    assert all(e.spec != policy.default for e in policy.entries)
    for step, layer in itertools.product(range(shape.steps), range(shape.layers)):
        assert policy.spec(layer=layer, step=step) == _oracle(params, space, shape, step, layer), (
            step,
            layer,
        )


@pytest.mark.parametrize("study", [MINI, WAN], ids=["mini", "wan"])
@pytest.mark.parametrize("sampler", ["study", "random"])
def test_suggest_schedule_gives_valid_policies(study: StudySpec, sampler: str) -> None:
    shape = study.model.shape()
    opt = _study(study, optuna.samplers.RandomSampler(seed=1) if sampler == "random" else None)
    for i in range(25 if study is MINI else 12):
        trial = opt.ask()
        policy = suggest_schedule(trial, study.schedule_space, study.model, hardware=HW)
        assert policy.provenance.trial == trial.number
        assert policy.provenance.study == opt.study_name
        rebuilt = schedule_from_params(
            trial.params,
            study.schedule_space,
            study.model,
            hardware=HW,
            provenance=policy.provenance,
        )
        assert rebuilt == policy
        assert rebuilt.to_dict() == policy.to_dict()
        _check_policy(policy, trial.params, study.schedule_space, shape)
        opt.tell(trial, [float(len(policy.entries)), float(i % 7)])


def test_suggest_schedule_builds_through_schedule_from_params(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fpstune.stages.schedule_space as schedule

    calls: list[dict[str, Any]] = []
    real = schedule.schedule_from_params

    def spy(params: Any, *args: Any, **kwargs: Any) -> Policy:
        calls.append(dict(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(schedule, "schedule_from_params", spy)
    trial = _study(MINI).ask()
    schedule.suggest_schedule(trial, MINI.schedule_space, MINI.model, hardware=HW)
    assert calls == [trial.params]


def _space(**changes: Any) -> ScheduleSpace:
    """schedule-mini with some sections replaced (dicts merge one level deep)."""
    data = MINI.schedule_space.model_dump(exclude_none=True)
    for section, value in changes.items():
        data[section] = {**data[section], **value} if isinstance(value, dict) else value
    return ScheduleSpace.model_validate(data)


def _suggest(
    space: ScheduleSpace, fixed: dict[str, Any], shape: ModelShape | None = None
) -> tuple[Policy, dict[str, Any]]:
    opt = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    opt.enqueue_trial(fixed)
    trial = opt.ask()
    policy = suggest_schedule(trial, space, shape or MINI.model.shape(), hardware=HW)
    _check_policy(policy, trial.params, space, shape or MINI.model.shape())
    return policy, trial.params


def test_no_sparse_params_without_a_sparse_phase() -> None:
    space = _space(
        phases={
            "bf16_until": {"low": 0.0, "high": 0.3, "step": 0.1},
            "fp8_dense_until": {"choices": [0.5, 1.0]},
        }
    )
    policy, params = _suggest(space, {"bf16_until": 0.2, "fp8_dense_until": 1.0})
    assert set(params) == {"bf16_until", "fp8_dense_until", "tile"}  # fp8 steps need the tile
    assert [(e.steps, e.layers, e.spec.mode) for e in policy.entries] == [
        ((2, 10), (0, 4), Mode.FP8_DENSE)
    ]
    all_bf16 = _space(
        phases={"bf16_until": {"choices": [1.0]}, "fp8_dense_until": {"choices": [1.0]}}
    )
    policy, params = _suggest(all_bf16, {})
    assert "tile" not in params  # all steps bf16: no tile to choose
    assert policy.entries == ()
    _, params = _suggest(space, {"bf16_until": 0.2, "fp8_dense_until": 0.5})
    assert {"tile", "pattern", "sparsity.0", "sparsity.1", "dense_first_layers"} <= set(params)


def test_bf16_late_takes_the_last_fp8_steps_back_to_bf16() -> None:
    space = _space(
        phases={
            "bf16_until": {"choices": [0.0]},
            "fp8_dense_until": {"choices": [0.9, 1.0]},
            "bf16_late": {"low": 0.0, "high": 1.0, "step": 0.1},
        }
    )
    policy, params = _suggest(space, {"fp8_dense_until": 1.0, "bf16_late": 0.2})
    assert set(params) == {"fp8_dense_until", "bf16_late", "tile"}
    assert [(e.steps, e.spec.mode) for e in policy.entries] == [((0, 8), Mode.FP8_DENSE)]
    assert policy.spec(layer=0, step=8).mode is Mode.BF16_DENSE
    # the late BF16 run sits just before the sparse phase
    policy, params = _suggest(space, {"fp8_dense_until": 0.9, "bf16_late": 0.3})
    modes = [policy.spec(layer=1, step=s).mode for s in range(10)]
    assert modes[:6] == [Mode.FP8_DENSE] * 6 and modes[6:9] == [Mode.BF16_DENSE] * 3
    assert modes[9] in (Mode.FP8_SPARSE, Mode.FP8_DENSE)  # layer 1: sparse unless kept dense
    # covering the whole FP8 phase leaves no FP8 step, hence no tile
    policy, params = _suggest(space, {"fp8_dense_until": 1.0, "bf16_late": 1.0})
    assert "tile" not in params and policy.entries == ()


def test_bf16_late_is_fixed_at_zero_unless_the_space_ranges_it() -> None:
    _, params = _suggest(MINI.schedule_space, {})
    assert "bf16_late" not in params


@pytest.mark.parametrize(
    ("kind", "present", "absent"),
    [
        ("window", {"window"}, {"mass"}),
        ("cdf", {"mass"}, {"window"}),
        ("topk", set(), {"window", "mass"}),
    ],
)
def test_pattern_parameters_only_for_their_pattern(
    kind: str, present: set[str], absent: set[str]
) -> None:
    policy, params = _suggest(MINI.schedule_space, {"pattern": kind})
    assert present <= set(params) and not absent & set(params)
    sparse = [e.spec for e in policy.entries if e.spec.mode is Mode.FP8_SPARSE]
    assert sparse and all(s.pattern is not None and s.pattern.kind == kind for s in sparse)


def test_all_layers_dense_leaves_nothing_sparse_to_choose() -> None:
    space = _space(layers={"dense_first": {"low": 0, "high": 4}})
    policy, params = _suggest(space, {"dense_first_layers": 4, "fp8_dense_until": 0.3})
    assert "dense_last_layers" not in params
    assert not {k for k in params if k.startswith(("sparsity", "group_offset"))}
    assert not {"pattern", "window", "mass"} & set(params)
    assert all(e.spec.mode is Mode.FP8_DENSE for e in policy.entries)
    assert {e.spec.tile for e in policy.entries} == {
        tuple(int(x) for x in params["tile"].split("x"))
    }
    s1 = round(params["bf16_until"] * 10)  # fp8 phase and all-dense sparse phase merge
    assert [(e.steps, e.layers) for e in policy.entries] == [((s1, 10), (0, 4))]


def test_splits_without_steps_have_no_sparsity_parameter() -> None:
    space = _space(sparse={"splits": 4})
    _, params = _suggest(space, {"bf16_until": 0.0, "fp8_dense_until": 0.6})  # 4 sparse steps
    assert {k for k in params if k.startswith("sparsity")} == {f"sparsity.{i}" for i in range(4)}
    shape = MINI.model.shape().model_copy(update={"steps": 10})
    space = _space(
        sparse={"splits": 4},
        phases={"fp8_dense_until": {"choices": [0.8]}, "bf16_until": {"choices": [0.0]}},
    )
    _, params = _suggest(space, {}, shape)  # sparse steps 8, 9: runs [8,8) [8,9) [9,9) [9,10)
    assert {k for k in params if k.startswith("sparsity")} == {"sparsity.1", "sparsity.3"}


def test_group_offsets_only_for_groups_with_sparse_layers() -> None:
    space = _space(layers={"dense_first": {"low": 0, "high": 2}})
    _, params = _suggest(space, {"dense_first_layers": 2, "dense_last_layers": 0})
    assert {k for k in params if k.startswith("group_offset")} == {"group_offset.1"}
    _, params = _suggest(space, {"dense_first_layers": 0, "dense_last_layers": 0})
    assert {k for k in params if k.startswith("group_offset")} == {
        "group_offset.0",
        "group_offset.1",
    }
    _, params = _suggest(_space(layers={"groups": 1}), {})
    assert not {k for k in params if k.startswith("group_offset")}


def test_fixed_parameters_are_never_suggested() -> None:
    space = _space(sparse={"pattern": ["topk"], "tile": [[1, 4, 8]], "sparsity": 0.75})
    _, params = _suggest(space, {})
    assert not {"pattern", "tile", "sparsity.0", "sparsity.1"} & set(params)


def test_a_schedule_by_hand() -> None:
    params = {
        "bf16_until": 0.2,  # steps 0, 1 bf16
        "fp8_dense_until": 0.4,  # steps 2, 3 fp8 dense
        "dense_first_layers": 1,
        "dense_last_layers": 0,
        "sparsity.0": 0.6,  # steps 4-6
        "sparsity.1": 0.8,  # steps 7-9
        "pattern": "window",
        "window": "2x1x1",
        "tile": "1x4x16",
        "group_offset.0": -0.1,  # layers 0, 1 (layer 0 dense)
        "group_offset.1": 0.1,  # layers 2, 3
    }
    policy = schedule_from_params(
        params, MINI.schedule_space, MINI.model, hardware=HW, provenance=PROV
    )

    def sparse(s: float) -> AttentionSpec:
        return AttentionSpec(
            mode=Mode.FP8_SPARSE,
            tile=(1, 4, 16),
            sparsity=s,
            pattern=Pattern(kind="window", window=(2.0, 1.0, 1.0)),
        )

    fp8 = AttentionSpec(mode=Mode.FP8_DENSE, tile=(1, 4, 16))  # the one shared tile
    assert [(e.steps, e.layers, e.spec) for e in policy.entries] == [
        ((2, 4), (0, 4), fp8),
        ((4, 7), (0, 1), fp8),
        ((4, 7), (1, 2), sparse(0.5)),
        ((4, 7), (2, 4), sparse(0.7)),
        ((7, 10), (0, 1), fp8),
        ((7, 10), (1, 2), sparse(0.7)),
        ((7, 10), (2, 4), sparse(0.9)),  # 0.8 + 0.1, within the range's 0.9
    ]
    # equal runs merge: with equal sparsities both halves of the sparse phase share entries
    same = {**params, "sparsity.1": 0.6}
    merged = schedule_from_params(
        same, MINI.schedule_space, MINI.model, hardware=HW, provenance=PROV
    )
    assert [(e.steps, e.layers) for e in merged.entries] == [
        ((2, 4), (0, 4)),
        ((4, 10), (0, 1)),
        ((4, 10), (1, 2)),
        ((4, 10), (2, 4)),
    ]
    # offsets clip to the sparsity range
    high = {**params, "sparsity.1": 0.9}
    clipped = schedule_from_params(
        high, MINI.schedule_space, MINI.model, hardware=HW, provenance=PROV
    )
    assert clipped.spec(layer=3, step=9).sparsity == 0.9


def test_schedule_from_params_rejects_bad_params() -> None:
    space, model = MINI.schedule_space, MINI.model
    params = {"bf16_until": 0.0, "fp8_dense_until": 1.0, "tile": "1x4x8"}
    fixed_end = _space(phases={"fp8_dense_until": {"choices": [1.0]}})
    assert schedule_from_params(
        {"bf16_until": 0.1, "tile": "1x4x8"}, fixed_end, model, hardware=HW, provenance=PROV
    ).entries[0].steps == (1, 10)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"bf16_until": 0.1}, "'fp8_dense_until' is missing"),
        ({"bf16_until": 0.0, "fp8_dense_until": 0.5}, "'tile' is missing"),
        ({**params, "bf16_until": 0.35}, "outside its space"),  # off the 0.1 grid
        ({**params, "bf16_until": 0.9}, "outside its space"),
        ({**params, "bf16_until": "0.1"}, "not a number"),
        (
            {"bf16_until": 0.0, "fp8_dense_until": 0.5, "tile": "1x4x8", "dense_first_layers": 1.0},
            "not an integer",
        ),
    ]
    for bad, says in cases:
        with pytest.raises(ValueError, match=says):
            schedule_from_params(bad, space, model, hardware=HW, provenance=PROV)
    no_sparse_phase = {"bf16_until": 0.1, "tile": "1x4x8", "pattern": "topk"}
    with pytest.raises(ValueError, match="do not apply"):
        schedule_from_params(no_sparse_phase, fixed_end, model, hardware=HW, provenance=PROV)
    lenient = schedule_from_params(
        no_sparse_phase,
        fixed_end,
        model,
        hardware=HW,
        provenance=PROV,
        strict=False,
    )
    assert lenient.entries[0].steps == (1, 10)


def test_boundaries_round_half_up_without_float_noise() -> None:
    shape = ModelShape(name="m", heads=1, head_dim=64, layers=2, grid=(1, 4, 8), steps=50, cfg=2)
    space = _space(
        phases={"bf16_until": {"choices": [0.1]}, "fp8_dense_until": {"choices": [0.29, 0.31]}}
    )
    for b2, s2 in ((0.29, 15), (0.31, 16)):  # 14.5 rounds up to 15; 15.5 to 16
        p = schedule_from_params(
            {"fp8_dense_until": b2, **_any_sparse()},
            space,
            shape,
            hardware=HW,
            provenance=PROV,
            strict=False,
        )
        assert p.entries[0].steps == (5, s2)  # 0.1 * 50 is 5 exactly


def _any_sparse() -> dict[str, Any]:
    return {
        "dense_first_layers": 0,
        "dense_last_layers": 0,
        "sparsity.0": 0.5,
        "sparsity.1": 0.5,
        "pattern": "topk",
        "tile": "1x4x8",
        "group_offset.0": 0.0,
        "group_offset.1": 0.0,
    }


# -- property-based: any in-range parameters give a valid policy that matches the oracle ---------

EDGE = ScheduleSpace.model_validate(
    {
        "kind": "schedule",
        "phases": {
            "bf16_until": {"low": 0.0, "high": 1.0, "step": 0.25},
            "fp8_dense_until": [0.0, 0.5, 1.0],
        },
        "sparse": {
            "splits": 3,
            "sparsity": {"low": 0.3, "high": 0.95},
            "pattern": ["window", "topk", "cdf"],
            "window": [[1, 1, 1], [0.5, 2, 1]],
            "mass": {"low": 0.5, "high": 1.0},
            "tile": [[1, 2, 3], [2, 2, 2]],
        },
        "layers": {
            "dense_first": {"low": 0, "high": 5},
            "dense_last": [0, 2, 7],
            "dense_mode": "bf16_dense",
            "groups": 5,
            "group_offset": {"low": -0.2, "high": 0.2},
        },
    }
)
SPACES = [MINI.schedule_space, WAN.schedule_space, EDGE]
Case = tuple[ScheduleSpace, ModelShape, dict[str, Any]]


def _values(param: FloatParam | IntParam) -> st.SearchStrategy[Any]:
    if param.choices is not None:
        return st.sampled_from(param.choices)
    low, high, step = param.low, param.high, param.step
    assert low is not None and high is not None
    if isinstance(param, IntParam):
        ilow, ihigh, istep = int(low), int(high), param.step or 1
        return st.integers(0, (ihigh - ilow) // istep).map(lambda k: ilow + k * istep)
    if step is None:
        return st.floats(low, high, allow_nan=False)
    return st.integers(0, round((high - low) / step)).map(lambda k: low + k * step)


@st.composite
def _case(draw: st.DrawFn) -> Case:
    space = draw(st.sampled_from(SPACES))
    shape = ModelShape(
        name="m",
        heads=2,
        head_dim=64,
        layers=draw(st.integers(1, 48)),
        grid=(2, 4, 8),
        steps=draw(st.integers(1, 60)),
        cfg=draw(st.integers(1, 2)),
    )
    sp, ly = space.sparse, space.layers
    params: dict[str, Any] = {
        "bf16_until": draw(_values(space.phases.bf16_until)),
        "fp8_dense_until": draw(_values(space.phases.fp8_dense_until)),
        "dense_first_layers": draw(_values(ly.dense_first)),
        "dense_last_layers": draw(_values(ly.dense_last)),
        "pattern": draw(st.sampled_from(sp.pattern)),
        "window": draw(st.sampled_from([aspect_key(a) for a in sp.window])),
        "mass": draw(_values(sp.mass)),
        "tile": draw(st.sampled_from([tile_key(t) for t in sp.tile])),
    }
    for i in range(sp.splits):
        params[f"sparsity.{i}"] = draw(_values(sp.sparsity))
    for g in range(ly.groups):
        params[f"group_offset.{g}"] = draw(_values(ly.group_offset))
    return space, shape, params


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_any_in_range_params_give_a_valid_policy(case: Case) -> None:
    space, shape, params = case
    policy = schedule_from_params(params, space, shape, hardware=HW, provenance=PROV, strict=False)
    _check_policy(policy, params, space, shape)


def test_kernel_buckets_with_head_dim_checks_feasibility() -> None:
    from fpstune.spec import BadInput

    assert kernel_buckets(MINI.kernel_space, 64) == kernel_buckets(MINI.kernel_space)
    with pytest.raises(BadInput, match=r"kernel-mini\.yaml: kernel space is empty"):
        kernel_buckets(MINI.kernel_space, 96)


def test_kernel_stage_measures_the_runtime_default_first() -> None:
    from fpstune.kernels.config import default_config, default_tile
    from fpstune.stages.kernel import KernelStage
    from fpstune.stages.kernel_space import kernel_buckets, kernel_from_params

    model = WAN.model
    for bucket in kernel_buckets(WAN.kernel_space, model.head_dim):
        first = KernelStage(WAN, bucket).first_trials()
        if bucket.mode is Mode.BF16_DENSE:
            assert first == []  # SDPA: nothing to choose
            continue
        ((params, label),) = first
        assert label == "runtime default"
        spec = kernel_from_params(params, WAN.kernel_space, model.head_dim, bucket)
        tile = default_tile(model.grid)
        assert spec.tile == tile
        assert spec.kernel == default_config(tile, model.head_dim, bucket.mode)
    # a space without the default has nothing to measure first
    fp8 = next(b for b in kernel_buckets(MINI.kernel_space, 64) if b.mode is Mode.FP8_DENSE)
    assert KernelStage(MINI, fp8).first_trials() == []


def test_removed_exp2_knob_is_refused_in_a_kernel_space() -> None:
    """``exp2`` (packed fp16 exponentials) left the kernels: a kernel space naming it is refused
    at the key, like any unknown key."""
    d = WAN.kernel_space.model_dump(mode="json")
    with pytest.raises(ValidationError, match="exp2"):
        KernelSpace.model_validate({**d, "exp2": ["f32", "f16x2"]})


@pytest.mark.parametrize(
    ("impl", "stages", "suffix"),
    [
        ("gluon", {(64, 128, 4): {3, 4, 5}}, "_gl"),
        # 128x256: two 128-key blocks per step, a stage holds both (64 KB): at most 3 stages
        ("gluon_ws", {(128, 128, 8): {2, 3, 4, 5}, (128, 256, 8): {2, 3}}, "_glws"),
    ],
)
def test_impl_knob_adds_the_gluon_kernels_feasible_fp8_configs(
    impl: str, stages: dict[tuple[int, int, int], set[int]], suffix: str
) -> None:
    """``impl: [triton, <impl>]``: each fp8 tile gains that Gluon kernel's configs the
    feasibility check accepts (its block shapes, enough stages, the shared memory; keys
    ``..._gl`` / ``..._glws``), bf16 gains none, and a Gluon config survives the spec's round
    trip through a policy dict."""
    base = WAN.kernel_space.model_copy(update={"impl": ("triton",)})
    both = base.model_copy(update={"impl": ("triton", impl)})
    for mode in Mode:
        one = [p for p in feasible_kernel_points(base, 128) if p.bucket.mode is mode]
        two = [p for p in feasible_kernel_points(both, 128) if p.bucket.mode is mode]
        gluon = [p.config for p in two if p.config and p.config.impl == impl]
        if not mode.fp8:
            assert two == one and gluon == []
            continue
        tiles = {p.tile for p in one}
        per_bucket = len({(p.bucket, p.tile) for p in one}) // len(tiles)
        assert len(gluon) == len(tiles) * per_bucket * sum(len(s) for s in stages.values())
        found: dict[tuple[int, int, int], set[int]] = {}
        for c in gluon:
            found.setdefault((c.block_m, c.block_n, c.num_warps), set()).add(c.num_stages)
        assert found == stages
        assert all(c.key.endswith(suffix) for c in gluon)
        spec = AttentionSpec(mode=mode, tile=(1, 8, 16), kernel=gluon[-1], **(
            {"sparsity": 0.9, "pattern": {"kind": "window"}} if mode.sparse else {}))  # fmt: skip
        assert AttentionSpec.from_dict(spec.to_dict()) == spec


def test_default_knobs_are_left_out_of_stored_configs() -> None:
    """Configs stored before the knobs (latency-table keys, policy YAML) keep their form."""
    k = KernelConfig(block_m=64, block_n=128, num_warps=4, num_stages=5)
    assert k.model_dump() == {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 5}
    assert KernelConfig.model_validate({**k.model_dump(), "knobs": {}}) == k
