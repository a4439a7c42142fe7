"""Sparsity patterns: the stated fraction, the diagonal, index hygiene, and each kind's own rule
checked by brute force."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstune.kernels import BlockIndex, Pattern, TileLayout, block_index, keep_count
from fpstune.kernels.patterns import tile_means

WINDOW = Pattern(kind="window")
TOPK = Pattern(kind="topk")
SPARSITIES = [0.0, 0.3, 0.5, 0.75, 0.9, 0.99]


def pooled(rng: torch.Generator, layout: TileLayout, b: int = 2, h: int = 3, d: int = 16):
    qp, kp = (torch.randn(b, h, layout.n_tiles, d, generator=rng) for _ in range(2))
    return qp, kp


def pooled_scores64(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    return (qp.double() @ kp.double().transpose(-1, -2)) / math.sqrt(qp.shape[-1])


def check_index(blocks: BlockIndex, n_tiles: int, n_keep: int, exact: bool) -> None:
    """Counts, diagonal, ascending unique in-range indices, and dense_mask agreeing with them."""
    idx, cnt = blocks.kv_index, blocks.kv_count
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert idx.shape[2] == n_tiles and cnt.shape == idx.shape[:3]
    if exact:
        assert torch.all(cnt == n_keep)
    else:
        assert torch.all((cnt >= 1) & (cnt <= n_keep))
    mask = blocks.dense_mask(n_tiles)
    assert mask.shape == (*idx.shape[:2], n_tiles, n_tiles)
    assert torch.equal(mask.sum(-1), cnt.long())
    assert torch.all(mask.diagonal(dim1=-2, dim2=-1))  # own tile always kept
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            for i in range(n_tiles):
                row = idx[b, h, i, : cnt[b, h, i]]
                assert torch.all(row[1:] > row[:-1])  # ascending, hence unique
                assert int(row.min()) >= 0 and int(row.max()) < n_tiles
                assert torch.equal(torch.nonzero(mask[b, h, i]).squeeze(-1), row.long())


# ---------------------------------------------------------------- keep_count


@given(n=st.integers(1, 400), data=st.data())
@settings(max_examples=200, deadline=None)
def test_keep_count_matches_exact_arithmetic(n, data):
    k = data.draw(st.integers(0, n - 1))
    # sparsity = k/n exactly (as a float): skip k tiles, despite float rounding of k/n * n.
    assert keep_count(n, k / n) == n - k
    s = data.draw(st.floats(0.0, 0.999999))
    expected = max(1, n - math.floor(Fraction(s) * n))
    # Within 1e-9 of an integer the epsilon may round up; elsewhere it is exact.
    if abs(Fraction(s) * n - round(Fraction(s) * n)) > 1e-8:
        assert keep_count(n, s) == expected
    assert 1 <= keep_count(n, s) <= n
    assert (n - keep_count(n, s)) / n <= s + 1e-9  # never skips more than asked


def test_keep_count_examples():
    assert keep_count(10, 0.0) == 10
    assert keep_count(10, 0.3) == 7
    assert keep_count(100, 0.29) == 71
    assert keep_count(10, 0.95) == 1
    assert keep_count(1, 0.9) == 1
    assert keep_count(3, 0.5) == 2


# ---------------------------------------------------------------- common rules, every kind


@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("kind", ["window", "topk", "cdf"])
@pytest.mark.parametrize(("grid", "tile"), [((3, 5, 7), (1, 2, 2)), ((5, 6, 7), (2, 2, 3))])
def test_every_kind_keeps_the_stated_fraction(rng, grid, tile, kind, s):
    layout = TileLayout(grid, tile)
    n = layout.n_tiles
    qp, kp = pooled(rng, layout)
    pattern = Pattern(kind=kind, mass=0.9)
    blocks = block_index(layout, pattern, s, q_pooled=qp, k_pooled=kp)
    check_index(blocks, n, keep_count(n, s), exact=kind != "cdf")
    if kind != "window":
        assert blocks.kv_index.shape[:2] == (2, 3)


def test_dense_mask_by_hand():
    idx = torch.tensor([[[[0, 2, 0], [1, 0, 0], [0, 1, 2]]]], dtype=torch.int32)
    cnt = torch.tensor([[[2, 1, 3]]], dtype=torch.int32)
    mask = BlockIndex(idx, cnt).dense_mask(3)
    expected = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("kind", ["topk", "cdf"])
def test_data_dependent_kinds_need_pooled_inputs(kind):
    layout = TileLayout((3, 5, 7), (1, 2, 2))
    with pytest.raises(ValueError, match=kind):
        block_index(layout, Pattern(kind=kind), 0.5)


# ---------------------------------------------------------------- window


def scaled_chebyshev(layout: TileLayout, aspect) -> torch.Tensor:
    c = layout.tile_coords().double()
    return ((c[:, None] - c[None]).abs() / torch.tensor(aspect, dtype=torch.float64)).amax(-1)


axis_tiles = st.integers(1, 6)
aspects = st.tuples(*[st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0])] * 3)


@given(
    nt=axis_tiles,
    nh=axis_tiles,
    nw=axis_tiles,
    aspect=aspects,
    s1=st.floats(0.0, 0.99),
    s2=st.floats(0.0, 0.99),
)
@settings(max_examples=60, deadline=None)
def test_window_is_nearest_nested_and_static(nt, nh, nw, aspect, s1, s2):
    layout = TileLayout((2 * nt - 1, 3 * nh, 2 * nw), (2, 3, 2))
    assert layout.tiles_per_axis == (nt, nh, nw)
    n = layout.n_tiles
    pattern = Pattern(kind="window", window=aspect)
    lo, hi = sorted((s1, s2))
    dense_lo = block_index(layout, pattern, lo).dense_mask(n)[0, 0]
    dense_hi = block_index(layout, pattern, hi).dense_mask(n)[0, 0]
    check_index(block_index(layout, pattern, hi), n, keep_count(n, hi), exact=True)
    # Higher sparsity keeps a subset of what lower sparsity keeps.
    assert torch.all(dense_lo | ~dense_hi)
    # The kept tiles are the nearest ones: none dropped is strictly nearer than one kept.
    dist = scaled_chebyshev(layout, aspect)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    far_kept = torch.where(dense_hi, dist, -inf).amax(-1)
    near_dropped = torch.where(dense_hi, inf, dist).amin(-1)
    assert torch.all(far_kept <= near_dropped)


def test_window_same_for_every_head_and_batch(rng):
    layout = TileLayout((5, 6, 7), (1, 2, 2))
    qp, kp = pooled(rng, layout)
    static = block_index(layout, WINDOW, 0.8)
    with_data = block_index(layout, WINDOW, 0.8, q_pooled=qp, k_pooled=kp)
    assert static.kv_index.shape[:2] == (1, 1)
    assert torch.equal(static.kv_index, with_data.kv_index)
    assert torch.equal(static.kv_count, with_data.kv_count)
    # Different data, same window.
    other = block_index(layout, WINDOW, 0.8, q_pooled=-qp, k_pooled=kp.flip(-2))
    assert torch.equal(other.kv_index, static.kv_index)


@pytest.mark.parametrize(
    ("aspect", "n_keep", "box"),
    [
        ((1.0, 1.0, 1.0), 1, None),
        ((1.0, 1.0, 1.0), 7, None),  # the 3D cross (L1 <= 1)
        ((1.0, 1.0, 1.0), 19, None),  # cube minus corners (L1 <= 2 inside the cube)
        ((1.0, 1.0, 1.0), 27, (1, 1, 1)),  # the 3x3x3 cube
        ((1.0, 2.0, 2.0), 75, (1, 2, 2)),  # a 3x5x5 box
        ((2.0, 1.0, 1.0), 45, (2, 1, 1)),  # a 5x3x3 box
    ],
)
def test_window_symmetric_at_centre(aspect, n_keep, box):
    layout = TileLayout((7, 7, 7), (1, 1, 1))
    n = layout.n_tiles
    s = (n - n_keep) / n
    assert keep_count(n, s) == n_keep
    blocks = block_index(layout, Pattern(kind="window", window=aspect), s)
    centre = (3 * 7 + 3) * 7 + 3
    coords = layout.tile_coords()
    kept = blocks.kv_index[0, 0, centre].long()
    offsets = {tuple(x) for x in (coords[kept] - coords[centre]).tolist()}
    assert len(offsets) == n_keep
    assert offsets == {tuple(-a for a in o) for o in offsets}  # point-symmetric
    # And symmetric under mirroring each axis separately.
    for axis in range(3):
        mirrored = {tuple(-a if j == axis else a for j, a in enumerate(o)) for o in offsets}
        assert mirrored == offsets
    if box is not None:
        assert offsets == {
            (a, b, c)
            for a in range(-box[0], box[0] + 1)
            for b in range(-box[1], box[1] + 1)
            for c in range(-box[2], box[2] + 1)
        }


def test_window_at_corner_extends_inward():
    layout = TileLayout((5, 5, 5), (1, 1, 1))
    n = layout.n_tiles
    blocks = block_index(layout, WINDOW, (n - 8) / n)
    # The corner tile's 8 nearest are the 2x2x2 block it starts.
    kept = layout.tile_coords()[blocks.kv_index[0, 0, 0].long()]
    assert {tuple(c) for c in kept.tolist()} == {
        (a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)
    }


# ---------------------------------------------------------------- topk


@pytest.mark.parametrize("s", [0.25, 0.5, 0.8, 0.95])
def test_topk_picks_the_true_top_scores(rng, s):
    layout = TileLayout((5, 6, 7), (1, 2, 2))
    n = layout.n_tiles
    qp, kp = pooled(rng, layout)
    blocks = block_index(layout, TOPK, s, q_pooled=qp, k_pooled=kp)
    n_keep = keep_count(n, s)
    check_index(blocks, n, n_keep, exact=True)
    scores = pooled_scores64(qp, kp)
    mask = blocks.dense_mask(n)
    eye = torch.eye(n, dtype=torch.bool)
    # Off the diagonal, the kept tiles are the n_keep - 1 highest scores (brute force by sorting).
    off = scores.masked_fill(eye, float("-inf"))
    top = off.argsort(-1, descending=True)[..., : n_keep - 1]
    expected = torch.zeros_like(mask).scatter_(-1, top, True) | eye
    # Ties (to float32 precision) could legitimately differ; random scores have none.
    assert torch.equal(mask, expected)


def test_topk_follows_the_data(rng):
    layout = TileLayout((3, 5, 7), (1, 2, 2))
    n = layout.n_tiles
    d = n
    # Pooled q of tile i points at pooled k of tile (i + 5) mod n: that tile must be kept.
    kp = torch.eye(n, d).view(1, 1, n, d) * 10
    qp = torch.roll(kp, shifts=-5, dims=-2) + 0.01 * torch.randn(1, 1, n, d, generator=rng)
    blocks = block_index(layout, TOPK, 1 - 2 / n, q_pooled=qp, k_pooled=kp)
    assert torch.all(blocks.kv_count == 2)
    expected = torch.stack([torch.arange(n), (torch.arange(n) + 5) % n], -1).sort(-1).values
    assert torch.equal(blocks.kv_index[0, 0].long(), expected)


# ---------------------------------------------------------------- cdf


@pytest.mark.parametrize("mass", [0.3, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
def test_cdf_reaches_mass_minimally_unless_capped(rng, mass, s):
    layout = TileLayout((5, 6, 7), (1, 2, 2))
    n = layout.n_tiles
    qp, kp = pooled(rng, layout, d=8)
    qp = qp * 3  # peaked enough that the mass is reached before the cap at low sparsity
    blocks = block_index(layout, Pattern(kind="cdf", mass=mass), s, q_pooled=qp, k_pooled=kp)
    n_keep = keep_count(n, s)
    check_index(blocks, n, n_keep, exact=False)
    probs = pooled_scores64(qp, kp).softmax(-1)
    mask = blocks.dense_mask(n)
    kept_mass = (probs * mask).sum(-1)
    cnt = blocks.kv_count
    capped = cnt == n_keep
    tol = 1e-5  # the pattern sums float32 probabilities
    assert torch.all(capped | (kept_mass >= mass - tol))
    # Minimal: dropping the lowest-scoring kept tile that is not the diagonal falls short.
    eye = torch.eye(n, dtype=torch.bool)
    lowest = torch.where(mask & ~eye, probs, torch.tensor(float("inf"), dtype=probs.dtype))
    without = kept_mass - lowest.amin(-1)
    assert torch.all((cnt == 1) | (without < mass + tol))
    # The kept off-diagonal tiles are the top-scoring ones.
    worst_kept = torch.where(mask & ~eye, probs, torch.tensor(2.0, dtype=probs.dtype)).amin(-1)
    best_dropped = torch.where(~mask, probs, torch.tensor(-1.0, dtype=probs.dtype)).amax(-1)
    assert torch.all(worst_kept >= best_dropped - tol)
    if s == 0.0:
        assert bool((~capped).any())  # the mass, not the cap, decided somewhere


def test_cdf_capped_by_sparsity_when_scores_are_flat():
    layout = TileLayout((3, 5, 7), (1, 2, 2))
    n = layout.n_tiles
    flat = torch.ones(1, 2, n, 4)
    blocks = block_index(layout, Pattern(kind="cdf", mass=0.99), 0.5, q_pooled=flat, k_pooled=flat)
    assert torch.all(blocks.kv_count == keep_count(n, 0.5))


def test_cdf_keeps_only_the_diagonal_when_it_holds_the_mass():
    layout = TileLayout((3, 5, 7), (1, 2, 2))
    n = layout.n_tiles
    kp = torch.eye(n).view(1, 1, n, n) * 30  # score 30²/√n on the diagonal, 0 elsewhere
    blocks = block_index(layout, Pattern(kind="cdf", mass=0.9), 0.0, q_pooled=kp, k_pooled=kp)
    assert torch.all(blocks.kv_count == 1)
    assert torch.equal(blocks.kv_index[0, 0, :, 0].long(), torch.arange(n))


# ---------------------------------------------------------------- tile_means


@pytest.mark.parametrize(
    ("grid", "tile"), [((3, 5, 7), (2, 2, 2)), ((2, 3, 11), (1, 2, 4)), ((1, 4, 4), (4, 8, 8))]
)
def test_tile_means_ignore_padding(rng, grid, tile):
    layout = TileLayout(grid, tile)
    x = torch.randn(2, 3, layout.tokens, 5, generator=rng, dtype=torch.float64) + 3.0
    got = tile_means(layout.to_tiles(x), layout)
    assert got.shape == (2, 3, layout.n_tiles, 5)
    # Independent: group tokens by their tile from grid coordinates, average in float64.
    (T, H, W), (tt, th, tw) = grid, tile
    nh, nw = -(-H // th), -(-W // tw)
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    tid = (((t // tt) * nh + h // th) * nw + w // tw).reshape(-1)
    sums = torch.zeros(2, 3, layout.n_tiles, 5, dtype=torch.float64).index_add_(2, tid, x)
    counts = torch.bincount(tid, minlength=layout.n_tiles).double().view(1, 1, -1, 1)
    torch.testing.assert_close(got.double(), sums / counts, rtol=1e-6, atol=1e-6)
    if layout.padded_tokens > layout.tokens:
        # Averaging over the padded slots would shrink edge tiles' means towards zero.
        naive = layout.to_tiles(x).view(2, 3, layout.n_tiles, -1, 5).mean(-2)
        assert not torch.allclose(naive, sums / counts, atol=1e-3)
