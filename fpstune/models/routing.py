"""How a model family's self-attention is routed through fpstune: the part of an adapter that
`fpstune.apply` and the adapters' ``install`` / ``remove`` need.

A `Routing` names the attention modules whose processors fpstune replaces (in layer order: the
index is the policy's layer), builds the processor of one layer, reads the latent-patch grid of
one transformer call from its arguments, and says the model's heads, head_dim and layers. The
processors reproduce what the model's own processor computes (projections, norms, RoPE, output
projection) and hand the attention itself to the `AttentionRouter`, with the text tokens and
the prompt mask where the model attends to text and video in one call.

Built in: `fpstune.models.processor.WAN` (Wan 2.1 / 2.2), `fpstune.models.hunyuan.HUNYUAN_VIDEO`
and ``HUNYUAN_VIDEO_15``, `fpstune.models.cogvideox.COGVIDEOX`, `fpstune.models.ltx.LTX`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fpstune.kernels.policy import Task
from fpstune.models.router import AttentionRouter


@dataclass(frozen=True)
class Dims:
    """What a policy's ``model`` must match: heads, head_dim and routed layers."""

    heads: int
    head_dim: int
    layers: int


@runtime_checkable
class Routing(Protocol):
    """One family's self-attention routing (module docstring)."""

    def modules(self, transformer: Any) -> list[tuple[str, Any]]:
        """(submodule name, attention module) of every routed self-attention, layer order."""
        ...

    def processor(self, router: AttentionRouter, layer: int, *, fuse_rope: bool) -> Any:
        """fpstune's processor for routed layer ``layer``."""
        ...

    def original(self) -> Any:
        """A new instance of the model's own processor (what a bare `uninstall` puts back)."""
        ...

    def grid(self, transformer: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Grid:
        """The (T, H, W) latent-patch grid of one forward call, from its arguments."""
        ...

    def dims(self, transformer: Any) -> Dims: ...

    def task(self, target: Any) -> Task | None:
        """What ``target`` (a pipeline or a bare transformer) generates, or None where neither
        its class nor its config says (`fpstune.apply` then takes the policy's word)."""
        ...


Grid = tuple[int, int, int]


def install(routing: Routing, transformer: Any, router: AttentionRouter, fuse_rope: bool) -> int:
    """Give every routed layer fpstune's processor; returns the number of layers. Idempotent:
    installing again replaces the router."""
    modules = routing.modules(transformer)
    for name, module in modules:
        if getattr(module, "fused_projections", False):
            raise ValueError(f"{name}: fused q/k/v projections are not supported")
    for layer, (_name, module) in enumerate(modules):
        module.set_processor(routing.processor(router, layer, fuse_rope=fuse_rope))
    return len(modules)


def uninstall(routing: Routing, transformer: Any, ours: type) -> None:
    """Put the model's own processor back wherever one of type ``ours`` sits."""
    for _name, module in routing.modules(transformer):
        if isinstance(module.processor, ours):
            module.set_processor(routing.original())


def unwrap(obj: Any) -> Any:
    """A pipeline's transformer, without torch.compile's wrapper."""
    transformer = getattr(obj, "transformer", obj)
    return getattr(transformer, "_orig_mod", transformer)


def config_of(target: Any) -> Mapping[str, Any]:
    """The transformer config of a pipeline or a (compiled) transformer; empty if it has none."""
    config = getattr(unwrap(target), "config", None)
    return config if isinstance(config, Mapping) else {}


def hidden_of(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The ``hidden_states`` argument of a transformer forward call."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def divided(sizes: tuple[int, ...], patch: tuple[int, ...], what: str) -> Grid:
    """``sizes`` / ``patch`` per axis, refused in one line where a patch does not divide."""
    if any(s % p for s, p in zip(sizes, patch, strict=True)):
        raise ValueError(f"{what} {tuple(sizes)} are not divisible by the patch size {patch}")
    t, h, w = (s // p for s, p in zip(sizes, patch, strict=True))
    return (t, h, w)


__all__ = [
    "Dims",
    "Grid",
    "Routing",
    "config_of",
    "divided",
    "hidden_of",
    "install",
    "uninstall",
    "unwrap",
]
