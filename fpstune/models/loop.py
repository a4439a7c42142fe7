"""The denoising loop: flow matching with classifier-free guidance, fixed seeds, any policy.

One `Sampling` (scheduler, steps, guidance) and one batch of conditions (`Conditions`: initial
latents and prompt embeddings, fixed by seeds) define a generation; `denoise` runs it with the
router's policy on every self-attention call. The uncond and cond passes are batched into one
transformer call, as diffusers' Wan pipeline does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fpstune.models.processor import patch_grid
from fpstune.models.router import AttentionRouter


@dataclass(frozen=True)
class Conditions:
    """latents: (n, C, F, H, W) initial noise; prompt / negative: (n, L, D) text embeddings
    (negative None: no classifier-free guidance)."""

    latents: torch.Tensor
    prompt: torch.Tensor
    negative: torch.Tensor | None

    def __post_init__(self) -> None:
        n = self.latents.shape[0]
        for name in ("prompt", "negative"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != n:
                raise ValueError(f"{name} has batch {t.shape[0]}, latents have {n}")

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Conditions:
        return Conditions(
            self.latents.to(device, torch.float32),
            self.prompt.to(device, dtype),
            None if self.negative is None else self.negative.to(device, dtype),
        )


@dataclass(frozen=True)
class Sampling:
    """scheduler: a diffusers scheduler used as a template (a fresh copy runs each generation,
    since schedulers keep a step index); guidance: the CFG scale."""

    scheduler: Any
    steps: int
    guidance: float = 5.0

    def fresh_scheduler(self) -> Any:
        s = type(self.scheduler).from_config(self.scheduler.config)
        s.set_timesteps(self.steps)
        if len(s.timesteps) != self.steps:
            raise ValueError(f"scheduler gave {len(s.timesteps)} timesteps for {self.steps} steps")
        return s


@torch.no_grad()
def denoise(
    transformer: Any,
    router: AttentionRouter,
    conditions: Conditions,
    sampling: Sampling,
    *,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Generate from ``conditions``; returns the final latents (float32). The router must be
    installed on ``transformer`` (`processor.install`)."""
    device = next(transformer.parameters()).device
    # On a GPU the model runs under bf16 autocast, as Wan runs in production; on a CPU in fp32.
    dtype = torch.bfloat16 if device.type == "cuda" else next(transformer.parameters()).dtype
    cond = conditions.to(device, dtype)
    latents = cond.latents
    router.grid = patch_grid(transformer, latents)
    guided = cond.negative is not None and sampling.guidance != 1.0
    text = torch.cat([cond.negative, cond.prompt]) if guided else cond.prompt  # type: ignore[list-item]
    scheduler = sampling.fresh_scheduler()
    for i, t in enumerate(scheduler.timesteps):
        router.step = i
        x = torch.cat([latents, latents]) if guided else latents
        timestep = t.expand(x.shape[0]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = transformer(x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[
                0
            ].float()
        if guided:
            uncond, cond_pred = pred.chunk(2)
            pred = uncond + sampling.guidance * (cond_pred - uncond)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    return latents


__all__ = ["Conditions", "Sampling", "denoise"]
