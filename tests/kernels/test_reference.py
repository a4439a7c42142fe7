"""The PyTorch reference: dense modes equal SDPA, sparse modes equal an independent masked softmax,
FP8 emulation matches torch's e4m3 and errs by what e4m3 predicts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fpstune.kernels import AttentionSpec, BlockIndex, Pattern, TileLayout, block_index
from fpstune.kernels.patterns import tile_means
from fpstune.kernels.reference import (
    FP8_MAX,
    _attend,
    channel_scales,
    fake_quant_channels,
    fake_quant_tiles,
    fp8_round,
    reference_attention,
    tile_scales,
)

F64 = torch.float64
# Odd grids that no tile below divides, and tiles from 1 token to larger than the grid.
GRIDS = [(3, 5, 7), (2, 3, 11), (5, 1, 3)]
TILES = [(1, 1, 1), (2, 2, 2), (1, 4, 4), (3, 2, 5), (4, 8, 8), (2, 16, 4)]


def randn(rng: torch.Generator, *shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=rng, dtype=F64).to(dtype)


def qkv(rng: torch.Generator, grid, b: int = 2, h: int = 3, d: int = 64):
    n = math.prod(grid)
    return tuple(randn(rng, b, h, n, d) for _ in range(3))


def sdpa64(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q.to(F64), k.to(F64), v.to(F64), scale=scale)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(F64) - ref).norm() / ref.norm())


def token_tile(grid, tile) -> torch.Tensor:
    """Tile index of each model token, from the grid coordinates (independent of TileLayout)."""
    (T, H, W), (tt, th, tw) = grid, tile
    nh, nw = -(-H // th), -(-W // tw)
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    return (((t // tt) * nh + h // th) * nw + w // tw).reshape(-1)


def masked_oracle(q, k, v, grid, tile, blocks: BlockIndex, n_tiles: int, scale=None):
    """softmax(q kᵀ · scale + mask) v in float64 and model order, the mask from dense_mask alone."""
    d = q.shape[-1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    tid = token_tile(grid, tile)
    tmask = blocks.dense_mask(n_tiles)  # (B|1, H|1, n, n)
    allowed = tmask[..., tid[:, None], tid[None, :]]
    s = (q.to(F64) @ k.to(F64).transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v.to(F64)


def pooled_blocks(q, k, grid, tile, pattern: Pattern, sparsity: float) -> BlockIndex:
    layout = TileLayout(grid, tile)
    return block_index(
        layout,
        pattern,
        sparsity,
        q_pooled=tile_means(layout.to_tiles(q), layout),
        k_pooled=tile_means(layout.to_tiles(k), layout),
    )


# ---------------------------------------------------------------- dense semantics


@pytest.mark.parametrize("grid", GRIDS)
def test_bf16_dense_is_sdpa(rng, grid):
    q, k, v = qkv(rng, grid)
    spec = AttentionSpec(mode="bf16_dense")
    for scale in (None, 0.3):
        out = reference_attention(
            q, k, v, grid=grid, spec=spec, tile=(1, 1, 1), scale=scale, dtype=F64
        )
        torch.testing.assert_close(out, sdpa64(q, k, v, scale), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("grid", GRIDS)
def test_padded_dense_path_is_sdpa(rng, grid, tile):
    """Tiled path, nothing pruned: padding keys get no weight, padding queries are dropped."""
    q, k, v = qkv(rng, grid, d=16)
    layout = TileLayout(grid, tile)
    qt, kt, vt = (layout.to_tiles(x) for x in (q, k, v))
    scale = 0.2
    out = layout.from_tiles(
        _attend(qt, kt, vt, layout, layout.key_valid(), scale, None, fp8_p=False, q_chunk=64)
    )
    torch.testing.assert_close(out, sdpa64(q, k, v, scale), rtol=0, atol=1e-12)

    # Garbage in the padding slots of k and v must change nothing: padding is masked, not zero.
    pad = ~layout.valid()
    if pad.any():
        kt, vt = kt.clone(), vt.clone()
        kt[..., pad, :] = 1e3
        vt[..., pad, :] = -1e3
        out2 = layout.from_tiles(
            _attend(qt, kt, vt, layout, layout.key_valid(), scale, None, fp8_p=False, q_chunk=64)
        )
        torch.testing.assert_close(out2, out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["window", "topk"])
@pytest.mark.parametrize("tile", [(1, 1, 1), (2, 2, 2), (3, 2, 5), (4, 8, 8)])
def test_bf16_sparse_at_sparsity_zero_is_dense(rng, tile, kind):
    grid = (3, 5, 7)
    q, k, v = qkv(rng, grid)
    spec = AttentionSpec(mode="bf16_sparse", sparsity=0.0, tile=tile, pattern={"kind": kind})
    out = reference_attention(q, k, v, grid=grid, spec=spec, tile=tile, dtype=F64)
    torch.testing.assert_close(out, sdpa64(q, k, v), rtol=0, atol=1e-12)


def test_fp8_sparse_at_sparsity_zero_is_fp8_dense(rng):
    grid, tile = (3, 5, 7), (2, 2, 2)
    q, k, v = qkv(rng, grid)
    dense = reference_attention(
        q, k, v, grid=grid, spec=AttentionSpec(mode="fp8_dense"), tile=tile, dtype=F64
    )
    sparse_spec = AttentionSpec(mode="fp8_sparse", sparsity=0.0, pattern={"kind": "window"})
    sparse = reference_attention(q, k, v, grid=grid, spec=sparse_spec, tile=tile, dtype=F64)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- sparse semantics


@pytest.mark.parametrize(
    ("pattern", "sparsity"),
    [
        ({"kind": "window"}, 0.5),
        ({"kind": "window", "window": (1.0, 2.0, 0.5)}, 0.8),
        ({"kind": "topk"}, 0.6),
        ({"kind": "topk"}, 0.9),
        ({"kind": "cdf", "mass": 0.5}, 0.5),
        ({"kind": "cdf", "mass": 0.9}, 0.3),
    ],
)
@pytest.mark.parametrize("tile", [(1, 2, 2), (2, 2, 3), (1, 1, 1)])
def test_sparse_equals_masked_softmax_oracle(rng, tile, pattern, sparsity):
    grid = (3, 5, 7)
    q, k, v = qkv(rng, grid, d=32)
    spec = AttentionSpec(mode="bf16_sparse", sparsity=sparsity, pattern=pattern, tile=tile)
    layout = TileLayout(grid, tile)
    blocks = pooled_blocks(q, k, grid, tile, spec.pattern, sparsity)
    kept = blocks.dense_mask(layout.n_tiles).sum(-1)
    assert int(kept.min()) < layout.n_tiles  # something really is pruned
    out = reference_attention(q, k, v, grid=grid, spec=spec, tile=tile, dtype=F64)
    expected = masked_oracle(q, k, v, grid, tile, blocks, layout.n_tiles)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # Pruning really changed the result (the oracle is not secretly dense).
    assert rel_l2(out, sdpa64(q, k, v)) > 1e-3


def test_explicit_blocks_override_pattern(rng):
    grid, tile = (3, 5, 7), (1, 2, 2)
    layout = TileLayout(grid, tile)
    q, k, v = qkv(rng, grid, b=1, h=2, d=16)
    n = layout.n_tiles
    # A hand-made index: q tile i keeps itself and tile (i + 3) mod n, per head differently.
    i = torch.arange(n)
    idx = torch.stack([torch.stack([i, (i + 3 + h) % n], -1).sort(-1).values for h in range(2)])
    idx = idx.unsqueeze(0).to(torch.int32)
    blocks = BlockIndex(idx, torch.full((1, 2, n), 2, dtype=torch.int32))
    spec = AttentionSpec(mode="bf16_sparse", sparsity=0.5, pattern={"kind": "topk"})
    out = reference_attention(q, k, v, grid=grid, spec=spec, tile=tile, dtype=F64, blocks=blocks)
    torch.testing.assert_close(
        out, masked_oracle(q, k, v, grid, tile, blocks, n), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize(
    "spec",
    [
        AttentionSpec(mode="fp8_dense"),
        AttentionSpec(mode="fp8_sparse", sparsity=0.7, pattern={"kind": "topk"}),
        AttentionSpec(mode="bf16_sparse", sparsity=0.5, pattern={"kind": "window"}),
        AttentionSpec(mode="bf16_sparse", sparsity=0.4, pattern={"kind": "cdf", "mass": 0.8}),
    ],
    ids=lambda s: f"{s.mode.value}-{s.pattern.kind if s.pattern else ''}",
)
def test_q_chunk_does_not_change_result(rng, spec):
    grid, tile = (3, 5, 7), (1, 2, 4)  # 8-token tiles, 3 x 3 x 2 of them
    q, k, v = qkv(rng, grid, d=32)
    full = reference_attention(q, k, v, grid=grid, spec=spec, tile=tile, dtype=F64, q_chunk=10**6)
    for q_chunk in (1, 8, 29, 64):
        out = reference_attention(
            q, k, v, grid=grid, spec=spec, tile=tile, dtype=F64, q_chunk=q_chunk
        )
        torch.testing.assert_close(out, full, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- fp8 emulation


def all_e4m3_values() -> torch.Tensor:
    """Every finite e4m3fn value, from its 256 bit patterns."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    return vals[vals.isfinite()]


