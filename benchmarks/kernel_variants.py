"""Issue 7's kernel variants at the two Wan2.1 720p attention shapes, against SDPA's cuDNN backend
in the same process: the whole op (pre-pass, index building, kernel) and the kernel alone, for the
fp8 default config and its variants (launch parameters and `KernelConfig`'s softmax knob ``exp2``);
then FlashAttention's accuracy rule at full size for each knob set. Prints one table last; writes
JSON.

    python benchmarks/kernel_variants.py --out variants.json     # ~3 min on an H100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from kernel_bench import (
    SHAPES,
    accuracy_at_scale,
    environment,
    random_qkv,
    sdpa,
    set_vs_cudnn,
    spec_of,
    summarise,
    time_op,
)

TILE = (1, 8, 16)  # the 720p default tile
#: label -> KernelConfig fields
BASE = {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 5}  # the fp8 default
GLUON = {**BASE, "num_stages": 3, "impl": "gluon"}  # gluon_attention's kernel, 2 CTAs per SM
# its warp-specialised form: 128 rows on two consumer warpgroups + a producer warp, 1 CTA per SM
GLUON_WS = {"block_m": 128, "block_n": 128, "num_warps": 8, "impl": "gluon_ws"}
CONFIGS: dict[str, dict[str, Any]] = {
    "64x128 w4 s5": BASE,
    "gluon 64x128 s3": GLUON,
    "gluon_ws 128x128 s4": {**GLUON_WS, "num_stages": 4},
    "gluon_ws 128x256 s2": {**GLUON_WS, "block_n": 256, "num_stages": 2},  # 256-key steps
    "gluon_ws 128x256 s3": {**GLUON_WS, "block_n": 256, "num_stages": 3},
}
#: kernel knob sets of the accuracy section (set on the default config)
KNOBS: tuple[dict[str, Any], ...] = (
    {},
    {"impl": "gluon", "num_stages": 3},
    {**GLUON_WS, "num_stages": 4},
    {**GLUON_WS, "block_n": 256, "num_stages": 2},
)
CASES = (("fp8_dense", 0.0, None), ("fp8_sparse", 0.9, "window"), ("fp8_sparse", 0.5, "window"))


def run_shape(name: str, budget_s: float) -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend

    from fpstune.kernels import KernelConfig, attention
    from fpstune.kernels.tiling import TileLayout
    from fpstune.kernels.triton_attention import attend, prepare

    b, h, grid, d = SHAPES[name]
    n = math.prod(grid)
    flops = 4.0 * b * h * n * n * d
    q, k, v = random_qkv((b, h, n, d), seed=0)
    cudnn = sdpa(SDPBackend.CUDNN_ATTENTION)
    rows: list[dict[str, Any]] = []

    def add(label: str, times: list[float], **extra: Any) -> None:
        t = summarise(label, name, times, flops, **extra)
        rows.append({"shape": name, "op": label, "median_ms": t.median_ms, "tflops": t.tflops,
                     "p25_ms": t.p25_ms, "p75_ms": t.p75_ms, **extra})  # fmt: skip
        print(f"  {name:9s} {label:44s} {t.median_ms:9.3f} ms {t.tflops:7.1f} TFLOP/s", flush=True)

    add("sdpa_cudnn", time_op(lambda: cudnn(q, k, v), budget_s=budget_s))
    layout = TileLayout(grid, TILE)
    for mode, sp, pat in CASES:
        for label, fields in CONFIGS.items():
            kc = KernelConfig.model_validate(fields)
            spec = spec_of(mode, sp, pat, tile=TILE, kernel=kc.model_dump())
            what = f"{mode} {sp:.0%} {label}" if pat else f"{mode} {label}"
            op = partial(attention, q, k, v, grid=grid, spec=spec)
            add(what, time_op(op, budget_s=budget_s), kernel=kc.model_dump())
            prep = prepare(q, k, v, layout=layout, spec=spec, impl=kc.impl)
            only = partial(attend, prep, **kc.model_dump(), scale=d**-0.5, out_dtype=q.dtype)
            add(what + " [kernel]", time_op(only, budget_s=budget_s), kernel=kc.model_dump())
            del prep
    add("sdpa_cudnn (again)", time_op(lambda: cudnn(q, k, v), budget_s=budget_s))
    set_vs_cudnn(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", nargs="+", default=["720p", "720p-14b"], choices=list(SHAPES))
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per row")
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args()
    rows = [r for s in args.shapes for r in run_shape(s, args.budget)]
    acc = [] if args.no_accuracy else accuracy_at_scale(knobs=KNOBS)
    Path(args.out).write_text(
        json.dumps({"environment": environment(), "rows": rows, "accuracy": acc}, indent=1)
    )
    print(f"\n{'shape':9s} {'op':53s} {'ms':>9s} {'TFLOP/s':>8s} {'vs cuDNN':>8s}")
    for r in rows:
        print(
            f"{r['shape']:9s} {r['op']:53s} {r['median_ms']:9.3f} {r['tflops']:8.1f} "
            f"{r['vs_cudnn']:7.2f}x"
        )
    for a in acc:
        print(
            f"accuracy {a['kind']:10s} {a['mode']:10s} {a['sparsity']:.1f} {a['config']:22s} "
            f"max/ref {a['ratio_max']:.2f} mean/ref {a['ratio_mean']:.2f}"
        )


if __name__ == "__main__":
    main()
