"""What the text costs in a joint text + video call: fpstune's op on HunyuanVideo's 720p call
(1 x 24 heads x 128, 33 x 45 x 80 video tokens) with and without its 256 text tokens, and the same
on 33 x 48 x 80, a grid the 1x8x16 tile divides (no padded rows), so that the padding's share of
the gap and the text's own share can be told apart.

Rows: fp8_dense and fp8_sparse (window, 90 %), gluon_ws 128x256 (`fpstune.latency.bench.KERNELS`),
tile 1x8x16, bf16 ``randn`` inputs; `fpstune.latency.bench.time_calls` (CUDA events, calls back to
back, median). The ratio joint / video is the text's cost; the text is 0.2 % of the tokens.

    python3 -m benchmarks.text_cost          # ~1 min on an H100

Writes benchmarks/results/<date>-<gpu>-text_cost.json (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from fpstune.kernels import AttentionSpec, attention
from fpstune.latency.bench import KERNELS, environment, result_args, time_calls, write_result

GRIDS = ((33, 45, 80), (33, 48, 80))
TEXT = 256


def spec_of(mode: str) -> AttentionSpec:
    d: dict[str, Any] = {"mode": mode, "tile": [1, 8, 16], "kernel": KERNELS["gluon_ws"]}
    if mode == "fp8_sparse":
        d |= {"sparsity": 0.9, "pattern": {"kind": "window"}}
    return AttentionSpec.from_dict(d)


def time_one(grid: tuple[int, int, int], spec: AttentionSpec, text: int, budget_s: float) -> float:
    n = math.prod(grid) + text
    q, k, v = (torch.randn(1, 24, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    timing, _ = time_calls(
        lambda: attention(q, k, v, grid=grid, spec=spec, text=text), budget_s=budget_s
    )
    return timing.median_ms


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.text_cost",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    result_args(ap)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per row")
    args = ap.parse_args()
    rows = []
    for grid in GRIDS:
        for mode in ("fp8_dense", "fp8_sparse"):
            video, joint = (time_one(grid, spec_of(mode), t, args.budget) for t in (0, TEXT))
            rows.append({"grid": list(grid), "mode": mode, "video_ms": video, "joint_ms": joint})
            print(f"{grid} {mode}: {video:.3f} ms video, {joint:.3f} ms + {TEXT} text", flush=True)
    path = write_result("text_cost", {"text": TEXT, "rows": rows}, out=args.out,
                        folder=args.results, env=environment(torch.device("cuda")))  # fmt: skip
    print(f"\nwritten: {path}\n\ngrid       mode          video ms  joint ms  joint/video")
    for r in rows:
        g = "x".join(map(str, r["grid"]))
        ratio = r["joint_ms"] / r["video_ms"]
        print(f"{g:10s} {r['mode']:12s} {r['video_ms']:9.3f} {r['joint_ms']:9.3f}  {ratio:.4f}")


if __name__ == "__main__":
    main()
