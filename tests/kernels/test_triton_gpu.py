"""The Triton kernels on a CUDA GPU: FlashAttention's rule against an fp64 truth, per mode.

Every check draws fresh inputs, poisons the output with NaN first, and judges the Triton output
by the error of the same-precision PyTorch reference against the same fp64 truth (fp8 modes: the
truth is unquantised attention with the same block mask). Run on the GPU machine with
``pytest -m gpu tests/kernels/test_triton_gpu.py``.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch
from test_triton_interpret import (
    block_mismatch,
    expected_nan_rows,
    fa_errors,
    fa_rule_failure,
    make_qkv,
    nan_failure,
    run_joint_case,
    wan_rope_tables,
)

from fpstune.kernels import (
    AttentionSpec,
    KernelConfig,
    TileLayout,
    attention,
    check_feasible,
    default_config,
    default_tile,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODES: dict[str, dict[str, Any]] = {
    "fp8_dense": {"mode": "fp8_dense"},
    "fp8_window": {"mode": "fp8_sparse", "pattern": {"kind": "window"}, "sparsity": 0.6},
    "fp8_topk": {"mode": "fp8_sparse", "pattern": {"kind": "topk"}, "sparsity": 0.75},
    "fp8_cdf": {"mode": "fp8_sparse", "pattern": {"kind": "cdf", "mass": 0.9}, "sparsity": 0.7},
    "bf16_window": {"mode": "bf16_sparse", "pattern": {"kind": "window"}, "sparsity": 0.5},
    "bf16_topk": {"mode": "bf16_sparse", "pattern": {"kind": "topk"}, "sparsity": 0.6},
}
GRIDS = [(5, 9, 13), (7, 15, 26)]  # odd; the second is Wan 480p (21x30x52) at a third per axis
SHAPE_BH = (2, 3)


def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _check(
    spec_d: dict[str, Any],
    grid: tuple[int, int, int],
    head_dim: int,
    kind: str,
    *,
    tile: tuple[int, int, int] | None = None,
    config: KernelConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    rope: bool = False,
) -> None:
    """``rope``: the pre-pass rotates q and k (random Wan-style tables); the truth and the
    reference take them rotated in fp32 and rounded to the input dtype."""
    from fpstune.kernels.dispatch import attend
    from fpstune.kernels.prepare import prepare
    from fpstune.kernels.rope import rotary

    tile = tile or default_tile(grid)
    spec = AttentionSpec.from_dict({**spec_d, "tile": tile})
    config = config or default_config(tile, head_dim, spec.mode)
    check_feasible(config, tile=tile, head_dim=head_dim, mode=spec.mode)
    layout = TileLayout(grid, tile)
    shape = (*SHAPE_BH, layout.tokens, head_dim)
    gen = _gen(spec_d, grid, head_dim, kind, rope)
    q, k, v = make_qkv(shape, grid, kind, dtype, gen, "cuda")
    tables = None
    if rope:
        cos, sin = wan_rope_tables(layout.tokens, head_dim, gen)
        tables = (cos.cuda(), sin.cuda())
    prep = prepare(q, k, v, layout=layout, spec=spec, impl=config.impl, rope=tables)
    if tables is not None:  # the pooled means see the fp32 rotation, the rule the rounded one
        c, s = (t.reshape(layout.tokens, head_dim) for t in tables)
        q, k = rotary(q.float(), c, s), rotary(k.float(), c, s)
    if spec.pattern is not None and spec.pattern.kind != "window":
        assert prep.blocks is not None
        assert block_mismatch(prep.blocks, q, k, layout, spec) == ""
    q, k = q.to(dtype), k.to(dtype)
    out = torch.full_like(q, float("nan"))
    attend(prep, **config.model_dump(), scale=head_dim**-0.5, out_dtype=q.dtype, out=out)
    torch.cuda.synchronize()
    err = fa_errors(out, q, k, v, grid=grid, spec=spec, tile=tile, blocks=prep.blocks)
    assert fa_rule_failure(err) == "", err


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mode", list(MODES))
def test_fa_rule(mode: str, head_dim: int, grid: tuple[int, int, int], kind: str) -> None:
    _check(MODES[mode], grid, head_dim, kind)


@pytest.mark.parametrize(
    ("tile", "config"),
    [
        ((1, 8, 8), KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)),
        ((2, 8, 8), KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)),
        ((2, 8, 8), KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)),
        ((3, 8, 8), KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)),
        ((1, 16, 16), KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=2)),
    ],
    ids=["t64-64x64", "t128-64x64", "t128-128x64", "t192-64x64", "t256-128x128"],
)
@pytest.mark.parametrize("mode", ["fp8_dense", "fp8_window", "bf16_window"])
def test_other_configs(mode: str, tile: tuple[int, int, int], config: KernelConfig) -> None:
    """Blocks smaller than the tile (several kv blocks per tile, several q programs per tile)."""
    _check(MODES[mode], (7, 15, 26), 128, "structured", tile=tile, config=config)


@pytest.mark.parametrize(
    ("tile", "config"),
    [
        ((1, 8, 16), KernelConfig(block_m=64, block_n=128, num_warps=4, num_stages=5)),
        ((2, 8, 8), KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)),
    ],
    ids=["t128-64x128s5", "t128-128x64s3"],
)
@pytest.mark.parametrize("mode", ["fp8_dense", "fp8_window"])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_fp8_configs(
    kind: str, mode: str, tile: tuple[int, int, int], config: KernelConfig
) -> None:
    """The fp8 default config and a 128-row one, on random and structured inputs."""
    _check(MODES[mode], (7, 15, 26), 128, kind, tile=tile, config=config)


@pytest.mark.parametrize("impl", ["triton", "gluon"])
def test_a_registered_knob_reaches_the_launch(impl: str) -> None:
    """A knob registered with ``launch="maxnreg"`` (`fpstune.kernels.knobs`) travels from the
    config to the kernel launch as a Triton launch option: the kernel compiles under the cap
    and keeps FlashAttention's rule."""
    from fpstune.kernels import knobs

    if impl != "triton" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are written for sm_90")
    base = {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3, "impl": impl}
    knobs.register_knob("toy_maxnreg", (255, 192), 255, launch="maxnreg")
    try:
        config = KernelConfig.model_validate({**base, "knobs": {"toy_maxnreg": 192}})
        assert knobs.launch_options(config.knobs) == {"maxnreg": 192}
        _check(MODES["fp8_window"], (7, 15, 26), 128, "random", tile=(1, 8, 16), config=config)
    finally:
        knobs.unregister_knob("toy_maxnreg")


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize(
    ("impl", "block_n", "stages"),
    [("gluon", 128, 3), ("gluon", 128, 4), ("gluon_ws", 128, 2), ("gluon_ws", 128, 5),
     ("gluon_ws", 256, 2), ("gluon_ws", 256, 3)],
)  # fmt: skip
@pytest.mark.parametrize(
    ("grid", "tile"),
    [((7, 15, 26), (1, 8, 16)), ((5, 9, 13), (2, 8, 8)), ((7, 15, 26), (1, 16, 16)),
     ((2, 5, 7), (1, 8, 16))],
    ids=["480p/3-t128", "odd-t128", "480p/3-t256", "one-tile"],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["fp8_dense", "fp8_window", "fp8_topk", "fp8_cdf"])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_gluon_kernel(
    kind: str,
    mode: str,
    grid: tuple[int, int, int],
    tile: tuple[int, int, int],
    impl: str,
    block_n: int,
    stages: int,
) -> None:
    """`KernelConfig.impl = "gluon"` / ``"gluon_ws"``: the same rule for the Hopper kernels, with
    kv lists shorter than the ring (one tile), two kv blocks per tile and one or two q programs
    (256-token tiles), padded partial tiles, and (gluon_ws) a second warpgroup whose rows are
    all past the end (one tile of 70 tokens); gluon_ws's 256-key steps (``block_n=256``) with
    even and odd kv lists (the odd last block alone) and pairs straddling two tiles."""
    ws = impl == "gluon_ws"
    config = KernelConfig(block_m=128 if ws else 64, block_n=block_n, num_warps=8 if ws else 4,
                          num_stages=stages, impl=impl)  # fmt: skip
    _check(MODES[mode], grid, 128, kind, tile=tile, config=config)