def test_fp8_round_matches_torch_cast(rng):
    x = randn(rng, 4096, dtype=torch.float32) * 50  # mostly within range, spanning many binades
    x = x.clamp(-FP8_MAX, FP8_MAX)
    expected = x.to(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(fp8_round(x), expected)
    # Small values: subnormals (below 2^-6) and flush to zero.
    tiny = randn(rng, 1024, dtype=torch.float32) * 2**-7
    assert torch.equal(fp8_round(tiny), tiny.to(torch.float8_e4m3fn).to(torch.float32))
    # Result keeps the input dtype.
    xb = x.to(torch.bfloat16)
    assert fp8_round(xb).dtype == torch.bfloat16


def test_fp8_round_grid_points_and_ties():
    vals = all_e4m3_values()
    assert len(vals) == 254  # 256 patterns minus the two NaNs
    assert float(vals.max()) == FP8_MAX
    assert torch.equal(fp8_round(vals), vals)  # every e4m3 value is a fixed point
    # Round to nearest, ties to even mantissa: spacing in [1, 2) is 1/8.
    x = torch.tensor([1.0625, 1.1875, 1.06, 1.07, 0.0009, 0.0010, 240.0, 248.0, 432.0])
    expected = torch.tensor([1.0, 1.25, 1.0, 1.125, 0.0, 2**-9, 240.0, 256.0, 448.0])
    assert torch.equal(fp8_round(x), expected)


def test_fp8_round_saturates_without_nan():
    x = torch.tensor([448.5, 449.0, 464.0, 480.0, 1e6, 3e38, -448.5, -1e6])
    out = fp8_round(x)
    assert not out.isnan().any()
    assert torch.equal(out, torch.tensor([448.0] * 6 + [-448.0] * 2))
    # NaN stays NaN: saturation must not turn a NaN into a finite value.
    assert fp8_round(torch.tensor([float("nan")])).isnan().all()


def test_tile_scales_by_hand():
    # Grid 1x2x3, tile 1x2x2: tile 0 = tokens 0,1,3,4; tile 1 = tokens 2,5 (+ two padding slots).
    layout = TileLayout((1, 2, 3), (1, 2, 2))
    x = torch.tensor(
        [[1.0, -2.0], [0.5, 3.0], [-3.5, 1.0], [-7.0, 0.25], [2.0, 2.0], [0.0, 1.5]]
    ).view(1, 1, 6, 2)
    x = torch.cat([x, 2 * x], dim=1)  # a second head with doubled values
    s = tile_scales(layout.to_tiles(x), layout)
    expected = torch.tensor([[[7.0, 3.5], [14.0, 7.0]]]) / 448
    torch.testing.assert_close(s, expected, rtol=0, atol=0)
    assert s.dtype == torch.float32
    # An all-zero tile gets a tiny positive scale (no 0/0), and quantises back to zeros.
    z = x.clone()
    z[..., [2, 5], :] = 0
    zt = layout.to_tiles(z)
    sz = tile_scales(zt, layout)
    assert float(sz[0, 0, 1]) > 0
    dq = fake_quant_tiles(zt, sz, layout)
    assert not dq.isnan().any()
    assert torch.equal(layout.from_tiles(dq)[..., [2, 5], :], z[..., [2, 5], :])


def test_channel_scales_by_hand():
    x = torch.tensor([[1.0, -8.0, 0.5], [-4.0, 2.0, 0.25], [3.0, 1.0, -0.75]]).view(1, 1, 3, 3)
    torch.testing.assert_close(
        channel_scales(x), torch.tensor([[[4.0, 8.0, 0.75]]]) / 448, rtol=0, atol=0
    )


def test_fake_quant_hits_amax_exactly_and_rounds_relative(rng):
    layout = TileLayout((2, 3, 5), (1, 2, 2))
    x = randn(rng, 2, 2, layout.tokens, 16, dtype=torch.float32)
    xt = layout.to_tiles(x)
    s = tile_scales(xt, layout)
    dq = fake_quant_tiles(xt, s, layout)
    # The amax of every tile is representable (it maps to 448) and survives exactly.
    b, h = 2, 2
    amax = xt.abs().view(b, h, layout.n_tiles, -1).amax(-1)
    amax_dq = dq.abs().view(b, h, layout.n_tiles, -1).amax(-1)
    torch.testing.assert_close(amax_dq, amax, rtol=1e-6, atol=0)
    # Normal-range values are within half an e4m3 ulp: relative error <= 2^-4.
    big = xt.abs() > s.repeat_interleave(layout.tile_tokens, -1).unsqueeze(-1) * 2**-6
    rel = ((dq - xt).abs() / xt.abs())[big]
    assert float(rel.max()) <= 2**-4 + 1e-6
    assert float(rel.max()) > 2**-6  # and it does round
    v = fake_quant_channels(xt, channel_scales(xt))
    assert float(((v - xt).abs() / xt.abs().clamp_min(1e-3))[big].max()) <= 2**-4 + 1e-6


def e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def fp8_oracle(q, k, v, grid, tile, allowed=None):
    """The fp8 modes as the reference's docstring states them, in float64 and model order:
    q, k scaled per (batch, head, tile) by amax/448, v per (batch, head, channel), P = exp(s - max)
    quantised at the fixed scale 448, the row sum from unquantised P."""
    tid = token_tile(grid, tile)
    n_tiles = int(tid.max()) + 1

    def fp32_scale(amax: torch.Tensor) -> torch.Tensor:
        return (amax.float() / 448).to(F64)  # scales are fp32, whatever the compute dtype

    def per_tile(x):
        amax = torch.stack([x[..., tid == t, :].abs().amax((-1, -2)) for t in range(n_tiles)], -1)
        scale = fp32_scale(amax)[..., tid].unsqueeze(-1)
        return e4m3(x / scale) * scale

    vs = fp32_scale(v.abs().amax(-2, keepdim=True))
    qd, kd, vd = per_tile(q.to(F64)), per_tile(k.to(F64)), e4m3(v.to(F64) / vs) * vs
    s = (qd @ kd.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return (e4m3(p * 448) / 448 @ vd) / p.sum(-1, keepdim=True)


@pytest.mark.parametrize(("grid", "tile"), [((3, 5, 7), (2, 2, 2)), ((2, 3, 11), (1, 2, 4))])
def test_fp8_dense_equals_independent_emulation(rng, grid, tile):
    q, k, v = (x.float().to(F64) for x in qkv(rng, grid, d=32))  # exact in fp32
    # Spread magnitudes across tiles and channels, so per-tile / per-channel scaling matters.
    q = q * torch.logspace(-2, 2, q.shape[-2], dtype=F64).unsqueeze(-1)
    v = v * torch.logspace(-3, 1, v.shape[-1], dtype=F64)
    spec = AttentionSpec(mode="fp8_dense")
    out = reference_attention(q, k, v, grid=grid, spec=spec, tile=tile, dtype=F64)
    torch.testing.assert_close(out, fp8_oracle(q, k, v, grid, tile), rtol=1e-9, atol=1e-12)


def test_fp8_sparse_equals_independent_emulation(rng):
    grid, tile = (3, 5, 7), (1, 2, 2)
    q, k, v = qkv(rng, grid, d=32)
    spec = AttentionSpec(mode="fp8_sparse", sparsity=0.6, pattern={"kind": "topk"})
    layout = TileLayout(grid, tile)
    blocks = pooled_blocks(q, k, grid, tile, spec.pattern, spec.sparsity)
    tid = token_tile(grid, tile)
    allowed = blocks.dense_mask(layout.n_tiles)[..., tid[:, None], tid[None, :]]
    out = reference_attention(q, k, v, grid=grid, spec=spec, tile=tile, dtype=F64)
    expected = fp8_oracle(q, k, v, grid, tile, allowed)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)


def test_fp8_v_is_quantised_per_channel(rng):
    """With one key vector for every token, P == 1 everywhere: the output is the mean of the
    dequantised v, which shows v's quantisation on its own."""
    grid, tile = (3, 5, 7), (2, 2, 2)
    q, _, v = qkv(rng, grid, d=16)
    k = torch.randn(2, 3, 1, 16, generator=rng, dtype=F64).expand_as(q).contiguous()
    v = v * torch.logspace(-3, 1, 16, dtype=F64)  # channels of very different size
    out = reference_attention(
        q, k, v, grid=grid, spec=AttentionSpec(mode="fp8_dense"), tile=tile, dtype=F64
    )
    vs = (v.abs().amax(-2, keepdim=True).float() / 448).to(F64)
    expected = (e4m3(v / vs) * vs).mean(-2, keepdim=True).expand_as(out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    # Quantisation really moved it (relative to each channel's size).
    assert float(((out - v.mean(-2, keepdim=True)).abs() / vs).max()) > 1e-3


# e4m3 keeps 3 mantissa bits: the spacing relative to |x| is in (2^-4, 2^-3], so round-to-nearest
# has unit roundoff u = 2^-4 and, for data spread over a binade, an RMS relative error between
# 2^-4/sqrt(12) ~ 0.018 and 2^-3/sqrt(12) ~ 0.036. The output inherits V's error directly and q's
# and k's through the logits (each O(u)), plus P's at a fixed scale: at least ~one operand's worth,
# at most ~sqrt(4) x 0.036 ~ 0.07, a little more for P's small values that fall into subnormals.
# So rel-L2 lies in [0.01, 0.1]: below it, quantisation was skipped; above it, scales are wrong.
# bf16 has u = 2^-8 (8 significant bits), 16x smaller; measured: fp8 ~0.05, bf16 ~0.0036.
FP8_REL_L2_MIN, FP8_REL_L2_MAX = 0.01, 0.1


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(("grid", "tile"), [((3, 10, 12), (2, 8, 8)), ((5, 6, 7), (1, 4, 4))])
def test_fp8_dense_error_in_e4m3_range(rng, grid, tile, d):
    q, k, v = qkv(rng, grid, b=2, h=2, d=d)
    ref = sdpa64(q, k, v)
    fp8 = reference_attention(
        q, k, v, grid=grid, spec=AttentionSpec(mode="fp8_dense"), tile=tile, dtype=F64
    )
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    bf16 = reference_attention(
        qb,
        kb,
        vb,
        grid=grid,
        spec=AttentionSpec(mode="bf16_dense"),
        tile=tile,
        dtype=torch.bfloat16,
    )
    err8, err16 = rel_l2(fp8, ref), rel_l2(bf16, ref)
    assert FP8_REL_L2_MIN <= err8 <= FP8_REL_L2_MAX, err8
    assert err8 > 4 * err16, (err8, err16)


def test_fp8_sparse_error_against_same_mask(rng):
    grid, tile = (3, 10, 12), (1, 4, 4)
    q, k, v = qkv(rng, grid, b=2, h=2, d=64)
    spec = AttentionSpec(mode="fp8_sparse", sparsity=0.75, pattern={"kind": "topk"})
    layout = TileLayout(grid, tile)
    blocks = pooled_blocks(q, k, grid, tile, spec.pattern, spec.sparsity)
    ref = masked_oracle(q, k, v, grid, tile, blocks, layout.n_tiles)
    out = reference_attention(q, k, v, grid=grid, spec=spec, tile=tile, dtype=F64)
    assert FP8_REL_L2_MIN <= rel_l2(out, ref) <= FP8_REL_L2_MAX
    # The fp8 pruning uses the unquantised pooled scores: same mask as bf16_sparse.
    bf_spec = AttentionSpec.from_dict({**spec.to_dict(), "mode": "bf16_sparse"})
    bf = reference_attention(q, k, v, grid=grid, spec=bf_spec, tile=tile, dtype=F64)
    torch.testing.assert_close(bf, ref, rtol=0, atol=1e-12)


def test_fp8_p_is_quantised_at_fixed_scale(rng):
    """Quantising P (and only P) changes the result by e4m3's relative error, not more."""
    grid, tile = (3, 5, 7), (1, 2, 2)
    layout = TileLayout(grid, tile)
    q, k, v = qkv(rng, grid, d=32)
    qt, kt, vt = (layout.to_tiles(x) for x in (q, k, v))
    exact = _attend(qt, kt, vt, layout, layout.key_valid(), 0.2, None, fp8_p=False, q_chunk=64)
    fp8p = _attend(qt, kt, vt, layout, layout.key_valid(), 0.2, None, fp8_p=True, q_chunk=64)
    valid = layout.valid()
    err = rel_l2(fp8p[..., valid, :], exact[..., valid, :])
    assert 1e-3 < err < 2**-4
