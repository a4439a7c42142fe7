"""Schedule ablation of the warp-specialised Gluon kernel (``impl: gluon_ws``), kernel alone,
against SDPA's cuDNN backend in the same process, at the Wan2.1 720p shapes, dense and 90 %
sparse: 128-key softmax steps with its two consumer warpgroups taking turns at the tensor cores
(ping-pong) or not; 256-key steps (``block_n=256``, v12) at 2 and 3 stages; and the pre-pass with
V in natural or in the Gluon kernels' key order, and with Wan's RoPE fused into it. The turns
are a launch argument of `gluon_attention.launch`, not a `KernelConfig` knob: they exist to
measure what they are worth (docs/kernel_notes.md, v11, v12). With and without turns the
outputs must be bit-identical (checked); 256-key steps print their largest difference from the
128-key output.

    python benchmarks/gluon_schedule.py --out schedule.json     # ~2 min on an H100
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_bench import (
    SHAPES,
    environment,
    random_qkv,
    sdpa,
    set_vs_cudnn,
    shape_args,
    spec_of,
    time_op,
)

TILE = (1, 8, 16)
CONFIG = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 4, "impl": "gluon_ws"}
# Launch arguments; the first is the 128-key kernel as in v11b. 256-key steps (v12) change the
# numbers (one max over two blocks); the turns only when each warpgroup issues.
VARIANTS: dict[str, dict[str, Any]] = {
    "128-key s4": {},
    "128-key s4 ping-pong": {"pingpong": True},
    "256-key s2": {"block_n": 256, "num_stages": 2},
    "256-key s3": {"block_n": 256, "num_stages": 3},
}
CASES = (("fp8_dense", 0.0, None), ("fp8_sparse", 0.9, "window"))


def launcher(
    prep: Any, launch_grid: Any, rest: Any, switches: dict[str, Any]
) -> Callable[[], None]:
    """`gluon_attention.launch` of one `VARIANTS` entry: CONFIG's launch with ``switches``."""
    from fpstune.kernels.gluon_attention import launch

    kw = {"block_n": CONFIG["block_n"], "num_stages": CONFIG["num_stages"], **switches}
    return partial(
        launch, prep, launch_grid, rest, block_m=CONFIG["block_m"], warp_specialize=True, **kw
    )


def run_shape(name: str, budget_s: float, only: list[str] | None = None) -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend

    from fpstune.kernels.tiling import TileLayout
    from fpstune.kernels.triton_attention import launch_args, prepare

    b, h, grid, d = SHAPES[name]
    n = math.prod(grid)
    q, k, v = random_qkv((b, h, n, d), seed=0)
    cudnn = sdpa(SDPBackend.CUDNN_ATTENTION)
    angle = torch.rand(1, n, 1, d // 2, device=q.device).repeat_interleave(2, -1) * 6.3
    rope = (angle.cos(), angle.sin())  # Wan's tables: (1, tokens, 1, head_dim) fp32
    rows: list[dict[str, Any]] = []

    def add(label: str, times: list[float]) -> None:
        ms = statistics.median(times)
        rows.append({"shape": name, "op": label, "median_ms": ms, "reps": len(times)})
        print(f"  {name:9s} {label:40s} {ms:9.3f} ms", flush=True)

    add("sdpa_cudnn", time_op(lambda: cudnn(q, k, v), budget_s=budget_s))
    layout = TileLayout(grid, TILE)
    for mode, sp, pat in CASES:
        spec = spec_of(mode, sp, pat, tile=TILE, kernel=CONFIG)
        what = f"{mode} {sp:.0%}" if pat else mode
        for impl in ("triton", "gluon_ws"):  # the pre-pass, natural or wgmma key order for V
            run_prep = partial(prepare, q, k, v, layout=layout, spec=spec, impl=impl)
            add(f"{what} prepare(impl={impl})", time_op(run_prep, budget_s=budget_s))
        run_prep = partial(prepare, q, k, v, layout=layout, spec=spec, impl="gluon_ws", rope=rope)
        add(f"{what} prepare(impl=gluon_ws, rope)", time_op(run_prep, budget_s=budget_s))
        prep = prepare(q, k, v, layout=layout, spec=spec, impl="gluon_ws")
        out = torch.full_like(q, float("nan"))
        launch_grid, rest = launch_args(prep, block_m=CONFIG["block_m"], scale=d**-0.5, out=out)
        first = None
        for label, switches in VARIANTS.items():
            if only and label not in only and label != next(iter(VARIANTS)):
                continue
            run = launcher(prep, launch_grid, rest, switches)
            add(f"{what} {label}", time_op(run, budget_s=budget_s))
            assert not out.isnan().any(), f"{what} {label}: rows left unwritten"
            if first is None:
                first = out.clone()
            elif switches.get("block_n") == 256:  # other numbers: how far from 128-key steps
                diff = (out.float() - first.float()).abs()
                rows[-1]["max_rel_diff"] = (diff.max() / first.float().abs().max()).item()
                print(f"    max |diff| / max |out| = {rows[-1]['max_rel_diff']:.2e}", flush=True)
            elif not torch.equal(out, first):  # turns change when each warpgroup issues only
                raise SystemExit(f"{what} {label}: output differs from {next(iter(VARIANTS))}'s")
            out.fill_(float("nan"))
        del prep, first
    add("sdpa_cudnn (again)", time_op(lambda: cudnn(q, k, v), budget_s=budget_s))
    set_vs_cudnn(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    shape_args(ap)
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=None,
                    help="these variants (and the first, the reference) only")  # fmt: skip
    args = ap.parse_args()
    rows = [r for s in args.shapes for r in run_shape(s, args.budget_s, args.only)]
    if args.out:
        args.out.write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))
    print(f"\n{'shape':9s} {'op':40s} {'ms':>9s} {'vs cuDNN':>8s}")
    for r in rows:
        print(f"{r['shape']:9s} {r['op']:40s} {r['median_ms']:9.3f} {r['vs_cudnn']:7.2f}x")


if __name__ == "__main__":
    main()