GLUON_256 = KernelConfig(block_m=128, block_n=256, num_warps=8, num_stages=2, impl="gluon_ws")


@pytest.mark.parametrize("config", [None, GLUON_256], ids=["default", "gluon_ws-256"])
@pytest.mark.parametrize("mode", ["fp8_dense", "fp8_window", "fp8_topk", "bf16_window"])
def test_rope_fused_into_the_prepass(mode: str, config: KernelConfig | None) -> None:
    """Wan's rotary embedding applied by the pre-pass: the same rule against attention on the
    rotated q and k, for the Triton kernel and the 256-key Gluon kernel."""
    if config is not None and not (HOPPER and MODES[mode]["mode"].startswith("fp8")):
        pytest.skip("the Gluon kernels: fp8 modes on sm_90")
    _check(MODES[mode], (7, 15, 26), 128, "structured", tile=(1, 8, 16), config=config, rope=True)


@pytest.mark.parametrize("config", [None, GLUON_256], ids=["default", "gluon_ws-256"])
@pytest.mark.parametrize(
    ("text", "text_first", "mask"),
    [(256, False, "none"), (226, True, "none"), (77, False, "per_batch"), (130, False, "same")],
    ids=["hunyuan-256", "cogvideox-226-first", "odd-77-masked", "130-one-mask"],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["fp8_dense", "fp8_window", "fp8_topk", "bf16_window"])
