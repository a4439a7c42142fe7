"""`attention()` on CPU tensors (the reference path): layout, order, dtype, input checks, and what
non-finite inputs do."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fpstune.kernels import AttentionSpec, BlockIndex, TileLayout, attention, block_index
from fpstune.kernels.config import default_tile
from fpstune.kernels.patterns import tile_means

F64 = torch.float64
GRID = (3, 5, 7)  # 105 tokens: no tile below divides it
B, H = 2, 3

SPECS = {
    "bf16_dense": {"mode": "bf16_dense"},
    "fp8_dense": {"mode": "fp8_dense"},  # default tile for the grid
    "fp8_dense_tile": {"mode": "fp8_dense", "tile": [1, 2, 4]},
    "fp8_sparse_window": {
        "mode": "fp8_sparse",
        "sparsity": 0.6,
        "tile": [1, 2, 4],
        "pattern": {"kind": "window"},
    },
    "fp8_sparse_topk": {
        "mode": "fp8_sparse",
        "sparsity": 0.7,
        "tile": [1, 2, 4],
        "pattern": {"kind": "topk"},
    },
    "bf16_sparse_window": {
        "mode": "bf16_sparse",
        "sparsity": 0.6,
        "tile": [1, 2, 4],
        "pattern": {"kind": "window", "window": [1.0, 2.0, 1.0]},
    },
    "bf16_sparse_topk": {
        "mode": "bf16_sparse",
        "sparsity": 0.5,
        "tile": [2, 2, 2],
        "pattern": {"kind": "topk"},
    },
    "bf16_sparse_cdf": {
        "mode": "bf16_sparse",
        "sparsity": 0.5,
        "tile": [1, 2, 4],
        "pattern": {"kind": "cdf", "mass": 0.8},
    },
}


def make_qkv(rng, d: int, dtype: torch.dtype, grid=GRID, b: int = B, h: int = H):
    n = math.prod(grid)
    return tuple(torch.randn(b, h, n, d, generator=rng).to(dtype) for _ in range(3))


def resolved_tile(spec: AttentionSpec, grid=GRID):
    return spec.tile or default_tile(grid)


def token_tile(grid, tile) -> torch.Tensor:
    """Tile index of each model token, from its grid coordinates."""
    (T, Hh, W), (tt, th, tw) = grid, tile
    nh, nw = -(-Hh // th), -(-W // tw)
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(Hh), torch.arange(W), indexing="ij")
    return (((t // tt) * nh + h // th) * nw + w // tw).reshape(-1)


def blocks_for(q, k, spec: AttentionSpec, grid=GRID) -> BlockIndex:
    layout = TileLayout(grid, resolved_tile(spec, grid))
    pooled = spec.pattern.kind != "window"
    return block_index(
        layout,
        spec.pattern,
        spec.sparsity,
        q_pooled=tile_means(layout.to_tiles(q.float()), layout) if pooled else None,
        k_pooled=tile_means(layout.to_tiles(k.float()), layout) if pooled else None,
    )


def token_mask(spec: AttentionSpec, blocks: BlockIndex, grid=GRID) -> torch.Tensor:
    """(B|1, H|1, N, N): may model token i attend to model token j."""
    tile = resolved_tile(spec, grid)
    tid = token_tile(grid, tile)
    tmask = blocks.dense_mask(TileLayout(grid, tile).n_tiles)
    return tmask[..., tid[:, None], tid[None, :]]


def oracle(q, k, v, spec: AttentionSpec, grid=GRID, scale=None) -> torch.Tensor:
    """float64, model order: SDPA for dense modes, masked softmax for sparse ones (no fp8)."""
    q64, k64, v64 = (x.to(F64) for x in (q, k, v))
    if not spec.mode.sparse:
        return F.scaled_dot_product_attention(q64, k64, v64, scale=scale)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q64 @ k64.transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask(spec, blocks_for(q, k, spec, grid), grid), float("-inf"))
    return s.softmax(-1) @ v64


def rel_l2(x, ref) -> float:
    return float((x.to(F64) - ref).norm() / ref.norm())


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", list(SPECS))
def test_output_layout_order_dtype(rng, name, d, dtype):
    spec = AttentionSpec.from_dict(SPECS[name])
    q, k, v = make_qkv(rng, d, dtype)
    out = attention(q, k, v, grid=GRID, spec=spec)
    assert out.shape == q.shape
    assert out.dtype == dtype
    assert out.device == q.device
    assert out.isfinite().all()
    ref = oracle(q, k, v, spec)
    if spec.mode.fp8:
        # e4m3 error (see test_reference): far below the ~1.4 a wrong token order would give.
        assert rel_l2(out, ref) < 0.1
        per_row = (out.to(F64) - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert float(per_row.max()) < 0.5
    else:
        tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-8, 1e-5)}[dtype]
        torch.testing.assert_close(out.to(F64), ref, rtol=tol[0], atol=tol[1])
    if spec.mode.sparse:
        # The pattern pruned something that mattered, so the check above saw the mask.
        assert rel_l2(out, oracle(q, k, v, AttentionSpec(mode="bf16_dense"))) > 1e-2


@pytest.mark.parametrize("name", ["bf16_dense", "bf16_sparse_window", "bf16_sparse_topk"])
def test_scale_is_honoured(rng, name):
    spec = AttentionSpec.from_dict(SPECS[name])
    q, k, v = make_qkv(rng, 64, torch.float32)
    out = attention(q, k, v, grid=GRID, spec=spec, scale=0.35)
    torch.testing.assert_close(out.to(F64), oracle(q, k, v, spec, scale=0.35), rtol=1e-5, atol=1e-5)
    assert rel_l2(out, oracle(q, k, v, spec)) > 1e-2  # differs from the default 1/sqrt(D)


@pytest.mark.parametrize("grid", [(1, 1, 1), (1, 1, 13), (7, 1, 1), (2, 17, 3)])
def test_degenerate_and_thin_grids(rng, grid):
    spec = AttentionSpec.from_dict(SPECS["bf16_sparse_window"])
    q, k, v = make_qkv(rng, 64, torch.float32, grid=grid, b=1, h=2)
    out = attention(q, k, v, grid=grid, spec=spec)
    torch.testing.assert_close(out.to(F64), oracle(q, k, v, spec, grid), rtol=1e-5, atol=1e-5)


def test_grid_as_list(rng):
    # A grid read from YAML or JSON is a list.
    spec = AttentionSpec.from_dict(SPECS["fp8_sparse_window"])
    q, k, v = make_qkv(rng, 64, torch.float32)
    out = attention(q, k, v, grid=list(GRID), spec=spec)
    torch.testing.assert_close(out, attention(q, k, v, grid=GRID, spec=spec), rtol=0, atol=0)


def test_backend_reference_equals_auto_on_cpu(rng):
    spec = AttentionSpec.from_dict(SPECS["fp8_sparse_topk"])
    q, k, v = make_qkv(rng, 64, torch.bfloat16)
    auto = attention(q, k, v, grid=GRID, spec=spec)
    ref = attention(q, k, v, grid=GRID, spec=spec, backend="reference")
    assert torch.equal(auto, ref)


# ---------------------------------------------------------------- bad inputs


def test_mismatched_shapes_are_named(rng):
    spec = AttentionSpec(mode="fp8_dense")
    q, k, v = make_qkv(rng, 64, torch.float32)
    for kk, vv, named in [
        (k[..., :104, :], v, "k (2, 3, 104, 64)"),
        (k, v[..., :32], "v (2, 3, 105, 32)"),
        (k[:1], v, "k (1, 3, 105, 64)"),
        (k[:, :2], v[:, :2], "v (2, 2, 105, 64)"),
    ]:
        with pytest.raises(ValueError) as e:
            attention(q, kk, vv, grid=GRID, spec=spec)
        assert "q (2, 3, 105, 64)" in str(e.value) and named in str(e.value)
    with pytest.raises(ValueError, match=r"q \(3, 105, 64\)"):
        attention(q[0], k[0], v[0], grid=GRID, spec=spec)


@pytest.mark.parametrize("grid", [(3, 5, 6), (105, 1, 2), (0, 5, 7)])
def test_grid_product_mismatch_is_named(rng, grid):
    q, k, v = make_qkv(rng, 64, torch.float32)
    with pytest.raises(ValueError) as e:
        attention(q, k, v, grid=grid, spec=AttentionSpec(mode="bf16_dense"))
    msg = str(e.value)
    assert str(tuple(grid)) in msg and "105" in msg


@pytest.mark.parametrize("grid", [(3, 35), (-1, -105, 1)])
def test_grid_must_be_three_positive_sizes(rng, grid):
    q, k, v = make_qkv(rng, 64, torch.float32)
    with pytest.raises(ValueError, match="three positive"):
        attention(q, k, v, grid=grid, spec=AttentionSpec(mode="bf16_dense"))


def test_dtype_mismatch_is_named(rng):
    q, k, v = make_qkv(rng, 64, torch.float32)
    with pytest.raises(ValueError) as e:
        attention(q, k.bfloat16(), v, grid=GRID, spec=AttentionSpec(mode="fp8_dense"))
    assert "torch.float32" in str(e.value) and "torch.bfloat16" in str(e.value)


# ---------------------------------------------------------------- non-finite inputs
#
# api.attention's docstring says how non-finite values propagate (NaN, never finite garbage).
# For a poisoned q token that means: its own row (bf16 modes), every row of its q tile (fp8
# modes: the tile's scale is non-finite); finite everywhere else.

POISONS = [float("nan"), float("inf"), float("-inf")]


def nan_rows(out: torch.Tensor) -> torch.Tensor:
    return out.isnan().any(-1)


def check_nan_rows(out: torch.Tensor, expected_rows: torch.Tensor) -> None:
    """expected_rows: bool (B, H, N). NaN there; everything else finite."""
    got = nan_rows(out)
    extra = torch.nonzero(got & ~expected_rows).tolist()
    missing = torch.nonzero(expected_rows & ~got).tolist()
    assert not extra and not missing, (
        f"NaN in {int(got.sum())} rows, expected {int(expected_rows.sum())}; "
        f"unexpected (b, h, row): {extra[:5]}, missing: {missing[:5]}"
    )
    assert out[~expected_rows].isfinite().all()


@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", list(SPECS))
def test_poisoned_q_token(rng, name, poison):
    spec = AttentionSpec.from_dict(SPECS[name])
    q, k, v = make_qkv(rng, 64, torch.bfloat16)
    b, h, i, c = 1, 2, 52, 7
    q[b, h, i, c] = poison
    out = attention(q, k, v, grid=GRID, spec=spec)
    expected = torch.zeros(B, H, math.prod(GRID), dtype=torch.bool)
    if spec.mode.fp8:
        tid = token_tile(GRID, resolved_tile(spec))
        expected[b, h] = tid == tid[i]
        assert int(expected.sum()) > 1  # the test distinguishes tile from row
    else:
        expected[b, h, i] = True
    check_nan_rows(out, expected)


@pytest.mark.parametrize(
    "name",
    ["bf16_dense", "fp8_dense", "fp8_sparse_window", "bf16_sparse_window", "fp8_sparse_topk"],
)
def test_poisoned_k_token(rng, name):
    """Rows that visit the poisoned key's tile are NaN, others finite."""
    spec = AttentionSpec.from_dict(SPECS[name])
    q, k, v = make_qkv(rng, 64, torch.bfloat16)
    b, h, j = 0, 1, 17
    k[b, h, j, 3] = float("nan")
    out = attention(q, k, v, grid=GRID, spec=spec)
    expected = torch.zeros(B, H, math.prod(GRID), dtype=torch.bool)
    if spec.mode.sparse:
        # The mask the reference uses (for topk: from the poisoned pooled scores).
        m = token_mask(spec, blocks_for(q, k, spec))
        expected[b, h] = m[min(b, m.shape[0] - 1), min(h, m.shape[1] - 1), :, j]
    else:
        expected[b, h] = True
    check_nan_rows(out, expected)


