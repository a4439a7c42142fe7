"""`apply(pipe, policy)`: one call that makes a diffusers video pipeline (or a bare transformer) run
an fpstune policy; `remove(pipe)` undoes it. Which modules are routed, how the grid is read and
what the model's heads are comes from the adapter that serves the transformer
(`fpstune.models.adapters.for_transformer`, its ``routing``: `fpstune.models.routing.Routing`).

How the step and the grid reach the kernels without user bookkeeping: diffusers' pipelines wrap
every transformer call in ``transformer.cache_context(name, step_index=i, num_inference_steps=n)``
and hand that `CacheContext` to every *stateful* hook of the transformer's `HookRegistry` (the
mechanism its own caches use). fpstune registers one such hook; before each forward it reads the
step index and the CFG pass name from the context and the latent-patch grid from the hidden
states, checks them against the policy (a mismatch is refused at the first call, before any
denoising work) and sets the router the self-attention processors ask. Pipelines that open
``cache_context`` without a step index (diffusers' HunyuanVideo, CogVideoX, LTX-Video and Wan
I2V pipelines) give the step through the pipeline `apply` was handed: the index of its current
timestep (``pipe._current_timestep``, else the call's own) in ``pipe.scheduler.timesteps``.

diffusers' attention-backend registry (``attention_dispatch``, ``set_attention_backend``) cannot
carry fpstune: its backends are a closed enum and a backend is called with q, k, v only, never
the layer, the step or the grid. Self-attention therefore keeps fpstune's processor
(`fpstune.models.processor`); cross-attention stays diffusers' own.

`torch.compile`: the hook and the routed attention run outside the compiled graph
(``torch.compiler.disable``), so the step counter and the per-call bookkeeping are never guarded
on and a compiled transformer does not recompile per step.

The Wan family:

- **Wan 2.2 A14B** (``transformer`` + ``transformer_2``, ``boundary_ratio``): the pipeline runs
  the high-noise expert (``transformer``) on the steps whose timestep is at or above the
  boundary, the low-noise expert (``transformer_2``) on the others. One policy covers the whole
  generation: its per-step cells are indexed by the pipeline's step, whichever expert runs it,
  so the policy's steps say which expert runs them (with 40 steps and the boundary at step 12,
  steps 0-11 are the high-noise expert's layers, 12-39 the low-noise expert's). Both experts get
  fpstune's self-attention and the hook and share one router; both must have the policy's heads,
  head_dim and layers (else refused, naming the expert and both values); `remove` undoes both.
- **TI2V-5B** (``expand_timesteps``, Wan 2.2's 16 x VAE): the grid is read from the hidden states
  and the transformer's patch size, whatever the VAE; a per-token timestep changes nothing here.
- **I2V** (`WanImageToVideoPipeline`): the conditioning reaches self-attention as extra input
  channels (the patch embedding absorbs them) and, in 2.1, as CLIP image tokens in
  cross-attention only; self-attention keeps its video tokens, so the same processor serves it.
  The policy's ``model.task`` (``t2v``, the default, or ``i2v``) must be the pipeline's (the
  routing's ``task``; Wan's is `fpstune.models.wan.task_of`: by the pipeline's class, a bare
  transformer where its config says image-to-video). diffusers' I2V pipeline opens
  ``cache_context`` without a step index: when `apply` was handed the pipeline, the hook then
  takes the step as the index of the call's timestep in the pipeline's ``scheduler.timesteps``
  (Wan's schedulers never repeat one) and the step count as their number.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from fpstune.kernels.policy import Policy
from fpstune.models import adapters
from fpstune.models.applied import HOOK_NAME, Applied, installed, undo
from fpstune.models.router import AttentionRouter, PolicyMismatch
from fpstune.models.routing import Routing, install

#: the pipeline attributes that hold a transformer (Wan 2.2 A14B: the two experts)
EXPERTS = ("transformer", "transformer_2")


def apply(
    target: Any,
    policy: Policy | str | os.PathLike[str],
    *,
    fuse_rope: bool = True,
    allow_other_gpu: bool = False,
) -> Any:
    """Route every self-attention of ``target`` (a diffusers pipeline of a family an adapter
    serves, both experts of a two-expert Wan one, or a bare transformer) through ``policy``
    (a `Policy` or a policy file, loaded with the hardware check; ``allow_other_gpu`` runs a
    policy tuned on another GPU). Returns ``target``. Refused in one line (`PolicyMismatch`):
    a transformer whose heads, head_dim or layers differ from the policy's, a pipeline of
    another task (here), a video grid, a step count or a text length that differs (at the
    first transformer call, before any denoising work)."""
    if not isinstance(policy, Policy):
        policy = Policy.load(policy, allow_other_gpu=allow_other_gpu)
    experts = _experts(target)
    routings = {name: _routing(transformer) for name, transformer in experts.items()}
    for name, transformer in experts.items():
        which = name if len(experts) > 1 else "the transformer"
        _check_model(routings[name], transformer, policy, which)
    _check_task(next(iter(routings.values())), target, policy)
    remove(target)  # idempotent: a second apply replaces the first
    router = AttentionRouter(policy=policy)
    pipeline = None if _is_transformer(target) else _weak(target)
    for name, transformer in experts.items():
        routing = routings[name]
        processors = {name: module.processor for name, module in routing.modules(transformer)}
        install(routing, transformer, router, fuse_rope)
        applied = Applied(policy=policy, router=router, processors=processors)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(_PolicyHook(applied, routing, pipeline), HOOK_NAME)
        transformer._fpstune = applied
    return target


def remove(target: Any) -> Any:
    """Undo `apply` (on every expert): the original self-attention processors, no fpstune hook.
    Returns ``target``; a target `apply` never touched is returned as it is."""
    for transformer in _experts(target, check=False).values():
        undo(transformer)
    return target


def applied(target: Any) -> Applied | None:
    """What `apply` installed on ``target``'s (first) transformer, or None."""
    experts = _experts(target, check=False)
    return next((a for t in experts.values() if (a := installed(t)) is not None), None)