def test_joint_text_and_video(
    mode: str, text: int, text_first: bool, mask: str, config: KernelConfig | None
) -> None:
    """Text tokens in the same call (HunyuanVideo after the video, CogVideoX before it), with and
    without a prompt mask, the same rule against the joint reference, for the Triton kernel and
    the 256-key Gluon kernel; RoPE on the video tokens only."""
    if config is not None and not (HOPPER and MODES[mode]["mode"].startswith("fp8")):
        pytest.skip("the Gluon kernels: fp8 modes on sm_90")
    grid, tile = (7, 15, 26), (1, 8, 16)
    spec_d = {**MODES[mode], "tile": tile}
    spec = AttentionSpec.from_dict(spec_d)
    cfg = config or default_config(tile, 128, spec.mode)
    shape = (*SHAPE_BH, 7 * 15 * 26, 128)
    verdict = run_joint_case(
        spec_d, "structured", torch.bfloat16, text, text_first, mask, mask == "none",
        grid=grid, shape=shape, config=cfg, device="cuda",
    )  # fmt: skip
    assert verdict == ""


@pytest.mark.parametrize("mode", ["fp8_window", "bf16_window"])
def test_fp16_inputs(mode: str) -> None:
    _check(MODES[mode], (5, 9, 13), 64, "random", dtype=torch.float16)


@pytest.mark.parametrize("mode", list(MODES))
def test_public_api_matches_reference_backend(mode: str) -> None:
    """`attention()` on CUDA (Triton) vs its CPU reference backend, on strided (B, N, H, D)
    views as diffusers passes them."""
    grid = (5, 9, 13)
    spec = AttentionSpec.from_dict(MODES[mode])
    b, h, n, d = 2, 3, 585, 128
    gen = _gen("api", mode)
    q, k, v = (
        torch.randn(b, n, h, d, generator=gen).to(torch.bfloat16).cuda().transpose(1, 2)
        for _ in range(3)
    )
    out = attention(q, k, v, grid=grid, spec=spec)
    ref = attention(q.cpu(), k.cpu(), v.cpu(), grid=grid, spec=spec, backend="reference")
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_cuda
    rel = (out.cpu().float() - ref.float()).norm() / ref.float().norm()
    # Same codes and blocks; only the P rounding point and accumulation order differ.
    assert rel < (0.03 if spec.mode.fp8 else 0.01), rel


