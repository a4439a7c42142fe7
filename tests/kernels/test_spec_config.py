"""AttentionSpec (what a policy entry holds) and kernel configs (defaults, feasibility)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fpstune.kernels import (
    AttentionSpec,
    DeviceLimits,
    InfeasibleConfig,
    KernelConfig,
    Mode,
    SpecError,
    TileLayout,
    check_feasible,
    default_config,
    default_tile,
    infeasibility,
)
from fpstune.kernels.config import _DEFAULT_TILE_CANDIDATES, feasible_configs, smem_bytes

SPARSE = {"mode": "fp8_sparse", "sparsity": 0.5, "pattern": {"kind": "window"}}

# ---------------------------------------------------------------- spec round trip

patterns = st.fixed_dictionaries(
    {"kind": st.sampled_from(["window", "topk", "cdf"])},
    optional={
        "window": st.tuples(*[st.floats(0.25, 4.0)] * 3),
        "mass": st.floats(0.05, 1.0),
    },
)
kernels = st.fixed_dictionaries(
    {"block_m": st.sampled_from([16, 32, 64, 128]), "block_n": st.sampled_from([16, 32, 64, 128])},
    optional={"num_warps": st.sampled_from([1, 2, 4, 8, 16]), "num_stages": st.integers(1, 8)},
)
tiles = st.tuples(st.integers(1, 8), st.integers(1, 16), st.integers(1, 16))


@st.composite
def spec_dicts(draw):
    mode = draw(st.sampled_from([m.value for m in Mode]))
    d = {"mode": mode}
    if Mode(mode).sparse:
        d["sparsity"] = draw(st.floats(0.0, 0.99))
        d["pattern"] = draw(patterns)
    if draw(st.booleans()):
        d["tile"] = list(draw(tiles))
    if draw(st.booleans()):
        d["kernel"] = draw(kernels)
    return d


@given(d=spec_dicts())
@settings(max_examples=150, deadline=None)
def test_from_dict_round_trips_to_dict(d):
    spec = AttentionSpec.from_dict(d)
    out = spec.to_dict()
    assert AttentionSpec.from_dict(out) == spec
    # What to_dict gives is plain data: it goes into JSON and YAML and comes back the same.
    assert AttentionSpec.from_dict(json.loads(json.dumps(out))) == spec
    assert AttentionSpec.from_dict(yaml.safe_load(yaml.safe_dump(out))) == spec
    # Every field given survives with its value.
    assert out["mode"] == d["mode"]
    if "tile" in d:
        assert out["tile"] == d["tile"]
    if "kernel" in d:
        assert {k: out["kernel"][k] for k in d["kernel"]} == d["kernel"]
    if "pattern" in d:
        assert out["pattern"]["kind"] == d["pattern"]["kind"]
        assert out["sparsity"] == d["sparsity"]


def test_defaults_and_mode_properties():
    spec = AttentionSpec.from_dict({"mode": "bf16_dense"})
    assert spec.mode is Mode.BF16_DENSE
    assert (spec.tile, spec.sparsity, spec.pattern, spec.kernel) == (None, 0.0, None, None)
    assert spec.to_dict() == {"mode": "bf16_dense", "sparsity": 0.0}
    sparse = AttentionSpec.from_dict(SPARSE)
    assert sparse.pattern.window == (1.0, 1.0, 1.0) and sparse.pattern.mass == 0.95
    assert [(m.fp8, m.sparse) for m in Mode] == [
        (False, False),
        (True, False),
        (True, True),
        (False, True),
    ]
    kc = KernelConfig(block_m=64, block_n=64)
    assert (kc.num_warps, kc.num_stages) == (8, 2)


def test_spec_is_frozen_and_hashable():
    spec = AttentionSpec.from_dict(SPARSE)
    with pytest.raises(ValidationError):
        spec.sparsity = 0.9
    assert hash(spec) == hash(AttentionSpec.from_dict(SPARSE))


# ---------------------------------------------------------------- spec refusals


def with_(base: dict, **changes) -> dict:
    return {**base, **changes}


KERNEL = {"block_m": 64, "block_n": 64}
BAD_SPECS = [
    (with_(SPARSE, kernel={"block_m": 0, "block_n": 64}), "kernel.block_m"),
    (with_(SPARSE, kernel={"block_m": "big", "block_n": 64}), "kernel.block_m"),
    (with_(SPARSE, kernel={"block_m": 64}), "kernel.block_n"),
    (with_(SPARSE, kernel={**KERNEL, "num_warps": 3}), "kernel.num_warps"),
    (with_(SPARSE, kernel={**KERNEL, "num_stages": 0}), "kernel.num_stages"),
    (with_(SPARSE, kernel={**KERNEL, "num_stages": 9}), "kernel.num_stages"),
    (with_(SPARSE, kernel={**KERNEL, "block_k": 64}), "kernel.block_k"),
    (with_(SPARSE, pattern={"kind": "diagonal"}), "pattern.kind"),
    (with_(SPARSE, pattern={"kind": 3}), "pattern.kind"),
    (with_(SPARSE, pattern={"kind": "cdf", "mass": 0.0}), "pattern.mass"),
    (with_(SPARSE, pattern={"kind": "cdf", "mass": 1.5}), "pattern.mass"),
    (with_(SPARSE, pattern={"kind": "window", "windw": [1, 1, 1]}), "pattern.windw"),
    (with_(SPARSE, pattern={"kind": "window", "window": [1, 0, 1]}), "pattern.window"),
    (with_(SPARSE, pattern={"kind": "window", "window": [1, 1]}), "pattern.window.2"),
    (with_(SPARSE, sparsity=1.0), "sparsity"),
    (with_(SPARSE, sparsity=-0.1), "sparsity"),
    (with_(SPARSE, sparsity="half"), "sparsity"),
    (with_(SPARSE, tyle=[1, 16, 8]), "tyle"),
    (with_(SPARSE, tile=[1, 16]), "tile.2"),  # the missing third size
    (with_(SPARSE, tile=[0, 16, 8]), "tile"),
    (with_(SPARSE, tile="1x16x8"), "tile"),
    (with_(SPARSE, mode="fp16_dense"), "mode"),
    ({"sparsity": 0.5}, "mode"),
    ({"mode": "bf16_dense", "sparsity": 0.5}, "sparsity"),
    ({"mode": "fp8_dense", "pattern": {"kind": "window"}}, "pattern"),
    ({"mode": "fp8_sparse", "sparsity": 0.5}, "pattern"),
    ({"mode": "bf16_sparse"}, "pattern"),
]


@pytest.mark.parametrize(("d", "field"), BAD_SPECS, ids=[f for _, f in BAD_SPECS])
def test_bad_spec_names_the_field(d, field):
    with pytest.raises(SpecError) as e:
        AttentionSpec.from_dict(d)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ")
    assert e.value.message
    assert isinstance(e.value, ValueError)


def test_unknown_key_says_so():
    with pytest.raises(SpecError) as e:
        AttentionSpec.from_dict(with_(SPARSE, tyle=[1, 16, 8]))
    assert e.value.message == "unknown key"


def test_dense_with_sparsity_message():
    with pytest.raises(SpecError, match="takes no sparsity or pattern"):
        AttentionSpec.from_dict({"mode": "fp8_dense", "sparsity": 0.3})
    with pytest.raises(SpecError, match="needs a pattern"):
        AttentionSpec.from_dict({"mode": "bf16_sparse", "sparsity": 0.3})


# ---------------------------------------------------------------- default tile


def brute_force_default_tile(grid):
    best = None
    for i, t in enumerate(_DEFAULT_TILE_CANDIDATES):
        padded = math.prod(math.ceil(g / s) for g, s in zip(grid, t, strict=True)) * math.prod(t)
        if best is None or (padded, i) < best[:2]:
            best = (padded, i, t)
    return best[2]


def test_default_candidates_are_128_token_tiles():
    assert len(set(_DEFAULT_TILE_CANDIDATES)) == len(_DEFAULT_TILE_CANDIDATES)
    assert all(math.prod(t) == 128 for t in _DEFAULT_TILE_CANDIDATES)


@given(grid=st.tuples(st.integers(1, 30), st.integers(1, 60), st.integers(1, 90)))
@settings(max_examples=200, deadline=None)
def test_default_tile_has_least_padding(grid):
    tile = default_tile(grid)
    assert tile == brute_force_default_tile(grid)
    padded = TileLayout(grid, tile).padded_tokens
    assert all(padded <= TileLayout(grid, t).padded_tokens for t in _DEFAULT_TILE_CANDIDATES)


def test_default_tile_on_wan_grids_and_ties():
    assert default_tile((21, 30, 52)) == (2, 16, 4)  # 286 tiles; (1, 16, 8) would need 294
    assert default_tile((21, 45, 80)) == (1, 8, 16)  # 21 x 6 x 5 tiles, ties with (1, 16, 8)
    # Every candidate divides (4, 16, 32) exactly: the first candidate wins the tie.
    assert default_tile((4, 16, 32)) == _DEFAULT_TILE_CANDIDATES[0]


# ---------------------------------------------------------------- default config / feasibility

CHECKED_TILES = [*_DEFAULT_TILE_CANDIDATES, (2, 8, 8), (4, 8, 8), (6, 8, 8), (1, 16, 16)]
NON_DENSE_BF16 = [Mode.FP8_DENSE, Mode.FP8_SPARSE, Mode.BF16_SPARSE]


@pytest.mark.parametrize("mode", NON_DENSE_BF16, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tile", CHECKED_TILES, ids=str)
def test_default_config_is_feasible(tile, head_dim, mode):
    config = default_config(tile, head_dim, mode)
    assert infeasibility(config, tile=tile, head_dim=head_dim, mode=mode) == []
    check_feasible(config, tile=tile, head_dim=head_dim, mode=mode)
    tokens = math.prod(tile)
    assert tokens % config.block_m == 0 and tokens % config.block_n == 0


def test_smem_bytes_by_hand():
    c = KernelConfig(block_m=128, block_n=64, num_stages=3)
    # Q once (128 x 128), K and V per stage (2 x 64 x 128 x 3); 1 byte in fp8, 2 in bf16.
    assert smem_bytes(c, 128, Mode.FP8_DENSE) == 128 * 128 + 2 * 64 * 128 * 3
    assert smem_bytes(c, 128, Mode.BF16_SPARSE) == 2 * (128 * 128 + 2 * 64 * 128 * 3)


def reasons_for(tile=(1, 16, 8), head_dim=128, mode=Mode.FP8_DENSE, limits=None, **kernel):
    config = KernelConfig(**{"block_m": 64, "block_n": 64, **kernel})
    kw = {} if limits is None else {"limits": limits}
    return infeasibility(config, tile=tile, head_dim=head_dim, mode=mode, **kw)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            {"tile": (1, 8, 6), "block_m": 32, "block_n": 16, "mode": Mode.BF16_SPARSE},
            "block_m=32 does not divide the tile's 48 tokens",
        ),
        ({"tile": (1, 4, 8), "block_m": 32, "block_n": 16}, "fp8 P·V needs block_n >= 32"),
        ({"tile": (1, 8, 6), "block_m": 16, "block_n": 32}, "block_n=32 does not divide"),
        ({"block_n": 48}, "block_n=48 is not a power of two"),
        ({"block_m": 8}, "block_m=8 is not a power of two >= 16"),
        ({"head_dim": 96}, "head_dim=96 is not 64 or 128"),
        (
            {"mode": Mode.BF16_SPARSE, "tile": (2, 16, 8), "block_n": 256, "num_stages": 4},
            "shared memory",
        ),
        ({"tile": (2, 16, 8), "block_m": 256, "block_n": 256, "num_warps": 4}, "registers"),
        ({"limits": DeviceLimits(capability=(8, 0))}, "compute capability >= 8.9"),
    ],
)
def test_infeasibility_reasons(case, expected):
    reasons = reasons_for(**case)
    assert len(reasons) == 1, reasons
    assert expected in reasons[0]


def test_fp8_fine_on_ada_and_bf16_fine_on_ampere():
    assert reasons_for(limits=DeviceLimits(capability=(8, 9))) == []
    assert reasons_for(mode=Mode.BF16_SPARSE, limits=DeviceLimits(capability=(8, 0))) == []


def test_shared_memory_limit_is_the_devices():
    # 64x128 Q + 2 x 64x128 x 2 stages = 40 KiB in fp8: fits 227 KiB, not a 32 KiB part.
    assert reasons_for(num_stages=2) == []
    small = DeviceLimits(smem_per_block=32 * 1024)
    assert any("shared memory" in r for r in reasons_for(num_stages=2, limits=small))


def test_check_feasible_raises_with_every_reason():
    config = KernelConfig(block_m=48, block_n=32)
    with pytest.raises(InfeasibleConfig) as e:
        check_feasible(config, tile=(1, 8, 6), head_dim=96, mode=Mode.FP8_DENSE)
    msg = str(e.value)
    assert msg.startswith("kernel: ")
    assert "block_m=48 is not a power of two" in msg and "head_dim=96" in msg
    assert "block_n=32 does not divide the tile's 48 tokens" in msg
    assert isinstance(e.value, ValueError)


def test_feasible_configs_filters():
    good = KernelConfig(block_m=64, block_n=64)
    bad = KernelConfig(block_m=48, block_n=64)
    huge = KernelConfig(block_m=128, block_n=128, num_stages=8)
    kept = feasible_configs([good, bad, huge], tile=(1, 16, 8), head_dim=128, mode=Mode.BF16_SPARSE)
    assert kept == [good]


GLUON = {"block_n": 128, "num_warps": 4, "num_stages": 3, "impl": "gluon"}
GLUON_WS = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2, "impl": "gluon_ws"}
GLUON_WS_PAIRS = {**GLUON_WS, "block_n": 256}  # two 128-key blocks per softmax step


@pytest.mark.parametrize(
    ("base", "case", "expected"),
    [
        (GLUON, {"mode": Mode.BF16_SPARSE}, "impl=gluon runs the fp8 modes only, not bf16_sparse"),
        (GLUON, {"block_n": 64}, "impl=gluon needs block_m=64, block_n=128, num_warps=4"),
        (GLUON, {"num_warps": 8}, "impl=gluon needs block_m=64, block_n=128, num_warps=4"),
        (GLUON, {"head_dim": 64}, "impl=gluon needs head_dim=128, got 64"),
        (GLUON, {"num_stages": 2}, "impl=gluon needs num_stages >= 3, got 2"),
        (GLUON, {"limits": DeviceLimits(capability=(8, 9))}, "impl=gluon needs an sm_90 GPU"),
        (GLUON, {"limits": DeviceLimits(capability=(10, 0))}, "impl=gluon needs an sm_90 GPU"),
        (GLUON_WS, {"mode": Mode.BF16_DENSE}, "impl=gluon_ws runs the fp8 modes only"),
        (GLUON_WS, {"block_m": 64}, "impl=gluon_ws needs block_m=128, block_n=128, num_warps=8"),
        (GLUON_WS, {"block_n": 64}, "impl=gluon_ws needs block_m=128, block_n=128, num_warps=8"),
        (GLUON_WS, {"num_stages": 1}, "impl=gluon_ws needs num_stages >= 2, got 1"),
        (GLUON_WS, {"num_stages": 7}, "needs 245760 B of shared memory"),  # 16 KB + 7 x 32 KB
        (GLUON_WS, {"head_dim": 64}, "impl=gluon_ws needs head_dim=128, got 64"),
        (GLUON_WS, {"limits": DeviceLimits(capability=(10, 0))}, "impl=gluon_ws needs an sm_90"),
        (GLUON_WS_PAIRS, {"block_m": 64}, "or block_m=128, block_n=256, num_warps=8"),
        (GLUON_WS_PAIRS, {"num_stages": 1}, "impl=gluon_ws needs num_stages >= 2, got 1"),
        (GLUON_WS_PAIRS, {"num_stages": 4}, "needs 278528 B of shared memory"),  # 16 + 4 x 64 KB
        (GLUON_WS_PAIRS, {"impl": "triton"}, "block_n=256 does not divide the tile's 128 tokens"),
    ],
)
def test_gluon_kernel_feasibility(base, case, expected):
    """What `gluon_attention`'s kernels are written for; anything else is refused before a
    launch, each for its one reason."""
    case = dict(case)
    mode = case.pop("mode", Mode.FP8_DENSE)
    head_dim = case.pop("head_dim", 128)
    limits = case.pop("limits", None)
    kw = {} if limits is None else {"limits": limits}
    reasons = reasons_for(tile=(1, 8, 16), mode=mode, head_dim=head_dim, **{**base, **case}, **kw)
    assert len(reasons) == 1, reasons
    assert expected in reasons[0]
    least = base["num_stages"]
    most = {id(GLUON): 6, id(GLUON_WS): 6, id(GLUON_WS_PAIRS): 3}[id(base)]
    for stages in range(least, most + 1):  # and what it is written for passes (shared memory)
        ok = reasons_for(tile=(1, 8, 16), **{**base, "num_stages": stages})
        assert ok == [], ok


def test_gluon_config_is_stored_marked_and_the_default_left_out():
    """``impl`` joins the stored form only when it is not the default, so configs written before
    the knob keep their latency-table keys and policy YAML."""
    triton = KernelConfig(block_m=64, block_n=128, num_warps=4, num_stages=3)
    gluon = KernelConfig(block_m=64, block_n=128, num_warps=4, num_stages=3, impl="gluon")
    assert "impl" not in triton.model_dump() and triton.key == "m64_n128_w4_s3"
    assert gluon.model_dump()["impl"] == "gluon" and gluon.key == "m64_n128_w4_s3_gl"
    assert KernelConfig.model_validate(gluon.model_dump()) == gluon != triton
    ws = KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=4, impl="gluon_ws")
    assert ws.model_dump()["impl"] == "gluon_ws" and ws.key == "m128_n128_w8_s4_glws"
    pairs = KernelConfig.model_validate({**GLUON_WS_PAIRS, "num_stages": 3})
    assert pairs.key == "m128_n256_w8_s3_glws"
    with pytest.raises(ValidationError, match="impl"):
        KernelConfig(block_m=64, block_n=128, impl="cuda")


def test_gluon_kernel_refuses_a_cpu_tensor_with_one_line():
    """Off the GPU (no Gluon interpreter) the runtime says so instead of failing in a compiler."""
    import torch

    from fpstune.kernels.dispatch import attend
    from fpstune.kernels.patterns import KvList
    from fpstune.kernels.prepare import Prepared

    layout = TileLayout((1, 8, 16), (1, 8, 16))
    spec = AttentionSpec.from_dict({"mode": "fp8_dense", "tile": (1, 8, 16)})
    x = torch.zeros(1, 128, 128, dtype=torch.float8_e4m3fn)
    one = torch.ones(1, 1, 1, dtype=torch.int32)
    prep = Prepared(x, x, x, None, None, None, None, KvList(one, one, one), layout, spec,
                    (1, 1, 128, 128), torch.zeros(128))  # fmt: skip
    with pytest.raises(ValueError, match="impl=gluon runs on a CUDA"):
        attend(prep, **{"block_m": 64, **GLUON}, scale=128**-0.5, out_dtype=torch.bfloat16)
    # V prepared in the Gluon kernels' key order is refused by the Triton kernel, not misread.
    gluon_prep = dataclasses.replace(prep, impl="gluon")
    with pytest.raises(ValueError, match="V was prepared for impl=gluon"):
        attend(gluon_prep, block_m=64, block_n=128, num_warps=4, num_stages=3,
               scale=128**-0.5, out_dtype=torch.bfloat16)  # fmt: skip