class _PolicyHook(ModelHook):
    """A stateful diffusers hook: it receives the pipeline's `CacheContext` and steers the
    router before each forward. ``routing`` reads the call's grid; ``pipeline``: the pipeline
    `apply` was handed (weakly), whose scheduler gives the step when the context has no step
    index."""

    _is_stateful = True

    def __init__(
        self, applied: Applied, routing: Routing, pipeline: weakref.ref[Any] | None = None
    ) -> None:
        super().__init__()
        self.applied = applied
        self.routing = routing
        self.pipeline = pipeline
        # diffusers sets the CacheContext on it (typed as an instance, it takes the class)
        self.context = StateManager(BaseState)  # type: ignore[arg-type]

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.context.reset()
        return module

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        model = self.applied.policy.model
        try:
            ctx = self.context.context
        except ValueError:  # no cache_context around the call
            ctx = None
        step, steps = (None, None) if ctx is None else (ctx.step_index, ctx.num_inference_steps)
        if ctx is not None and step is None:
            step, steps = self._scheduler_step(kwargs.get("timestep"))
            if step is None and self.pipeline is not None:
                raise RuntimeError(
                    "fpstune.apply: the pipeline's cache_context gives no step index and the "
                    "call's timestep is not exactly one of pipe.scheduler.timesteps; pass "
                    "step_index=i to cache_context in the denoising loop"
                )
        if ctx is None or step is None:
            raise RuntimeError(
                "fpstune.apply: the transformer was called without a step index; call it inside "
                "`transformer.cache_context(name, step_index=i, num_inference_steps=n)` as "
                "diffusers' pipelines do"
            )
        if steps is not None and steps != model.steps:
            raise PolicyMismatch(
                f"steps: the pipeline runs {steps} denoising steps, "
                f"the policy was tuned for {model.steps}"
            )
        grid = self.routing.grid(module, args, kwargs)
        if grid != tuple(model.grid):
            raise PolicyMismatch(
                f"grid: the pipeline's latent-patch grid is {'x'.join(map(str, grid))}, the "
                f"policy was tuned for {'x'.join(map(str, model.grid))} (another resolution "
                "or frame count)"
            )
        router = self.applied.router
        router.grid, router.step, router.pass_name = grid, step, ctx.name
        return args, kwargs

    def _scheduler_step(self, timestep: Any) -> tuple[int | None, int | None]:
        """(index of the pipeline's current timestep in its ``scheduler.timesteps``, their
        number), or (None, None) without a pipeline or a single match. The current timestep is
        the pipeline's ``_current_timestep`` (the scheduler's own value; HunyuanVideo casts
        the one it passes to bf16), else the call's ``timestep``; a per-token one (TI2V's
        ``expand_timesteps``: 0 on conditioning frames) is the step's at its largest."""
        pipe = None if self.pipeline is None else self.pipeline()
        current = getattr(pipe, "_current_timestep", None)
        timestep = current if isinstance(current, torch.Tensor) else timestep
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or not isinstance(timestep, torch.Tensor):
            return None, None
        t = timestep.detach().max().double().cpu()
        hits = torch.nonzero(torch.isclose(timesteps.double().cpu(), t, rtol=0.0, atol=1e-3))
        if len(hits) != 1:
            return None, None
        return int(hits[0, 0]), len(timesteps)


