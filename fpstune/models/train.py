"""Training of the embedded mini model: flow matching on procedural videos (``videos.py``).

Rectified-flow convention of diffusers' FlowMatchEulerDiscreteScheduler: x_s = (1 - s)·x₀ + s·ε,
the model predicts the velocity ε - x₀ at timestep 1000·s; s is drawn uniformly and shifted by
the sampler's flow shift, so training sees the noise levels sampling visits. The prompt is
dropped (zeros) 10 % of the time, which is what classifier-free guidance needs. The weights saved
are an exponential moving average, in float16 (under 10 MB), with the training facts (steps,
loss curve, time, the GPU's fingerprint) in the safetensors metadata.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fpstune.models.mini import (
    FLOW_SHIFT,
    FRAMES,
    HEIGHT,
    MINI_CONFIG,
    WIDTH,
    build_mini,
    prompt_table,
)
from fpstune.models.videos import random_prompts, render

DROP_PROMPT = 0.1


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    path: str = ""


def shifted_sigmas(u: torch.Tensor, shift: float = FLOW_SHIFT) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def train_mini(
    *,
    out: str | Path,
    steps: int = 6000,
    batch: int = 64,
    lr: float = 3e-4,
    seed: int = 0,
    device: torch.device | str = "cuda",
    max_seconds: float | None = None,
    ema_decay: float = 0.999,
    log_every: int = 50,
    on_log: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train from scratch and write the EMA weights to ``out`` (safetensors)."""
    from safetensors.torch import save_file

    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_mini(random_init=True, device=device).train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = min(200, steps // 10)

    def lr_at(i: int) -> float:
        if i < warmup:
            return lr * (i + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    table = prompt_table()
    gen = torch.Generator().manual_seed(seed + 1)
    autocast = device.type == "cuda"
    curve: list[tuple[int, float]] = []
    running = torch.zeros((), device=device)
    count, t0, done = 0, time.perf_counter(), 0
    for i in range(steps):
        prompts = random_prompts(batch, generator=gen)
        x0 = render(
            prompts, frames=FRAMES, height=HEIGHT, width=WIDTH, generator=gen, device=device
        )
        text = table.embed(prompts, device=device)
        keep = (torch.rand(batch, generator=gen) >= DROP_PROMPT).to(device)
        text = text * keep.view(-1, 1, 1)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sigma = shifted_sigmas(torch.rand(batch, generator=gen)).to(device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            pred = model(xt, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[
                0
            ]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 1 - ema_decay) if v.is_floating_point() else ema[k].copy_(v)
        running += loss.detach()
        count += 1
        done = i + 1
        if done % log_every == 0 or done == steps:
            mean = float(running) / count  # one host sync per log interval
            curve.append((done, mean))
            if on_log is not None:
                on_log(done, mean)
            running.zero_()
            count = 0
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    seconds = time.perf_counter() - t0
    final = curve[-1][1] if curve else float("nan")
    meta = _metadata(done, batch, lr, seed, seconds, final, curve, device)
    state = {k: v.to(torch.float16).contiguous() for k, v in ema.items()}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"fpstune": json.dumps(meta)})
    tmp.replace(path)
    return TrainResult(done, seconds, final, curve, str(path))


def _metadata(
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    seconds: float,
    final: float,
    curve: list[tuple[int, float]],
    device: torch.device,
) -> dict[str, Any]:
    from fpstune.kernels.fingerprint import current_fingerprint

    return {
        "model": "mini",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in MINI_CONFIG.items()},
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "seconds": round(seconds, 1),
        "final_loss": final,
        "loss_curve": curve,
        "objective": "flow matching (velocity), sigma uniform shifted by 3, prompt dropout 0.1",
        "fingerprint": current_fingerprint(device).model_dump(mode="json"),
    }


__all__ = ["TrainResult", "shifted_sigmas", "train_mini"]