@pytest.mark.parametrize("name", ["bf16_dense", "fp8_dense"])
def test_poisoned_v_token_dense(rng, name):
    spec = AttentionSpec.from_dict(SPECS[name])
    q, k, v = make_qkv(rng, 64, torch.bfloat16)
    v[0, 1, 17, 3] = float("nan")
    out = attention(q, k, v, grid=GRID, spec=spec)
    expected = torch.zeros(B, H, math.prod(GRID), dtype=torch.bool)
    expected[0, 1] = True  # every row attends to token 17
    check_nan_rows(out, expected)


@pytest.mark.parametrize("name", ["bf16_sparse_window", "fp8_sparse_window"])
def test_poisoned_v_token_sparse(rng, name):
    spec = AttentionSpec.from_dict(SPECS[name])
    q, k, v = make_qkv(rng, 64, torch.bfloat16)
    b, h, j = 0, 1, 17
    v[b, h, j, 3] = float("nan")
    out = attention(q, k, v, grid=GRID, spec=spec)
    expected = torch.zeros(B, H, math.prod(GRID), dtype=torch.bool)
    if spec.mode.fp8:  # the per-channel V scale carries it to channel 3 of every row
        expected[b, h] = True
    else:
        expected[b, h] = token_mask(spec, blocks_for(q, k, spec))[0, 0, :, j]
        assert not expected[b, h].all()  # some rows do not visit token 17's tile
    check_nan_rows(out, expected)
    assert out[b, h][expected[b, h]][:, 3].isnan().all()
    assert out[b, h][:, [0, 1, 2, 4]].isfinite().all()
