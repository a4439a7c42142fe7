"""One measured end-to-end run of a policy's attention: every (step, layer, CFG pass) call in
order, timed as a whole. Export compares it with the latency composed from the table."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fpstune.kernels import attention
from fpstune.kernels.policy import Policy
from fpstune.latency.measure import Timing, summarize
from fpstune.latency.shape import AttentionShape


@dataclass(frozen=True)
class EndToEnd:
    timing: Timing
    calls: int


def measure_policy_run(
    policy: Policy, *, device: torch.device, batch: int = 1, runs: int = 3, seed: int = 0
) -> EndToEnd:
    """Median of ``runs`` timed sequences (after one untimed warm-up sequence). Inputs rotate
    between two sets so consecutive calls do not reuse each other's inputs from L2."""
    if device.type != "cuda":
        raise ValueError("an end-to-end latency run needs a GPU")
    m = policy.model
    g = torch.Generator(device=device).manual_seed(seed)
    call = AttentionShape.of_model(m, batch=batch)
    shape = (batch, m.heads, call.tokens, m.head_dim)
    sets = [
        tuple(torch.randn(shape, device=device, dtype=torch.bfloat16, generator=g) for _ in "qkv")
        for _ in range(2)
    ]
    plan = [
        policy.spec(layer=layer, step=step)
        for step in range(m.steps)
        for layer in range(m.layers)
        for _ in range(m.cfg)
    ]

    def run_once() -> None:
        for i, spec in enumerate(plan):
            q, k, v = sets[i % 2]
            attention(q, k, v, grid=m.grid, spec=spec, text=m.text)

    run_once()  # compiles every kernel the policy uses
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_once()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return EndToEnd(summarize(samples, warmup=1, method="cuda-events+sequence"), len(plan))
