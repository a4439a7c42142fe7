"""Host time per attention call, and ten back-to-back measurements of one config (GPU).

Run on the H100 for docs/service.md's noise section (2026-11-23): a 720p and a mini-shape
fp8_sparse window 90 % call; prints the host (CPU) time of one call with the GPU idle before it,
and the medians of ten `measure()` calls after 15 s of GPU warm-up.

    python benchmarks/host_time_probe.py
"""

from __future__ import annotations

import statistics
import time

import torch

from fpstune.kernels import AttentionSpec, attention
from fpstune.latency.measure import measure, warm_gpu

SHAPES = (("720p", (21, 45, 80), 12, 128), ("mini", (5, 12, 16), 4, 64))


def main() -> None:
    dev = torch.device("cuda")
    warm_gpu(dev, seconds=15)
    spec = AttentionSpec.from_dict(
        {"mode": "fp8_sparse", "sparsity": 0.9, "pattern": {"kind": "window"}}
    )
    for name, grid, heads, dim in SHAPES:
        n = grid[0] * grid[1] * grid[2]
        sets = [
            tuple(torch.randn(1, heads, n, dim, device=dev, dtype=torch.bfloat16) for _ in "qkv")
            for _ in range(2)
        ]
        for _ in range(5):
            attention(*sets[0], grid=grid, spec=spec)
        host = []
        for i in range(30):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            attention(*sets[i % 2], grid=grid, spec=spec)
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: tuple = grid) -> object:
            return attention(q, k, v, grid=g, spec=spec)

        meds = [
            round(measure(call, warmup=5, reps=50, rotate=sets, device=dev).median_ms, 3)
            for _ in range(10)
        ]
        print(
            f"{name} host ms/call median {statistics.median(host):.3f} max {max(host):.3f}"
            f" | 10 measures {meds}"
        )


if __name__ == "__main__":
    main()
