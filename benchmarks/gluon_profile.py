"""Launch the warp-specialised Gluon kernel once per schedule variant at the 720p shape, for
Nsight Compute to read its counters (pipe utilisation, issue stalls, clocks):

    ncu --clock-control none -k regex:_gl_attn_kernel --launch-skip 2 --section WarpStateStats \\
        python benchmarks/gluon_profile.py --variants "128-key s4" "256-key s2"

Each variant is launched twice: the first launch compiles, the second is the one to profile
(``--launch-skip`` = the number of variants). Variants are `gluon_schedule.VARIANTS`' labels.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gluon_schedule import CONFIG, TILE, VARIANTS, launcher
from kernel_bench import SHAPES, random_qkv, spec_of


def main() -> None:
    from fpstune.kernels.tiling import TileLayout
    from fpstune.kernels.triton_attention import launch_args, prepare

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default = ["128-key s4", "256-key s2"]
    ap.add_argument("--variants", nargs="+", default=default, choices=list(VARIANTS))
    ap.add_argument("--shape", default="720p", choices=list(SHAPES))
    ap.add_argument("--sparsity", type=float, default=0.0, help="0: fp8_dense; else window")
    args = ap.parse_args()
    b, h, grid, d = SHAPES[args.shape]
    q, k, v = random_qkv((b, h, math.prod(grid), d), seed=0)
    mode = ("fp8_sparse", args.sparsity, "window") if args.sparsity else ("fp8_dense", 0.0, None)
    spec = spec_of(*mode, tile=TILE, kernel=CONFIG)
    prep = prepare(q, k, v, layout=TileLayout(grid, TILE), spec=spec, impl="gluon_ws")
    out = torch.empty_like(q)
    launch_grid, rest = launch_args(prep, block_m=CONFIG["block_m"], scale=d**-0.5, out=out)
    runs = [launcher(prep, launch_grid, rest, VARIANTS[name]) for name in args.variants]
    for _ in range(2):
        for run in runs:
            run()
    torch.cuda.synchronize()
    print("launched", args.variants, "twice each")


if __name__ == "__main__":
    main()
