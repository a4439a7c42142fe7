"""Which denoising steps of the mini model are sensitive to FP8 and to sparsity (CPU is fine).

For docs/quality.md: end-to-end PSNR against BF16 dense (seed 0, 10 steps, CFG 5, the packaged
weights) of hand-made policies that change the mode of a few steps, every layer.

    python3 -m benchmarks.mini_step_sensitivity
"""

from __future__ import annotations

import argparse
import time

import torch

from fpstune.kernels import AttentionSpec, Mode
from fpstune.kernels.fingerprint import current_fingerprint
from fpstune.kernels.policy import ModelShape, Policy, PolicyEntry
from fpstune.latency.bench import environment, result_args, write_result
from fpstune.quality.e2e import mini_probe

BF16 = AttentionSpec(mode=Mode.BF16_DENSE)
FP8 = AttentionSpec(mode=Mode.FP8_DENSE)


def sparse(s: float) -> AttentionSpec:
    return AttentionSpec.from_dict(
        {"mode": "fp8_sparse", "sparsity": s, "pattern": {"kind": "window"}}
    )


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.mini_step_sensitivity",
                                 description=__doc__)  # fmt: skip
    result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    probe = mini_probe(seeds=(0,), steps=10, guidance=5.0, device="cpu")
    shape = ModelShape(
        name="mini", heads=4, head_dim=64, layers=4, grid=(5, 12, 16), steps=10, cfg=2
    )
    hw = current_fingerprint(torch.device("cpu"))

    def policy(default: AttentionSpec, *runs: tuple[tuple[int, int], AttentionSpec]) -> Policy:
        entries = tuple(PolicyEntry(steps=st, layers=(0, 4), spec=sp) for st, sp in runs)
        return Policy(model=shape, hardware=hw, default=default, entries=entries)

    cases = {
        "fp8 all": policy(FP8),
        "fp8, bf16 last 2": policy(FP8, ((8, 10), BF16)),
        "fp8, bf16 last 1": policy(FP8, ((9, 10), BF16)),
        "fp8, bf16 steps 5-9": policy(FP8, ((5, 10), BF16)),
        "sparse0.5 first 2, fp8": policy(FP8, ((0, 2), sparse(0.5))),
        "fp8, sparse0.5 last 2": policy(FP8, ((8, 10), sparse(0.5))),
        "sparse0.9 first 1, fp8, bf16 last 2": policy(FP8, ((0, 1), sparse(0.9)), ((8, 10), BF16)),
    }
    rows = []
    for name, p in cases.items():
        t = time.time()
        r = probe.measure(p)
        rows.append({"policy": name, **r.values})
        print(
            f"{name:40s} psnr {r.values['psnr']:.2f} ssim {r.values['ssim']:.3f}"
            f" ({time.time() - t:.0f}s)"
        )
    payload = {"probe": "mini, seed 0, 10 steps, CFG 5, CPU", "rows": rows}
    path = write_result("mini_step_sensitivity", payload, out=args.out, folder=args.results,
                        env=environment("cpu"))  # fmt: skip
    print(f"written: {path}")


if __name__ == "__main__":
    main()
