"""How fpstune times a kernel, checked on the GPU: measurement noise and composed-vs-end-to-end.

1. Noise: the same config measured 10 times with each timing method, methods interleaved so
   clock drift hits them alike; per measurement IQR / median, and the spread of the 10 medians.
   SDPA cuDNN (bf16 dense) is measured in the same rounds as a drift reference.
2. Composition: a three-phase policy (bf16 dense, fp8 dense, fp8 sparse window 90 %) at the
   mini shape and at Wan2.1-1.3B 720p; the latency composed from per-call measurements (old
   method: one call per sample; new: back-to-back calls per sample for short calls) against one
   measured end-to-end run of all its attention calls in order.

    python benchmarks/latency_method.py --out latency_method.json   # on the GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import UTC, datetime
from typing import Any

import torch

from fpstune.kernels import AttentionSpec, Mode, attention
from fpstune.kernels.fingerprint import current_fingerprint
from fpstune.kernels.policy import ModelShape, Policy, PolicyEntry
from fpstune.latency.compose import MeasuredLatency, compose_with
from fpstune.latency.e2e import measure_policy_run
from fpstune.latency.measure import measure

METHODS: dict[str, dict[str, Any]] = {
    "per-call+flush (old)": {"flush_l2": True, "min_sample_ms": 0.0},
    "auto-batched+flush (new)": {"flush_l2": True, "min_sample_ms": 1.0},
    "x>=20ms+flush": {"flush_l2": True, "min_sample_ms": 20.0},
    "back-to-back, no flush": {"flush_l2": False, "min_sample_ms": 0.0},
}
SHAPES = {
    "mini 1x4x960x64": ModelShape(
        name="mini", heads=4, head_dim=64, layers=4, grid=(5, 12, 16), steps=10, cfg=2
    ),
    "1.3b-720p 1x12x75600x128": ModelShape(
        name="wan2.1-t2v-1.3b-720p",
        heads=12,
        head_dim=128,
        layers=30,
        grid=(21, 45, 80),
        steps=10,  # 600 calls (CFG 2) per run; the composition does not depend on the count
        cfg=2,
    ),
}
SPARSE = AttentionSpec.from_dict(
    {"mode": "fp8_sparse", "sparsity": 0.9, "pattern": {"kind": "window"}}
)
DENSE8 = AttentionSpec(mode=Mode.FP8_DENSE)
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)


def noise(shape: ModelShape, dev: torch.device, repeats: int, reps: int) -> list[dict[str, Any]]:
    n_tok = shape.grid[0] * shape.grid[1] * shape.grid[2]
    dims = (1, shape.heads, n_tok, shape.head_dim)
    set_bytes = 3 * 2 * n_tok * shape.heads * shape.head_dim
    n_sets = max(2, min(16, (100 << 20) // set_bytes))
    g = torch.Generator(device=dev).manual_seed(0)
    sets = [
        tuple(torch.randn(dims, generator=g, device=dev, dtype=torch.bfloat16) for _ in "qkv")
        for _ in range(n_sets)
    ]
    rows = []
    for spec_name, spec in (("fp8_sparse window 0.9", SPARSE), ("sdpa cudnn bf16", BF16)):

        def fn(q: Any, k: Any, v: Any, s: AttentionSpec = spec) -> Any:
            return attention(q, k, v, grid=shape.grid, spec=s)

        # SDPA (60 ms a call at 720p) only as a drift reference: two methods, fewer reps.
        methods = METHODS if spec is SPARSE else {m: METHODS[m] for m in list(METHODS)[::3]}
        n = reps if spec is SPARSE else 20
        results: dict[str, list[tuple[float, float, int]]] = {m: [] for m in methods}
        for _ in range(repeats):
            for m, kw in methods.items():
                t = measure(fn, warmup=5, reps=n, rotate=sets, device=dev, **kw)
                results[m].append((t.median_ms, t.relative_iqr, t.calls_per_sample))
        for m, got in results.items():
            med = [x[0] for x in got]
            rel = [x[1] for x in got]
            rows.append(
                {
                    "shape": shape.name,
                    "spec": spec_name,
                    "method": m,
                    "calls_per_sample": got[0][2],
                    "medians_ms": med,
                    "rel_iqr_median": statistics.median(rel),
                    "rel_iqr_max": max(rel),
                    "median_spread": (max(med) - min(med)) / statistics.median(med),
                }
            )
    return rows


def three_phase(shape: ModelShape, hardware: Any) -> Policy:
    s = shape.steps
    a, b = max(1, s // 5), max(2, s // 2)
    entries = (
        PolicyEntry(steps=(0, a), layers=(0, shape.layers), spec=BF16),
        PolicyEntry(steps=(a, b), layers=(0, shape.layers), spec=DENSE8),
    )
    return Policy(model=shape, hardware=hardware, default=SPARSE, entries=entries)


def composition(shape: ModelShape, dev: torch.device, runs: int) -> list[dict[str, Any]]:
    policy = three_phase(shape, current_fingerprint(dev))
    e2e = measure_policy_run(policy, device=dev, runs=runs)
    rows = []
    for m in ("per-call+flush (old)", "auto-batched+flush (new)"):
        source = MeasuredLatency(dev, warmup=10, reps=30, min_sample_ms=METHODS[m]["min_sample_ms"])
        composed = compose_with(policy, source, batch=1)
        rows.append(
            {
                "shape": shape.name,
                "method": m,
                "calls": e2e.calls,
                "composed_ms": composed.total_ms,
                "end_to_end_ms": e2e.timing.median_ms,
                "difference": composed.total_ms / e2e.timing.median_ms - 1,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="latency_method.json")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--e2e-runs", type=int, default=2)
    ap.add_argument("--only", choices=("noise", "composition", "all"), default="all")
    args = ap.parse_args()
    dev = torch.device("cuda")
    out: dict[str, Any] = {
        "fingerprint": current_fingerprint(dev).model_dump(mode="json"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "noise": [],
        "composition": [],
    }
    for shape in SHAPES.values():
        if args.only in ("noise", "all"):
            out["noise"] += noise(shape, dev, args.repeats, args.reps)
        if args.only in ("composition", "all"):
            out["composition"] += composition(shape, dev, args.e2e_runs)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    head = ("shape", "spec", "method", "x", "IQR/med", "max", "spread")
    print("{:22} {:22} {:26} {:>3} {:>8} {:>7} {:>7}".format(*head))
    for r in out["noise"]:
        print(
            f"{r['shape']:22} {r['spec']:22} {r['method']:26} {r['calls_per_sample']:3d} "
            f"{r['rel_iqr_median']:8.2%} {r['rel_iqr_max']:7.2%} {r['median_spread']:7.2%}"
        )
    for r in out["composition"]:
        print(
            f"{r['shape']:22} {r['method']:26} calls {r['calls']:5d} composed "
            f"{r['composed_ms']:9.2f} ms, end to end {r['end_to_end_ms']:9.2f} ms: "
            f"{r['difference']:+.1%}"
        )


if __name__ == "__main__":
    main()
