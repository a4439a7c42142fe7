"""`apply(pipe, policy)`: one call that makes a diffusers Wan pipeline (or a bare transformer) run
an fpstune policy; `remove(pipe)` undoes it.

How the step and the grid reach the kernels without user bookkeeping: diffusers' pipelines wrap
every transformer call in ``transformer.cache_context(name, step_index=i, num_inference_steps=n)``
and hand that `CacheContext` to every *stateful* hook of the transformer's `HookRegistry` (the
mechanism its own caches use). fpstune registers one such hook; before each forward it reads the
step index and the CFG pass name from the context and the latent-patch grid from the hidden
states, checks them against the policy (a mismatch is refused at the first call, before any
denoising work) and sets the router the self-attention processors ask.

diffusers' attention-backend registry (``attention_dispatch``, ``set_attention_backend``) cannot
carry fpstune: its backends are a closed enum and a backend is called with q, k, v only, never
the layer, the step or the grid. Self-attention therefore keeps fpstune's processor
(`fpstune.models.processor`); cross-attention stays diffusers' own.

`torch.compile`: the hook and the routed attention run outside the compiled graph
(``torch.compiler.disable``), so the step counter and the per-call bookkeeping are never guarded
on and a compiled transformer does not recompile per step.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from fpstune.kernels.policy import Policy
from fpstune.models import adapters
from fpstune.models.applied import HOOK_NAME, Applied, installed, undo
from fpstune.models.processor import install, patch_grid
from fpstune.models.router import AttentionRouter


class PolicyMismatch(ValueError):
    """The pipeline is not what the policy was tuned for; ``str(e)`` names both values."""


def apply(
    target: Any,
    policy: Policy | str | os.PathLike[str],
    *,
    fuse_rope: bool = True,
    allow_other_gpu: bool = False,
) -> Any:
    """Route every self-attention of ``target`` (a diffusers Wan pipeline, or its
    ``WanTransformer3DModel``) through ``policy`` (a `Policy` or a policy file, loaded with the
    hardware check; ``allow_other_gpu`` runs a policy tuned on another GPU). Returns ``target``.
    Refused in one line (`PolicyMismatch`): a transformer whose heads, head_dim or layers differ
    from the policy's (here), a video grid or a step count that differs (at the first
    transformer call, before any denoising work)."""
    if not isinstance(policy, Policy):
        policy = Policy.load(policy, allow_other_gpu=allow_other_gpu)
    transformer = _transformer(target)
    _check_model(transformer, policy)
    remove(target)  # idempotent: a second apply replaces the first
    router = AttentionRouter(policy=policy)
    processors = {
        f"blocks.{i}.attn1": block.attn1.processor for i, block in enumerate(transformer.blocks)
    }
    install(transformer, router, fuse_rope=fuse_rope)
    applied = Applied(policy=policy, router=router, processors=processors)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(_PolicyHook(applied), HOOK_NAME)
    transformer._fpstune = applied
    return target


def remove(target: Any) -> Any:
    """Undo `apply`: the original self-attention processors, no fpstune hook. Returns ``target``;
    a target `apply` never touched is returned as it is."""
    undo(_transformer(target))
    return target


def applied(target: Any) -> Applied | None:
    """What `apply` installed on ``target``'s transformer, or None."""
    return installed(_transformer(target))


class _PolicyHook(ModelHook):
    """A stateful diffusers hook: it receives the pipeline's `CacheContext` and steers the
    router before each forward."""

    _is_stateful = True

    def __init__(self, applied: Applied) -> None:
        super().__init__()
        self.applied = applied
        # diffusers sets the CacheContext on it (typed as an instance, it takes the class)
        self.context = StateManager(BaseState)  # type: ignore[arg-type]

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.context.reset()
        return module

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        model = self.applied.policy.model
        try:
            ctx = self.context.context
        except ValueError:  # no cache_context around the call
            ctx = None
        if ctx is None or ctx.step_index is None:
            raise RuntimeError(
                "fpstune.apply: the transformer was called without a step index; call it inside "
                "`transformer.cache_context(name, step_index=i, num_inference_steps=n)` as "
                "diffusers' pipelines do"
            )
        if ctx.num_inference_steps is not None and ctx.num_inference_steps != model.steps:
            raise PolicyMismatch(
                f"steps: the pipeline runs {ctx.num_inference_steps} denoising steps, "
                f"the policy was tuned for {model.steps}"
            )
        grid = patch_grid(module, hidden)
        if grid != tuple(model.grid):
            raise PolicyMismatch(
                f"grid: the pipeline's latent-patch grid is {'x'.join(map(str, grid))}, the "
                f"policy was tuned for {'x'.join(map(str, model.grid))} (another resolution "
                "or frame count)"
            )
        router = self.applied.router
        router.grid, router.step, router.pass_name = grid, ctx.step_index, ctx.name
        return args, kwargs


def _transformer(target: Any) -> Any:
    transformer = adapters.unwrap(target)  # a pipeline's, without torch.compile's wrapper
    if getattr(target, "transformer_2", None) is not None:
        raise PolicyMismatch(
            "transformer_2: two-expert pipelines (Wan 2.2 A14B) need a policy per expert; "
            "apply one to each transformer"
        )
    if adapters.for_transformer(transformer) is None:
        raise PolicyMismatch(
            f"{type(transformer).__name__}: no fpstune adapter serves this model class "
            f"(registered adapters: {', '.join(adapters.names())})"
        )
    return transformer


def _check_model(transformer: Any, policy: Policy) -> None:
    config, model = transformer.config, policy.model
    for name, have, want in (
        ("heads", config.num_attention_heads, model.heads),
        ("head_dim", config.attention_head_dim, model.head_dim),
        ("layers", config.num_layers, model.layers),
    ):
        if int(have) != want:
            raise PolicyMismatch(
                f"model.{name}: the transformer has {have}, the policy "
                f"({model.name}) was tuned for {want}"
            )


__all__ = ["Applied", "PolicyMismatch", "applied", "apply", "remove"]
