"""3D tiling: model order <-> padded tile-major order, against an independent slot formula."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstune.kernels import TileLayout

WAN_GRIDS = [(21, 30, 52), (21, 45, 80)]  # Wan2.1 480p and 720p latent-patch grids
WAN_TILES = [(1, 16, 8), (2, 8, 8), (4, 8, 8), (6, 8, 8)]

sizes = st.integers(1, 9)
grids = st.tuples(sizes, sizes, sizes)
# Up to 11 so that tiles larger than the grid along an axis come up often.
tiles = st.tuples(st.integers(1, 11), st.integers(1, 11), st.integers(1, 11))


def expected_slot(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """Slot of each model token, written from the definition (not from TileLayout's code)."""
    (T, H, W), (tt, th, tw) = grid, tile
    nh, nw = -(-H // th), -(-W // tw)
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    tile_id = ((t // tt) * nh + h // th) * nw + w // tw
    within = ((t % tt) * th + h % th) * tw + w % tw
    return (tile_id * (tt * th * tw) + within).reshape(-1)


def token_ids(layout: TileLayout, lead: tuple[int, ...] = (), d: int = 2) -> torch.Tensor:
    """(…, tokens, d) with every entry distinct and non-zero, so padding zeros stand out."""
    n = math.prod(lead) * layout.tokens * d
    return (torch.arange(n, dtype=torch.float64) + 1).view(*lead, layout.tokens, d)


def check_layout(layout: TileLayout) -> None:
    grid, tile = layout.grid, layout.tile
    nt, nh, nw = (math.ceil(g / s) for g, s in zip(grid, tile, strict=True))
    assert layout.tiles_per_axis == (nt, nh, nw)
    assert layout.n_tiles == nt * nh * nw
    assert layout.padded_tokens == nt * nh * nw * math.prod(tile)
    assert layout.padding_fraction == pytest.approx(1 - math.prod(grid) / layout.padded_tokens)

    slot = layout.token_slot()
    assert torch.equal(slot, expected_slot(grid, tile))
    src = layout.slot_source()
    assert src.shape == (layout.padded_tokens,)
    # Every token sits in exactly one slot; every other slot is padding (-1).
    real = src[src >= 0]
    assert torch.equal(real.sort().values, torch.arange(layout.tokens))
    assert torch.equal(src[slot], torch.arange(layout.tokens))
    assert int((src < 0).sum()) == layout.padded_tokens - layout.tokens
    assert torch.equal(layout.valid(), src >= 0)

    counts = layout.tile_valid_counts()
    assert counts.shape == (layout.n_tiles,)
    assert int(counts.sum()) == layout.tokens
    assert int(counts.min()) >= 1  # no tile is all padding
    coords = layout.tile_coords()
    # Real tokens per tile = product over axes of the part of the tile inside the grid.
    starts = coords * torch.tensor(tile)
    inside = torch.minimum(torch.tensor(tile), torch.tensor(grid) - starts)
    assert torch.equal(counts, inside.prod(-1))

    # tile_coords follows the slot order: the token in tile i lies inside tile coords[i].
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    token_coords = torch.stack((t, h, w), -1).reshape(-1, 3)
    tile_of_token = slot // layout.tile_tokens
    assert torch.equal(coords[tile_of_token], token_coords // torch.tensor(tile))
    assert torch.equal(
        coords[:, 0] * nh * nw + coords[:, 1] * nw + coords[:, 2], torch.arange(layout.n_tiles)
    )


def check_round_trip(layout: TileLayout, lead: tuple[int, ...], d: int) -> None:
    x = token_ids(layout, lead, d)
    xt = layout.to_tiles(x)
    assert xt.shape == (*lead, layout.padded_tokens, d)
    assert xt.dtype == x.dtype
    valid = layout.valid()
    assert torch.all(xt[..., ~valid, :] == 0)  # padding slots are zero
    assert torch.all(xt[..., valid, :] != 0)
    # Slot s holds model token slot_source[s].
    src = layout.slot_source()
    assert torch.equal(xt[..., valid, :], x[..., src[valid], :])
    assert torch.equal(layout.from_tiles(xt), x)


@settings(max_examples=150, deadline=None)
@given(grid=grids, tile=tiles, lead=st.sampled_from([(), (2,), (2, 3)]), d=st.integers(1, 3))
def test_round_trip_random_grids(grid, tile, lead, d):
    layout = TileLayout(grid, tile)
    check_layout(layout)
    check_round_trip(layout, lead, d)


@given(grid=grids)
@settings(max_examples=30, deadline=None)
def test_tile_larger_than_grid_is_one_padded_tile(grid):
    tile = tuple(g + 2 for g in grid)
    layout = TileLayout(grid, tile)
    assert layout.n_tiles == 1
    assert layout.padded_tokens == math.prod(tile)
    check_layout(layout)
    check_round_trip(layout, (2,), 1)


@pytest.mark.parametrize("tile", WAN_TILES)
@pytest.mark.parametrize("grid", WAN_GRIDS)
def test_wan_grids(grid, tile):
    layout = TileLayout(grid, tile)
    assert layout.padded_tokens > layout.tokens  # none of these tiles divides the grid
    check_layout(layout)
    check_round_trip(layout, (), 1)


def test_unit_tile_is_identity():
    layout = TileLayout((3, 4, 5), (1, 1, 1))
    x = token_ids(layout, (2,), 3)
    assert torch.equal(layout.to_tiles(x), x)
    assert layout.padding_fraction == 0.0


def test_known_small_layout():
    # Grid 1x2x3, tile 1x2x2: tile 0 = tokens 0,1,3,4; tile 1 = tokens 2,5 + two padding slots.
    layout = TileLayout((1, 2, 3), (1, 2, 2))
    assert layout.slot_source().tolist() == [0, 1, 3, 4, 2, -1, 5, -1]
    assert layout.tile_valid_counts().tolist() == [4, 2]
    assert layout.tile_coords().tolist() == [[0, 0, 0], [0, 0, 1]]
    assert layout.padded_tokens == 8
    assert layout.padding_fraction == pytest.approx(0.25)


def test_grid_and_tile_may_be_lists():
    # Policies arrive from YAML, where tuples are lists; the layout must still hash and cache.
    a, b = TileLayout([3, 5, 7], [2, 2, 2]), TileLayout((3, 5, 7), (2, 2, 2))
    assert a == b and hash(a) == hash(b)
    x = token_ids(b)
    assert torch.equal(a.to_tiles(x), b.to_tiles(x))


@pytest.mark.parametrize(
    ("grid", "tile", "named"),
    [
        ((0, 5, 7), (1, 2, 2), "(0, 5, 7)"),
        ((3, 5), (1, 2, 2), "(3, 5)"),
        ((3, -1, 7), (1, 2, 2), "(3, -1, 7)"),
        ((3, 5, 7), (1, 0, 2), "(1, 0, 2)"),
        ((3, 5, 7), (1, 2, 2, 2), "(1, 2, 2, 2)"),
    ],
)
def test_bad_grid_or_tile_is_named(grid, tile, named):
    with pytest.raises(ValueError, match=r"(grid|tile) must be three positive") as e:
        TileLayout(grid, tile)
    assert named in str(e.value)


def test_wrong_token_count_names_shapes():
    layout = TileLayout((3, 5, 7), (2, 2, 2))
    with pytest.raises(ValueError) as e:
        layout.to_tiles(torch.ones(2, 104, 4))
    msg = str(e.value)
    assert "(3, 5, 7)" in msg and "105" in msg and "(2, 104, 4)" in msg
    with pytest.raises(ValueError) as e:
        layout.from_tiles(torch.ones(2, 105, 4))
    msg = str(e.value)
    assert str(layout.padded_tokens) in msg and "(2, 105, 4)" in msg and "(2, 2, 2)" in msg
