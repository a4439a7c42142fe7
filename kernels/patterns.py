"""Block-sparsity patterns at 3D-tile granularity.

A pattern decides, for every q tile, which kv tiles are visited; `sparsity` is the fraction of kv
tiles skipped. With n tiles, a q tile keeps ``n_keep = max(1, n - floor(sparsity * n))`` kv tiles
(``cdf`` may keep fewer). Every pattern keeps the q tile's own kv tile, so no query row is empty.

Patterns return `BlockIndex`: per (batch, head, q tile) the kept kv tiles in ascending order
(the order the kernel visits them) and their count.

Joint text + video layouts (`TileLayout.text`): the pattern and the sparsity apply to the video
tiles alone; every video q tile then keeps every text tile as well, and text q tiles attend to
every tile (`with_text`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .spec import Pattern
from .tiling import TileLayout


@dataclass(frozen=True)
class BlockIndex:
    """kv_index[b, h, i, :kv_count[b, h, i]]: kv tiles that q tile i visits, ascending (int32).

    The batch and head dims may be 1 and broadcast (static patterns).
    """

    kv_index: torch.Tensor
    kv_count: torch.Tensor

    def dense_mask(self, n_tiles: int) -> torch.Tensor:
        """Bool (B|1, H|1, n_tiles, n_tiles): True where q tile i visits kv tile j."""
        b, h, nq, width = self.kv_index.shape
        used = torch.arange(width, device=self.kv_index.device) < self.kv_count.unsqueeze(-1)
        mask = torch.zeros(b, h, nq, n_tiles + 1, dtype=torch.bool, device=self.kv_index.device)
        # Unused slots scatter into a spare column that is cut off below.
        idx = torch.where(
            used, self.kv_index.long(), torch.full_like(self.kv_index.long(), n_tiles)
        )
        mask.scatter_(-1, idx, True)
        return mask[..., :n_tiles]


def keep_count(n_tiles: int, sparsity: float) -> int:
    return max(1, n_tiles - math.floor(sparsity * n_tiles + 1e-9))


def block_index(
    layout: TileLayout,
    pattern: Pattern,
    sparsity: float,
    *,
    q_pooled: torch.Tensor | None = None,
    k_pooled: torch.Tensor | None = None,
) -> BlockIndex:
    """The kv tiles each q tile keeps. ``q_pooled``/``k_pooled``: (B, H, n_tiles, D) tile means
    (see `tile_means`), needed by the data-dependent kinds."""
    if layout.text:
        vt = layout.video_tiles
        video = block_index(
            layout.video,
            pattern,
            sparsity,
            q_pooled=None if q_pooled is None else q_pooled[..., :vt, :],
            k_pooled=None if k_pooled is None else k_pooled[..., :vt, :],
        )
        return with_text(video, layout.text_tiles)
    n_keep = keep_count(layout.n_tiles, sparsity)
    if pattern.kind == "window":
        device = q_pooled.device if q_pooled is not None else torch.device("cpu")
        return _window_index(layout, pattern.window, n_keep, device)
    if q_pooled is None or k_pooled is None:
        raise ValueError(f"pattern {pattern.kind!r} needs tile-pooled q and k")
    scores = q_pooled.float() @ k_pooled.float().transpose(-1, -2)
    scores = scores / math.sqrt(q_pooled.shape[-1])
    if pattern.kind == "topk":
        return _topk_index(scores, n_keep)
    return _cdf_index(scores, n_keep, pattern.mass)


def with_text(video: BlockIndex, text_tiles: int) -> BlockIndex:
    """A video-only index extended to a joint layout: each video q tile also keeps the
    ``text_tiles`` text tiles (ids after the video tiles, so the lists stay ascending), and each
    text q tile keeps every tile."""
    if not text_tiles:
        return video
    idx, count = video.kv_index, video.kv_count
    b, h, vt, width = idx.shape
    n = vt + text_tiles
    dev = idx.device
    text = torch.arange(vt, n, dtype=idx.dtype, device=dev)
    # Video rows: their kept tiles, the text tiles right after them, zeros beyond.
    rows = torch.zeros(b, h, vt, n, dtype=idx.dtype, device=dev)
    rows[..., :width] = idx
    at = count.long().unsqueeze(-1) + torch.arange(text_tiles, device=dev)
    rows.scatter_(-1, at, text.expand(b, h, vt, text_tiles).contiguous())
    every = torch.arange(n, dtype=idx.dtype, device=dev).expand(b, h, text_tiles, n)
    full = torch.full((b, h, text_tiles), n, dtype=count.dtype, device=dev)
    return BlockIndex(
        torch.cat((rows, every), dim=-2).contiguous(),
        torch.cat((count + text_tiles, full), dim=-1).contiguous(),
    )


def tile_means(xt: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """(B, H, padded_tokens, D) with zero padding -> (B, H, n_tiles, D) means over real tokens."""
    b, h, _, d = xt.shape
    sums = xt.float().view(b, h, layout.n_tiles, layout.tile_tokens, d).sum(-2)
    return sums / layout.tile_valid_counts(xt.device).view(1, 1, -1, 1).float()


def _window_index(
    layout: TileLayout, aspect: tuple[float, float, float], n_keep: int, device: torch.device
) -> BlockIndex:
    kv_index = _window_index_cpu(layout, aspect, n_keep).to(device)
    count = torch.full(kv_index.shape[:-1], n_keep, dtype=torch.int32, device=device)
    return BlockIndex(kv_index, count)


@lru_cache(maxsize=64)
def _window_index_cpu(
    layout: TileLayout, aspect: tuple[float, float, float], n_keep: int
) -> torch.Tensor:
    """Static 3D window (Sliding-Tile style): the n_keep kv tiles nearest each q tile.

    Distance is Chebyshev in tile units scaled by ``aspect`` (a box of that aspect grown until it
    holds n_keep tiles; at the grid's borders it extends inward, like STA's shifted window). Ties
    go to the smaller scaled L1 distance, then to the lower tile index, so the choice is stable.
    """
    c = layout.tile_coords().double()
    delta = (c[:, None, :] - c[None, :, :]).abs() / torch.tensor(aspect, dtype=torch.float64)
    cheb, l1 = delta.amax(-1), delta.sum(-1)
    order = torch.sort(l1, dim=-1, stable=True).indices
    order = order.gather(-1, torch.sort(cheb.gather(-1, order), dim=-1, stable=True).indices)
    kept = order[:, :n_keep].sort(-1).values
    return kept.to(torch.int32).view(1, 1, layout.n_tiles, n_keep)


def _topk_index(scores: torch.Tensor, n_keep: int) -> BlockIndex:
    """Data-dependent (SpargeAttn / VSA style): the n_keep kv tiles with the largest pooled score,
    per batch and head, always including the diagonal tile."""
    scores = _with_diagonal_first(scores)
    kept = scores.topk(n_keep, dim=-1).indices.sort(-1).values.to(torch.int32)
    count = torch.full(kept.shape[:-1], n_keep, dtype=torch.int32, device=kept.device)
    return BlockIndex(kept, count)


def _cdf_index(scores: torch.Tensor, n_keep: int, mass: float) -> BlockIndex:
    """Data-dependent: the fewest top-scoring kv tiles whose pooled softmax mass reaches ``mass``
    (at most n_keep of them), plus the diagonal tile."""
    probs = scores.softmax(-1)
    top = _with_diagonal_first(scores).topk(n_keep, dim=-1)
    cum = probs.gather(-1, top.indices).cumsum(-1)
    # Tiles before the one that crosses `mass` are kept, and that one too.
    count = ((cum < mass).sum(-1) + 1).clamp(max=n_keep)
    used = torch.arange(n_keep, device=scores.device) < count.unsqueeze(-1)
    big = torch.iinfo(torch.int32).max
    idx = torch.where(used, top.indices, torch.full_like(top.indices, big))
    kept = idx.sort(-1).values
    kept = torch.where(kept == big, torch.zeros_like(kept), kept)
    return BlockIndex(kept.to(torch.int32), count.to(torch.int32))


def _with_diagonal_first(scores: torch.Tensor) -> torch.Tensor:
    n = scores.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    return scores.masked_fill(eye, float("inf"))


# -- what the kernels walk: the kept kv tiles, full ones first --------------------------------


@dataclass(frozen=True)
class KvList:
    """What the attention kernel walks: per (b|1, h|1, q tile|1) the kv tiles, full ones first.

    ``index[..., :full]`` are kv tiles without padded slots, ``index[..., full:count]`` those
    with padding (masked); each part ascending. int32, contiguous.
    """

    index: torch.Tensor
    count: torch.Tensor
    full: torch.Tensor


def full_first(blocks: BlockIndex, partial: torch.Tensor) -> KvList:
    """Reorder each kv list so tiles without padding come first (only the rest need the mask)."""
    idx = blocks.kv_index.long()
    n = partial.numel()
    used = torch.arange(idx.shape[-1], device=idx.device) < blocks.kv_count.unsqueeze(-1)
    part = partial.long().expand(*idx.shape[:-1], n).gather(-1, idx)  # 1 where padded
    key = torch.where(used, idx + part * n, 2 * n).sort(-1).values
    full = (used & (part == 0)).sum(-1)
    return KvList(
        (key % n).to(torch.int32).contiguous(),
        blocks.kv_count.to(torch.int32).contiguous(),
        full.to(torch.int32).contiguous(),
    )


def ranked_blocks(
    pattern: Pattern, sparsity: float, q_pooled: torch.Tensor, k_pooled: torch.Tensor
) -> BlockIndex:
    """The kv tiles `block_index` keeps for ``topk`` / ``cdf``, in rank order.

    Same choice (the tests check it against `block_index`), built with one sort per row
    instead of ``torch.topk``: at Wan 720p sizes (7,560 rows of 630 tiles) torch takes its
    multi-block top-k path, during which the host waits for the GPU (H100, behind a 1.6 ms
    matmul: 1.9 ms of host time per call, against 0.17 ms for this sort).
    """
    n_tiles = q_pooled.shape[-2]
    n_keep = keep_count(n_tiles, sparsity)
    scores = (q_pooled @ k_pooled.transpose(-1, -2)) / math.sqrt(q_pooled.shape[-1])
    ranked = scores.clone()
    ranked.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # the own tile always comes first
    order = ranked.argsort(dim=-1, descending=True)[..., :n_keep]
    if pattern.kind == "topk":
        count = torch.full(order.shape[:-1], n_keep, dtype=torch.int32, device=order.device)
    else:
        cum = scores.softmax(-1).gather(-1, order).cumsum(-1)
        count = ((cum < pattern.mass).sum(-1) + 1).clamp(max=n_keep).to(torch.int32)
    return BlockIndex(order, count)


def ascending(blocks: BlockIndex) -> BlockIndex:
    """A BlockIndex as `block_index` returns it: used entries ascending, then zeros (int32)."""
    idx = blocks.kv_index.long()
    big = torch.iinfo(torch.int64).max
    used = torch.arange(idx.shape[-1], device=idx.device) < blocks.kv_count.unsqueeze(-1)
    idx = torch.where(used, idx, big).sort(-1).values
    return BlockIndex(torch.where(idx == big, 0, idx).to(torch.int32), blocks.kv_count)
