"""The reference: plain PyTorch that defines what every mode computes. Runs on CPU and GPU.

Semantics, given q, k, v of shape (B, H, N, D) in model order and a 3D tile:

- ``bf16_dense``: exact softmax(q kᵀ · scale) v on the inputs as given.
- every other mode permutes to padded tile-major order (`TileLayout`); padded keys get no weight.
- ``fp8_*``: q and k are quantised to e4m3 with one scale per (batch, head, tile): amax / 448;
  v with one scale per (batch, head, channel) over all tokens; the softmax numerator
  P = exp(s - rowmax) ∈ [0, 1] is quantised as e4m3(P · 448) / 448 before P·V, while the row sum
  uses P unquantised (fp32). All products accumulate in fp32.
- ``*_sparse``: a q tile attends only to the kv tiles its `BlockIndex` keeps (see patterns.py);
  tile-pooled scores for data-dependent patterns come from the unquantised q and k.
- joint text + video (``text`` tokens after the video, or before with ``text_first``): text
  tokens form tiles of their own (`TileLayout`), so they get their own FP8 scales; a video q tile
  keeps its pattern's video tiles plus every text tile, a text q tile keeps every tile.
  ``text_mask`` (B, text) bool, the model's prompt mask: a False text token is a key no query
  sees (its q row is still computed, attending to the rest); V's channel scales still span it.

Non-finite inputs are not checked here; `attention()` documents what it does with them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .patterns import BlockIndex, block_index, tile_means
from .spec import AttentionSpec, Mode
from .tiling import TileLayout, prompt_key_mask

FP8_MAX = 448.0
P_SCALE = 448.0
_SCALE_FLOOR = 1e-20  # an all-zero tile gets a tiny scale instead of 0/0


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e4m3 value (saturating at ±448), returned in x's dtype."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def tile_scales(xt: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """(B, H, padded_tokens, D) -> (B, H, n_tiles) fp32 scales: amax over the tile / 448."""
    b, h, _, d = xt.shape
    amax = xt.float().abs().view(b, h, layout.n_tiles, layout.tile_tokens * d).amax(-1)
    return (amax / FP8_MAX).clamp_min(_SCALE_FLOOR)


def channel_scales(xt: torch.Tensor) -> torch.Tensor:
    """(B, H, tokens, D) -> (B, H, D) fp32 scales: amax over all tokens / 448."""
    return (xt.float().abs().amax(-2) / FP8_MAX).clamp_min(_SCALE_FLOOR)


def fake_quant_tiles(xt: torch.Tensor, scales: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    b, h, n, _d = xt.shape
    s = scales.to(xt.dtype).repeat_interleave(layout.tile_tokens, dim=-1).view(b, h, n, 1)
    return fp8_round(xt / s) * s


def fake_quant_channels(xt: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    s = scales.to(xt.dtype).unsqueeze(-2)
    return fp8_round(xt / s) * s


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    spec: AttentionSpec,
    tile: tuple[int, int, int],
    scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    blocks: BlockIndex | None = None,
    q_chunk: int = 2048,
    text: int = 0,
    text_first: bool = False,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention as ``spec`` defines it, computed in ``dtype``; returns (B, H, N, D) in ``dtype``.

    ``tile`` is the resolved tile (the spec's, or the default for the grid). ``blocks`` overrides
    the pattern's block index (tests use it to feed the Triton path's index to the reference).
    ``text``, ``text_first``, ``text_mask``: a joint text + video sequence (module docstring).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if spec.mode is Mode.BF16_DENSE:
        mask = None if text_mask is None else prompt_key_mask(text_mask, q.shape[2], text_first)
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
    layout = TileLayout(grid, tile, text, text_first)
    qt, kt, vt = (layout.to_tiles(x.to(dtype)) for x in (q, k, v))
    if spec.mode.sparse and blocks is None:
        assert spec.pattern is not None
        pooled = spec.pattern.kind != "window"
        blocks = block_index(
            layout,
            spec.pattern,
            spec.sparsity,
            q_pooled=tile_means(qt, layout) if pooled else None,
            k_pooled=tile_means(kt, layout) if pooled else None,
        )
    if spec.mode.fp8:
        qt = fake_quant_tiles(qt, tile_scales(qt, layout), layout)
        kt = fake_quant_tiles(kt, tile_scales(kt, layout), layout)
        vt = fake_quant_channels(vt, channel_scales(vt))
    tile_mask = None
    if blocks is not None:
        tile_mask = blocks.dense_mask(layout.n_tiles).to(q.device)
    kv_valid = layout.key_valid(text_mask, q.device)
    out = _attend(
        qt, kt, vt, layout, kv_valid, scale, tile_mask, fp8_p=spec.mode.fp8, q_chunk=q_chunk
    )
    return layout.from_tiles(out)


def _attend(
    qt: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    layout: TileLayout,
    kv_valid: torch.Tensor,
    scale: float,
    tile_mask: torch.Tensor | None,
    *,
    fp8_p: bool,
    q_chunk: int,
) -> torch.Tensor:
    """``kv_valid``: (B|1, padded_tokens) bool, the keys a query may see at all."""
    out = torch.empty_like(qt)
    tt = layout.tile_tokens
    q_chunk = max(tt, q_chunk // tt * tt)  # whole tiles per chunk
    for start in range(0, qt.shape[-2], q_chunk):
        stop = min(start + q_chunk, qt.shape[-2])
        s = (qt[..., start:stop, :] @ kt.transpose(-1, -2)) * scale
        keep = kv_valid[:, None, None, :]
        if tile_mask is not None:
            rows = tile_mask[..., start // tt : stop // tt, :]
            keep = keep & rows.repeat_interleave(tt, dim=-2).repeat_interleave(tt, dim=-1)
        s = s.masked_fill(~keep, float("-inf"))
        p = torch.exp(s - s.amax(-1, keepdim=True))
        denom = p.sum(-1, keepdim=True)
        if fp8_p:
            p = fp8_round(p * P_SCALE) / P_SCALE
        if tile_mask is None:
            out[..., start:stop, :] = (p @ vt) / denom
        else:
            # A skipped kv tile is never read, so a non-finite value there must not leak into
            # rows that skip it (0 * NaN would); rows that keep it get NaN in that channel.
            bad = ~vt.isfinite()
            pv = p @ vt.masked_fill(bad, 0.0)
            reach = (keep.to(vt.dtype) @ bad.to(vt.dtype)) > 0
            out[..., start:stop, :] = (pv / denom).masked_fill(reach, float("nan"))
    return out