@pytest.mark.parametrize("mode", ["fp8_dense", "fp8_window", "bf16_window"])
@pytest.mark.parametrize("bad", ["q_nan", "k_nan", "v_nan", "q_inf", "k_inf"])
def test_non_finite_inputs_give_nan_rows(mode: str, bad: str) -> None:
    _check_nan_rows(mode, bad, head_dim=64, config=None)


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernels are written for sm_90")
@pytest.mark.parametrize("block_n", [128, 256])
@pytest.mark.parametrize("mode", ["fp8_dense", "fp8_window"])
@pytest.mark.parametrize("bad", ["q_nan", "k_nan", "v_nan", "q_inf", "k_inf"])
def test_gluon_non_finite_inputs_give_nan_rows(mode: str, bad: str, block_n: int) -> None:
    """The warp-specialised Gluon kernel keeps NaN where the Triton kernel does (P's e4m3
    packing is ``cvt.satfinite``, which keeps NaN)."""
    config = KernelConfig(block_m=128, block_n=block_n, num_warps=8, num_stages=2, impl="gluon_ws")
    _check_nan_rows(mode, bad, head_dim=128, config=config)


def _check_nan_rows(mode: str, bad: str, *, head_dim: int, config: KernelConfig | None) -> None:
    from fpstune.kernels.dispatch import fused_attention
    from fpstune.kernels.prepare import prepare

    spec_d = dict(MODES[mode])
    if spec_d.get("sparsity"):
        spec_d["sparsity"] = 0.8
    grid, tile = (7, 15, 26), (1, 8, 16)
    spec = AttentionSpec.from_dict({**spec_d, "tile": tile})
    if bad.endswith("inf") and not spec.mode.fp8:
        pytest.skip("bf16: a key of +-inf gives a -inf or +inf logit, not necessarily NaN")
    layout = TileLayout(grid, tile)
    shape = (2, 2, layout.tokens, head_dim)
    q, k, v = make_qkv(shape, grid, "random", torch.bfloat16, _gen(bad), "cuda")
    target = {"q": q, "k": k, "v": v}[bad[0]]
    target[1, 0, 1234, 7] = float("nan") if bad.endswith("nan") else float("inf")
    config = config or default_config(tile, head_dim, spec.mode)
    out = fused_attention(q, k, v, layout=layout, spec=spec, config=config, scale=0.125)
    blocks = prepare(q, k, v, layout=layout, spec=spec, impl=config.impl).blocks
    expected = expected_nan_rows(q, k, v, layout, blocks, fp8=spec.mode.fp8)
    if bad == "v_nan" and spec.mode.fp8:
        # V's channel scale is NaN: every row of that (batch, head), nothing elsewhere.
        assert out[1, 0].isnan().any(-1).all() and out[0].isfinite().all()
        return
    assert nan_failure(out, expected) == ""


@pytest.mark.parametrize("mode", list(MODES))
def test_no_host_sync(mode: str) -> None:
    """After the first call (compiles, caches static indices), the op makes no synchronising
    call that torch's sync debug mode sees: inside a model the host must stay ahead of the
    device. (The mode does not see every wait; docs/kernel-design.md, "Open".)"""
    grid = (7, 15, 26)
    spec = AttentionSpec.from_dict(MODES[mode])
    q, k, v = make_qkv((1, 2, 2730, 128), grid, "random", torch.bfloat16, _gen("sync"), "cuda")
    attention(q, k, v, grid=grid, spec=spec)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention(q, k, v, grid=grid, spec=spec)
    finally:
        torch.cuda.set_sync_debug_mode("default")
