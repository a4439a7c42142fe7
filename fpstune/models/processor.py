"""fpstune's attention processor for diffusers' Wan transformer.

`install(transformer, router)` replaces the processor of every block's self-attention (``attn1``)
with `WanSelfAttention`, which computes what diffusers' ``WanAttnProcessor`` computes for
self-attention (q/k/v projections, RMS norms, rotary embedding, output projection) but routes the
attention itself through `fpstune.kernels.attention` with the spec the router gives for (layer,
current step). The rotary embedding goes to the router with q and k (``fuse_rope``, the default):
on the GPU the kernels' pre-pass applies it in fp32 while it quantises, instead of diffusers'
separate bf16 pass. Cross-attention (``attn2``, text tokens) is left to diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fpstune.kernels.policy import Task
from fpstune.kernels.rope import rotary
from fpstune.models import routing
from fpstune.models.router import AttentionRouter
from fpstune.models.routing import Dims, Grid, divided, hidden_of


class WanSelfAttention:
    """Processor for one Wan block's ``attn1``; ``layer`` is the block index. ``fuse_rope``:
    hand the rotary tables to the router (the kernels rotate q and k) instead of rotating here
    as diffusers does."""

    def __init__(self, router: AttentionRouter, layer: int, fuse_rope: bool = True) -> None:
        self.router = router
        self.layer = layer
        self.fuse_rope = fuse_rope

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
        rope = None
        if rotary_emb is not None and self.fuse_rope:
            rope = rotary_emb
        elif rotary_emb is not None:
            q, k = rotary(q, *rotary_emb), rotary(k, *rotary_emb)
        # (batch, tokens, heads, dim) -> (batch, heads, tokens, dim), the runtime's layout.
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = _route(self, qt, kt, vt, rope).flatten(2, 3).type_as(q)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


@torch.compiler.disable
def _route(
    processor: WanSelfAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The router's output as (batch, tokens, heads, dim), contiguous whatever path ran it.

    Outside any torch.compile graph, and reading the layer here rather than in the compiled
    ``__call__``: Dynamo would guard on each processor's layer index (a recompile per layer), on
    the router's step and call counters (a recompile per step), and on the output's strides,
    which differ between SDPA and the kernels."""
    return processor.router.run(processor.layer, q, k, v, rope=rope).transpose(1, 2).contiguous()


class WanRouting:
    """`fpstune.models.routing.Routing` for ``WanTransformer3DModel``: every block's ``attn1``."""

    def modules(self, transformer: Any) -> list[tuple[str, Any]]:
        blocks = getattr(transformer, "blocks", None)
        if blocks is None:
            raise TypeError(f"{type(transformer).__name__} has no Wan transformer blocks")
        return [(f"blocks.{i}.attn1", block.attn1) for i, block in enumerate(blocks)]

    def processor(self, router: AttentionRouter, layer: int, *, fuse_rope: bool) -> Any:
        return WanSelfAttention(router, layer, fuse_rope)

    def original(self) -> Any:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        return WanAttnProcessor()

    def grid(self, transformer: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Grid:
        return patch_grid(transformer, hidden_of(args, kwargs))

    def dims(self, transformer: Any) -> Dims:
        c = transformer.config
        return Dims(int(c.num_attention_heads), int(c.attention_head_dim), int(c.num_layers))

    def task(self, target: Any) -> Task | None:
        from fpstune.models.wan import task_of

        return task_of(target)


WAN = WanRouting()


def install(transformer: Any, router: AttentionRouter, fuse_rope: bool = True) -> int:
    """Patch every block's self-attention of a diffusers ``WanTransformer3DModel``; returns the
    number of layers patched. Idempotent: re-installing replaces the router. ``fuse_rope``: see
    `WanSelfAttention`."""
    return routing.install(WAN, transformer, router, fuse_rope)


def patch_grid(transformer: Any, latents: torch.Tensor) -> Grid:
    """The (T, H, W) latent-patch grid of ``latents`` (batch, channels, frames, height, width)."""
    patch = tuple(transformer.config.patch_size)
    return divided(tuple(latents.shape[2:]), patch, f"latents {tuple(latents.shape)}: sizes")


__all__ = ["WAN", "WanRouting", "WanSelfAttention", "install", "patch_grid"]