def _weak(target: Any) -> weakref.ref[Any] | None:
    try:
        return weakref.ref(target)
    except TypeError:  # not a pipeline object (a stand-in); steps come from the context only
        return None


def _is_transformer(target: Any) -> bool:
    return all(getattr(target, name, None) is None for name in EXPERTS)


def _experts(target: Any, *, check: bool = True) -> dict[str, Any]:
    """The transformers of ``target`` by attribute name (``transformer``, ``transformer_2``), each
    without a pipeline's or torch.compile's wrapper; a bare transformer is ``transformer``.
    ``check``: refuse one no adapter serves."""
    if _is_transformer(target):
        found = {"transformer": adapters.unwrap(target)}
    else:
        found = {
            name: getattr(module, "_orig_mod", module)
            for name in EXPERTS
            if (module := getattr(target, name, None)) is not None
        }
    if check:
        for transformer in found.values():
            if adapters.for_transformer(transformer) is None:
                raise PolicyMismatch(
                    f"{type(transformer).__name__}: no fpstune adapter serves this model class "
                    f"(registered adapters: {', '.join(adapters.names())})"
                )
    return found


def _routing(transformer: Any) -> Routing:
    adapter = adapters.for_transformer(transformer)
    routing = getattr(adapter, "routing", None)
    if not isinstance(routing, Routing):
        raise PolicyMismatch(
            f"{type(transformer).__name__}: adapter {getattr(adapter, 'name', '?')} has no "
            "routing, so fpstune.apply cannot install it"
        )
    return routing


def _check_model(routing: Routing, transformer: Any, policy: Policy, which: str) -> None:
    dims, model = routing.dims(transformer), policy.model
    for name, have, want in (
        ("heads", dims.heads, model.heads),
        ("head_dim", dims.head_dim, model.head_dim),
        ("layers", dims.layers, model.layers),
    ):
        if int(have) != want:
            raise PolicyMismatch(
                f"model.{name}: {which} has {have}, the policy ({model.name}) was tuned for {want}"
            )


def _check_task(routing: Routing, target: Any, policy: Policy) -> None:
    task, model = routing.task(target), policy.model
    if task is not None and task != model.task:
        what = type(target).__name__
        raise PolicyMismatch(
            f"model.task: {what} generates {_TASKS[task]} ({task}), the policy ({model.name}) "
            f"was tuned for {_TASKS[model.task]} ({model.task})"
        )


_TASKS = {"t2v": "text to video", "i2v": "image to video"}


__all__ = ["Applied", "PolicyMismatch", "applied", "apply", "remove"]
