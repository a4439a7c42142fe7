"""Rotary position embedding as Wan applies it to q and k, for fusing into the pre-pass.

Wan's attention (diffusers' ``WanAttnProcessor``) rotates interleaved channel pairs of q and k
by per-token angles before attention: for pair i of token n, with ``cos`` and ``sin`` tables of
(tokens, head_dim) where pair i reads ``cos[n, 2i]`` and ``sin[n, 2i + 1]``::

    out[2i]     = x[2i] * cos - x[2i + 1] * sin
    out[2i + 1] = x[2i] * sin + x[2i + 1] * cos

`rotary` is that computation in PyTorch and `rotate_qk` applies it to (batch, heads, tokens,
head_dim) q and k: the fallback for the paths that do not fuse it. `tables` checks and
flattens the tables the model gives (diffusers: (1, tokens, 1, head_dim) fp32) for the
pre-pass, which applies the same rotation to each fp32 row it loads, before the tile's FP8
scale is taken, so the rotated q and k never make a round trip through memory.
"""

from __future__ import annotations

import torch

Rope = tuple[torch.Tensor, torch.Tensor]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (..., tokens, ..., head_dim) rotated as Wan does, in ``x``'s dtype; ``cos`` and
    ``sin`` broadcast against ``x`` (diffusers' layout: (1, tokens, 1, head_dim) for x as
    (batch, tokens, heads, head_dim))."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def tables(rope: Rope, tokens: int, head_dim: int, device: torch.device) -> Rope:
    """``rope``'s (cos, sin) as contiguous fp32 (tokens, head_dim) tables on ``device``; a table
    of another size, or on another device, is refused naming its shape."""
    out = []
    for name, t in zip(("cos", "sin"), rope, strict=True):
        if t.numel() != tokens * head_dim or t.shape[-1] != head_dim:
            raise ValueError(
                f"rope {name} has shape {tuple(t.shape)}; expected {tokens} tokens x {head_dim} "
                f"channels, e.g. (1, {tokens}, 1, {head_dim}) as diffusers' Wan gives it"
            )
        if t.device != device:
            raise ValueError(f"rope {name} is on {t.device}, the inputs on {device}")
        out.append(t.reshape(tokens, head_dim).float().contiguous())
    return out[0], out[1]


def with_identity(cos: torch.Tensor, sin: torch.Tensor, text: int, *, first: bool) -> Rope:
    """(video, D) tables extended by ``text`` rows that leave a token as it is (cos 1, sin 0),
    before the video rows or after them: the joint sequence's tables (text is not rotated)."""
    ones = torch.ones(text, cos.shape[1], dtype=cos.dtype, device=cos.device)
    zeros = torch.zeros_like(ones)
    if first:
        return torch.cat((ones, cos)).contiguous(), torch.cat((zeros, sin)).contiguous()
    return torch.cat((cos, ones)).contiguous(), torch.cat((sin, zeros)).contiguous()


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, rope: Rope, *, text: int = 0, text_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, heads, tokens, head_dim) ``q`` and ``k`` rotated by the model's tables, each in its
    own dtype; with ``text`` tokens (after the video, or before it with ``text_first``) only the
    video tokens are rotated."""
    start = text if text_first else 0
    video = q.shape[2] - text
    cos, sin = tables(rope, video, q.shape[3], q.device)
    if not text:
        return rotary(q, cos, sin), rotary(k, cos, sin)
    out = []
    for x in (q, k):
        y = x.clone()
        y[:, :, start : start + video] = rotary(x[:, :, start : start + video], cos, sin)
        out.append(y)
    return out[0], out[1]
