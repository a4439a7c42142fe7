"""fpstune's attention processor for diffusers' Wan transformer.

`install(transformer, router)` replaces the processor of every block's self-attention (``attn1``)
with `WanSelfAttention`, which computes exactly what diffusers' ``WanAttnProcessor`` computes for
self-attention (q/k/v projections, RMS norms, rotary embedding, output projection) but routes the
attention itself through `fpstune.kernels.attention` with the spec the router gives for (layer,
current step). Cross-attention (``attn2``, text tokens) is left to diffusers.
"""

from __future__ import annotations

from typing import Any

import torch

from .router import AttentionRouter


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same as diffusers' WanAttnProcessor (interleaved pairs).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSelfAttention:
    """Processor for one Wan block's ``attn1``; ``layer`` is the block index."""

    def __init__(self, router: AttentionRouter, layer: int) -> None:
        self.router = router
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("fpstune's Wan processor serves self-attention without a mask only")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotary(q, *rotary_emb), _rotary(k, *rotary_emb)
        # (batch, tokens, heads, dim) -> (batch, heads, tokens, dim), the runtime's layout.
        out = self.router.run(self.layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


def install(transformer: Any, router: AttentionRouter) -> int:
    """Patch every block's self-attention of a diffusers ``WanTransformer3DModel``; returns the
    number of layers patched. Idempotent: re-installing replaces the router."""
    blocks = getattr(transformer, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no Wan transformer blocks")
    for i, block in enumerate(blocks):
        if getattr(block.attn1, "fused_projections", False):
            raise ValueError(f"block {i}: fused q/k/v projections are not supported")
        block.attn1.set_processor(WanSelfAttention(router, i))
    return len(blocks)


def patch_grid(transformer: Any, latents: torch.Tensor) -> tuple[int, int, int]:
    """The (T, H, W) latent-patch grid of ``latents`` (batch, channels, frames, height, width)."""
    p_t, p_h, p_w = transformer.config.patch_size
    _, _, f, h, w = latents.shape
    if f % p_t or h % p_h or w % p_w:
        raise ValueError(
            f"latents {tuple(latents.shape)} are not divisible by the patch size "
            f"{tuple(transformer.config.patch_size)}"
        )
    return (f // p_t, h // p_h, w // p_w)


__all__ = ["WanSelfAttention", "install", "patch_grid"]
