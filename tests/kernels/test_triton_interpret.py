"""The Triton kernels under Triton's CPU interpreter (TRITON_INTERPRET=1), on tiny shapes.

The interpreter must be switched on before triton is first imported, and other tests of the same
session may import it, so every check runs in one child process (this file run as a script) and
the tests here read its verdicts. The child's checks are the GPU tests' checks (FlashAttention's
rule against an fp64 truth, the same blocks as the reference, poisoned outputs).

What the interpreter cannot do, found on triton 3.6 and 3.9:
- ``tl.dot`` on bf16 operands returns garbage, so the ``bf16_sparse`` path (whose codes are in the
  input dtype) is run with fp16 inputs here; bf16 inputs are covered on the GPU.
- its fp32 -> e4m3 cast drops the carry into the exponent (126.97 -> 64) and turns NaN into 384;
  the kernels round onto the e4m3 grid themselves off-GPU (``EXACT``), so fp8 values are right,
  but NaN propagation through fp8 codes is checked on the GPU only.

The helpers above ``# ---- interpreter child`` are shared with test_triton_gpu.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fpstune.kernels import AttentionSpec, BlockIndex, KernelConfig, Mode, TileLayout
from fpstune.kernels.patterns import block_index, tile_means
from fpstune.kernels.reference import reference_attention

Grid = tuple[int, int, int]


def make_qkv(
    shape: tuple[int, int, int, int],
    grid: Grid,
    kind: str,
    dtype: torch.dtype,
    gen: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh q, k, v (B, H, N, D). ``structured``: q and k share a smooth function of the 3D
    position (random Fourier features), so scores peak at nearby tokens, as in video DiTs."""
    b, h, n, d = shape
    if kind == "random":
        q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    elif kind == "structured":
        axes = (torch.arange(g, dtype=torch.float32) for g in grid)
        t, y, x = torch.meshgrid(*axes, indexing="ij")
        pos = torch.stack((t, y, x), -1).reshape(n, 3)
        freqs = torch.randn(b, h, 3, d // 2, generator=gen) / 2.0  # length scale ~2 tokens
        phase = pos @ freqs + 2 * math.pi * torch.rand(b, h, 1, d // 2, generator=gen)
        # q.k ~ amp^2 * d/2 * kernel(distance); scaled by d^-0.5 the peak logit is about 8.
        amp = math.sqrt(16.0 / math.sqrt(d))
        feat = amp * torch.cat((phase.cos(), phase.sin()), -1)
        q = feat + 0.3 * torch.randn(shape, generator=gen)
        k = feat + 0.3 * torch.randn(shape, generator=gen)
        v = torch.randn(shape, generator=gen)
    else:
        raise ValueError(kind)
    return tuple(x.to(dtype).to(device) for x in (q, k, v))  # type: ignore[return-value]


def wan_rope_tables(n: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-token rotary tables as diffusers' Wan gives them: (1, n, 1, d) fp32 cos and
    sin, each channel pair's angle repeated in both of its channels."""
    angle = (torch.rand(1, n, 1, d // 2, generator=gen) * 6.3).repeat_interleave(2, dim=-1)
    return angle.cos(), angle.sin()


def truth_spec(spec: AttentionSpec) -> AttentionSpec:
    """The same block mask without quantisation: what fp8 modes approximate."""
    if spec.mode is Mode.FP8_DENSE:
        return AttentionSpec(mode=Mode.BF16_DENSE)
    if spec.mode is Mode.FP8_SPARSE:
        return spec.model_copy(update={"mode": Mode.BF16_SPARSE})
    return spec


def fa_errors(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: Grid,
    spec: AttentionSpec,
    tile: Grid,
    blocks: BlockIndex | None,
    **joint: Any,
) -> dict[str, float]:
    """Max and mean |error| vs an fp64 truth of the Triton output and of the same-precision
    PyTorch reference (fp8: emulated in fp32; bf16/fp16: computed in the input dtype).
    ``joint``: `reference_attention`'s text, text_first and text_mask."""
    truth = reference_attention(
        q, k, v, grid=grid, spec=truth_spec(spec), tile=tile, dtype=torch.float64, blocks=blocks,
        **joint,
    )  # fmt: skip
    low = torch.float32 if spec.mode.fp8 else q.dtype
    ref = reference_attention(
        q, k, v, grid=grid, spec=spec, tile=tile, dtype=low, blocks=blocks, **joint
    )
    ref = ref.to(q.dtype)
    e_out = (out.double() - truth).abs()
    e_ref = (ref.double() - truth).abs()
    return {
        "out_max": e_out.max().item(),
        "ref_max": e_ref.max().item(),
        "out_mean": e_out.mean().item(),
        "ref_mean": e_ref.mean().item(),
        "finite": bool(torch.isfinite(out).all()),
    }


def fa_rule_failure(err: dict[str, float], factor: float = 2.0, atol: float = 1e-5) -> str:
    """'' when the output is finite and within ``factor`` x the reference's error (max and mean)."""
    if not err["finite"]:
        return "output has non-finite values (unwritten, or a NaN leak)"
    bad = [
        f"{what} error {err['out_' + what]:.3g} > {factor} x reference {err['ref_' + what]:.3g}"
        for what in ("max", "mean")
        if err["out_" + what] > factor * err["ref_" + what] + atol
    ]
    return "; ".join(bad)


def block_mismatch(
    chosen: BlockIndex, q: torch.Tensor, k: torch.Tensor, layout: TileLayout, spec: AttentionSpec
) -> str:
    """'' when ``chosen`` keeps the same kv tiles as the reference's pattern on the same inputs,
    up to exact-tie rows (pooled scores within 1e-5 of each other at the cut)."""
    assert spec.pattern is not None
    qt, kt = (layout.to_tiles(x.float()) for x in (q, k))
    qp, kp = tile_means(qt, layout), tile_means(kt, layout)
    ref = block_index(layout, spec.pattern, spec.sparsity, q_pooled=qp, k_pooled=kp)
    a = chosen.dense_mask(layout.n_tiles).to(ref.kv_index.device)
    b = ref.dense_mask(layout.n_tiles)
    a, b = torch.broadcast_tensors(a, b)
    rows = (a != b).any(-1)
    if not rows.any():
        return ""
    scores = (qp @ kp.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.expand(rows.shape + scores.shape[-1:])
    for idx in rows.nonzero().tolist():
        differ = (a != b)[tuple(idx)]
        s = scores[tuple(idx)]
        lo, hi = s[differ].min(), s[differ].max()
        if (hi - lo).abs() > 1e-5 * max(1.0, s.abs().max().item()):
            return f"(b, h, q_tile) = {tuple(idx)} keeps other kv tiles than the reference"
    return ""


def expected_nan_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TileLayout,
    blocks: BlockIndex | None,
    *,
    fp8: bool,
) -> torch.Tensor:
    """(B, H, N) bool: the rows `attention()` documents as NaN for NaN inputs.

    A row is hit when it visits a kv tile holding a NaN key or value, or its own query is NaN
    (fp8: any query of its q tile, as the tile's scale is NaN); fp8 also spreads a NaN value to
    every row, through V's per-channel scale. (The reference's dense P·V also leaks NaN from
    skipped tiles, 0·NaN, so it is not the yardstick here.)
    """
    b, h, _n, _d = q.shape
    tile_of = layout.token_slot(q.device) // layout.tile_tokens
    bad_q, bad_kv = ~q.isfinite().all(-1), ~(k.isfinite().all(-1) & v.isfinite().all(-1))

    def per_tile(bad: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(b, h, layout.n_tiles, device=q.device)
        return out.index_add_(-1, tile_of, bad.float()) > 0

    n = layout.n_tiles
    keep = blocks.dense_mask(n) if blocks is not None else torch.ones(1, 1, n, n, dtype=torch.bool)
    keep = keep.to(q.device)
    rows = (keep & per_tile(bad_kv)[:, :, None, :]).any(-1)[..., tile_of]
    if fp8:
        rows |= per_tile(bad_q)[..., tile_of] | (~v.isfinite().all(-1)).any(-1, keepdim=True)
    else:
        rows |= bad_q
    return rows


def nan_failure(out: torch.Tensor, expected_rows: torch.Tensor) -> str:
    """'' when exactly the expected rows hold NaN and every other row is finite."""
    got = out.isnan().any(-1)
    if not expected_rows.any() or expected_rows.all():
        return "the NaN case does not discriminate"
    if not torch.equal(got, expected_rows):
        return f"NaN rows differ: {int(got.sum())} rows vs {int(expected_rows.sum())} expected"
    if not out[~expected_rows].isfinite().all():
        return "non-finite values outside the NaN rows"
    return ""


# ---- interpreter child --------------------------------------------------------------------

GRID: Grid = (3, 5, 7)  # 105 tokens, no tile divides it
SHAPE = (2, 1, 105, 64)


def _cases() -> Iterator[tuple[str, dict[str, Any], str, torch.dtype, KernelConfig]]:
    c16 = KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    c32 = KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    t16, t32 = (1, 4, 4), (1, 4, 8)
    bf16, f16 = torch.bfloat16, torch.float16
    win = {"kind": "window"}
    yield "fp8_dense", {"mode": "fp8_dense", "tile": t16}, "random", bf16, c16
    yield "fp8_dense_t32", {"mode": "fp8_dense", "tile": t32}, "structured", bf16, c32
    sp = {"mode": "fp8_sparse", "tile": t16}
    yield "fp8_window", {**sp, "pattern": win, "sparsity": 0.5}, "random", bf16, c16
    yield "fp8_topk", {**sp, "pattern": {"kind": "topk"}, "sparsity": 0.5}, "structured", bf16, c16
    cdf = {"kind": "cdf", "mass": 0.6}
    yield "fp8_cdf", {**sp, "pattern": cdf, "sparsity": 0.75}, "random", bf16, c16
    # 48-token tiles: three kv blocks per tile, and a pre-pass that sweeps the tile twice.
    sp48 = {"mode": "fp8_sparse", "tile": (3, 4, 4), "pattern": win, "sparsity": 0.4}
    yield "fp8_window_t48", sp48, "structured", bf16, c16
    bs = {"mode": "bf16_sparse", "tile": t16}
    yield "bf16_window", {**bs, "pattern": win, "sparsity": 0.5}, "random", f16, c16
    yield "bf16_topk", {**bs, "pattern": {"kind": "topk"}, "sparsity": 0.6}, "structured", f16, c16


def _run_case(spec_d: dict[str, Any], kind: str, dtype: torch.dtype, cfg: KernelConfig) -> str:
    from fpstune.kernels.dispatch import attend
    from fpstune.kernels.prepare import prepare

    gen = torch.Generator().manual_seed(len(json.dumps(spec_d)) * 7919 + len(kind))
    spec = AttentionSpec.from_dict(spec_d)
    assert spec.tile is not None
    layout = TileLayout(GRID, spec.tile)
    q, k, v = make_qkv(SHAPE, GRID, kind, dtype, gen)
    if spec_d["mode"] == "fp8_dense":
        # Model-order inputs may be strided views (diffusers keeps (B, N, H, D)).
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    prep = prepare(q, k, v, layout=layout, spec=spec)
    blocks = prep.blocks
    if spec.pattern is not None and spec.pattern.kind != "window":
        assert blocks is not None
        msg = block_mismatch(blocks, q, k, layout, spec)
        if msg:
            return msg
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)  # poisoned: every element is written
    kw = cfg.model_dump()
    attend(prep, **kw, scale=q.shape[-1] ** -0.5, out_dtype=q.dtype, out=out)
    err = fa_errors(out, q, k, v, grid=GRID, spec=spec, tile=spec.tile, blocks=blocks)
    return fa_rule_failure(err)


def _run_nan_case() -> str:
    """fp16 sparse path: NaN inputs give NaN in exactly the documented rows."""
    from fpstune.kernels.dispatch import fused_attention
    from fpstune.kernels.prepare import prepare

    gen = torch.Generator().manual_seed(5)
    spec = AttentionSpec.from_dict(
        {"mode": "bf16_sparse", "tile": (1, 4, 4), "pattern": {"kind": "window"}, "sparsity": 0.7}
    )
    q, k, v = make_qkv(SHAPE, GRID, "random", torch.float16, gen)
    q[0, 0, 17, 3] = float("nan")
    k[1, 0, 40, 0] = float("nan")
    v[0, 0, 90, 5] = float("nan")
    cfg = KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    layout = TileLayout(GRID, (1, 4, 4))
    out = fused_attention(q, k, v, layout=layout, spec=spec, config=cfg, scale=0.125)
    blocks = prepare(q, k, v, layout=layout, spec=spec).blocks
    return nan_failure(out, expected_nan_rows(q, k, v, layout, blocks, fp8=False))


def _run_wgmma_key_order_case() -> str:
    """prepare(impl="gluon") stores V's fp8 codes with each 32 keys in the order the Gluon
    kernels' P operand has them (16h + 8q + 2t + b at 16h + 4t + 2q + b), all else unchanged."""
    from fpstune.kernels.prepare import prepare

    gen = torch.Generator().manual_seed(32)
    spec = AttentionSpec.from_dict({"mode": "fp8_dense", "tile": (1, 4, 8)})
    layout = TileLayout(GRID, (1, 4, 8))
    q, k, v = make_qkv(SHAPE, GRID, "random", torch.float16, gen)
    natural = prepare(q, k, v, layout=layout, spec=spec)
    wgmma = prepare(q, k, v, layout=layout, spec=spec, impl="gluon")
    c = torch.arange(layout.padded_tokens)
    h, q_, t, b = (c >> 4) & 1, (c >> 3) & 1, (c >> 1) & 3, c & 1
    moved = (c - c % 32) + 16 * h + 4 * t + 2 * q_ + b
    if sorted(moved.tolist()) != c.tolist():
        return "the key order is not a permutation"
    want = torch.empty_like(natural.v)
    want[..., moved] = natural.v
    if not torch.equal(wgmma.v.view(torch.uint8), want.view(torch.uint8)):
        return "V's codes are not where the Gluon kernels read them"
    same = ("q", "k", "q_scale", "k_scale", "v_amax")
    if not all(torch.equal(getattr(natural, f), getattr(wgmma, f)) for f in same):
        return "impl changed more than V's key order"
    return ""


ROPE_CASES = {  # fused rotary: the pre-pass's one-read path, its two-sweep path, pooled means
    "rope_fp8_dense": ({"mode": "fp8_dense", "tile": (1, 4, 4)}, torch.bfloat16),
    "rope_fp8_window_t48": (
        {"mode": "fp8_sparse", "tile": (3, 4, 4), "pattern": {"kind": "window"}, "sparsity": 0.4},
        torch.bfloat16,
    ),
    "rope_fp8_topk": (
        {"mode": "fp8_sparse", "tile": (1, 4, 4), "pattern": {"kind": "topk"}, "sparsity": 0.5},
        torch.bfloat16,
    ),
    "rope_fp16_window": (
        {"mode": "bf16_sparse", "tile": (1, 4, 4), "pattern": {"kind": "window"}, "sparsity": 0.5},
        torch.float16,
    ),
}


def _run_rope_case(spec_d: dict[str, Any], dtype: torch.dtype) -> str:
    """prepare(..., rope=tables) writes exactly what prepare writes for q and k rotated in fp32
    first (`rope.rotary`; then in the input dtype for the non-fp8 modes, which copy)."""
    from fpstune.kernels.prepare import prepare
    from fpstune.kernels.rope import rotary

    gen = torch.Generator().manual_seed(len(json.dumps(spec_d)))
    spec = AttentionSpec.from_dict(spec_d)
    assert spec.tile is not None
    layout = TileLayout(GRID, spec.tile)
    q, k, v = make_qkv(SHAPE, GRID, "structured", dtype, gen)
    n, d = SHAPE[2], SHAPE[3]
    cos, sin = wan_rope_tables(n, d, gen)
    fused = prepare(q, k, v, layout=layout, spec=spec, rope=(cos, sin))
    c, s = cos.reshape(n, d), sin.reshape(n, d)
    rq, rk = rotary(q.float(), c, s), rotary(k.float(), c, s)
    if not spec.mode.fp8:
        rq, rk = rq.to(dtype), rk.to(dtype)
    plain = prepare(rq, rk, v, layout=layout, spec=spec)
    for field in ("q", "k", "v", "q_scale", "k_scale", "v_amax"):
        a, b = getattr(fused, field), getattr(plain, field)
        if (a is None) != (b is None):
            return f"{field}: present in one pre-pass only"
        if a is not None and not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            return f"{field} differs from the pre-pass of q and k rotated first"
    if spec.pattern is not None and spec.pattern.kind != "window":
        assert fused.blocks is not None and plain.blocks is not None
        if not torch.equal(fused.blocks.kv_index, plain.blocks.kv_index):
            return "the pooled tile means chose other blocks"
    if torch.equal(fused.q.view(torch.uint8), prepare(q, k, v, layout=layout, spec=spec).q.view(
            torch.uint8)):  # fmt: skip
        return "the rotation was not applied"
    return ""


# Joint text + video: (spec, input kind, dtype, text tokens, text first, prompt mask, rope).
# Masks: "none"; "same" (one mask for the batch: one launch); "per_batch" (one launch each).
JOINT_CASES: dict[str, tuple[dict[str, Any], str, torch.dtype, int, bool, str, bool]] = {
    "joint_fp8_dense": ({"mode": "fp8_dense", "tile": (1, 4, 4)}, "structured",
                        torch.bfloat16, 11, False, "none", False),
    "joint_fp8_window_first_masked": (
        {"mode": "fp8_sparse", "tile": (1, 4, 4), "pattern": {"kind": "window"},
         "sparsity": 0.6}, "structured", torch.bfloat16, 23, True, "per_batch", False),
    "joint_fp8_topk_masked": (
        {"mode": "fp8_sparse", "tile": (1, 4, 4), "pattern": {"kind": "topk"}, "sparsity": 0.5},
        "random", torch.bfloat16, 9, False, "per_batch", False),
    "joint_bf16_window_masked": (
        {"mode": "bf16_sparse", "tile": (1, 4, 8), "pattern": {"kind": "window"},
         "sparsity": 0.5}, "structured", torch.float16, 37, False, "per_batch", False),
    "joint_fp8_window_rope": (
        {"mode": "fp8_sparse", "tile": (1, 4, 4), "pattern": {"kind": "window"},
         "sparsity": 0.5}, "structured", torch.bfloat16, 13, True, "none", True),
    "joint_fp8_topk_rope": (
        {"mode": "fp8_sparse", "tile": (1, 4, 4), "pattern": {"kind": "topk"}, "sparsity": 0.5},
        "structured", torch.bfloat16, 19, False, "none", True),
}  # fmt: skip


def joint_qkv(
    shape: tuple[int, int, int, int], grid: Grid, kind: str, dtype: torch.dtype, text: int,
    text_first: bool, gen: torch.Generator, device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """`make_qkv`'s video tokens with ``text`` random tokens before or after them (text keys
    larger than video keys, so a text tile sharing a video tile's FP8 scale would show)."""
    video = make_qkv(shape, grid, kind, dtype, gen)
    b, h, _n, d = shape
    out = []
    for x in video:
        t = (3.0 * torch.randn(b, h, text, d, generator=gen)).to(dtype)
        out.append(torch.cat((t, x) if text_first else (x, t), dim=2).to(device))
    return tuple(out)


def prompt_mask(kind: str, batch: int, text: int) -> torch.Tensor | None:
    """A prompt mask as HunyuanVideo builds one: the first tokens real, the rest padding."""
    if kind == "none":
        return None
    real = [text - 3, text // 2] if kind == "per_batch" else [text // 2] * batch
    return torch.arange(text).unsqueeze(0) < torch.tensor(real[:batch]).unsqueeze(1)


def _stacked(per_element: list[BlockIndex]) -> BlockIndex:
    """Per-batch-element block indices as one (B, H, q tiles, width) index."""
    width = max(x.kv_index.shape[-1] for x in per_element)
    index = [F.pad(x.kv_index, (0, width - x.kv_index.shape[-1])) for x in per_element]
    count = [x.kv_count for x in per_element]
    return BlockIndex(torch.cat(index), torch.cat(count))


def run_joint_case(
    spec_d: dict[str, Any], kind: str, dtype: torch.dtype, text: int, text_first: bool,
    mask_kind: str, rope: bool, *, grid: Grid = GRID, shape: tuple[int, int, int, int] = SHAPE,
    config: KernelConfig | None = None, device: str = "cpu",
) -> str:  # fmt: skip
    """`dispatch.fused_attention` on a joint sequence (poisoned output) against the reference
    of the same joint semantics, FlashAttention's rule vs fp64. ``shape``: the video's
    (B, H, tokens, D)."""
    from fpstune.kernels.dispatch import attend, fused_attention
    from fpstune.kernels.prepare import prepare
    from fpstune.kernels.rope import rotate_qk

    gen = torch.Generator().manual_seed(text * 31 + len(json.dumps(spec_d)) + len(device))
    spec = AttentionSpec.from_dict(spec_d)
    assert spec.tile is not None
    b, _h, n, d = shape
    layout = TileLayout(grid, spec.tile, text, text_first)
    q, k, v = joint_qkv(shape, grid, kind, dtype, text, text_first, gen, device)
    mask = prompt_mask(mask_kind, b, text)
    mask = None if mask is None else mask.to(device)
    tables = None
    if rope:
        tables = tuple(t.to(device) for t in wan_rope_tables(n, d, gen))
    cfg = config or KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)  # poisoned
    blocks = None
    if spec.pattern is not None and spec.pattern.kind != "window":
        # Launched here, so that the reference can be handed the blocks the pre-pass chose: one
        # launch per batch element where the prompt masks differ (as `fused_attention` does).
        same = mask is None or bool((mask == mask[:1]).all())
        parts = [slice(None)] if same else [slice(i, i + 1) for i in range(b)]
        chosen = []
        for part in parts:
            one = None if mask is None else mask[part][0]
            prep = prepare(
                q[part], k[part], v[part], layout=layout, spec=spec, text_mask=one,
                impl=cfg.impl, rope=tables,  # type: ignore[arg-type]
            )  # fmt: skip
            assert prep.blocks is not None
            chosen.append(prep.blocks)
            attend(prep, **cfg.model_dump(), scale=d**-0.5, out_dtype=q.dtype, out=out[part])
        blocks = chosen[0] if same else _stacked(chosen)
    else:
        fused_attention(
            q, k, v, layout=layout, spec=spec, config=cfg, scale=d**-0.5, out=out,
            rope=tables, text_mask=mask,  # type: ignore[arg-type]
        )  # fmt: skip
    if tables is not None:  # the reference attends to q and k rotated first, in fp32
        q, k = rotate_qk(q.float(), k.float(), tables, text=text, text_first=text_first)  # type: ignore[arg-type]
        q, k = q.to(dtype), k.to(dtype)
    err = fa_errors(
        out, q, k, v, grid=grid, spec=spec, tile=spec.tile, blocks=blocks, text=text,
        text_first=text_first, text_mask=mask,
    )  # fmt: skip
    return fa_rule_failure(err)


def _child() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, spec_d, kind, dtype, cfg in _cases():
        try:
            results[name] = _run_case(spec_d, kind, dtype, cfg)
        except Exception as e:  # reported per case, not as one crash
            results[name] = f"{type(e).__name__}: {e}"
    for name, (spec_d, dtype) in ROPE_CASES.items():
        try:
            results[name] = _run_rope_case(spec_d, dtype)
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    for name, args in JOINT_CASES.items():
        try:
            results[name] = run_joint_case(*args)
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    for name, run in (
        ("nan_fp16_sparse", _run_nan_case),
        ("wgmma_key_order", _run_wgmma_key_order_case),
    ):
        try:
            results[name] = run()
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    print("RESULTS " + json.dumps(results))


# ---- tests (parent process) ---------------------------------------------------------------

CASE_NAMES = [c[0] for c in _cases()] + [
    *ROPE_CASES,
    *JOINT_CASES,
    "nan_fp16_sparse",
    "wgmma_key_order",
]


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULTS "))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_interpreted_kernels(case: str, interpreter_results: dict[str, str]) -> None:
    assert interpreter_results[case] == ""


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("pattern", [{"kind": "topk"}, {"kind": "cdf", "mass": 0.5}])
def test_ranked_blocks_choose_what_patterns_choose(pattern: dict, sparsity: float) -> None:
    """The runtime's sort-based selection keeps exactly `block_index`'s tiles (no topk)."""
    from fpstune.kernels.patterns import ascending, ranked_blocks
    from fpstune.kernels.spec import Pattern

    gen = torch.Generator().manual_seed(int(sparsity * 10) + len(pattern))
    layout = TileLayout((5, 9, 13), (1, 4, 4))
    qp, kp = (torch.randn(2, 3, layout.n_tiles, 64, generator=gen) for _ in range(2))
    pat = Pattern(**pattern)
    want = block_index(layout, pat, sparsity, q_pooled=qp, k_pooled=kp)
    got = ascending(ranked_blocks(pat, sparsity, qp, kp))
    assert torch.equal(got.kv_count, want.kv_count)
    assert torch.equal(got.kv_index, want.kv_index)


if __name__ == "__main__":
    _child()
