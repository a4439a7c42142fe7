"""The same kernel configs measured on every GPU of the host (issue 8): is a winner found on one
GPU still the winner on another?

From a kernel-stage study in the storage, takes each bucket's ``--top`` fastest configs, then
measures each of them ``--repeats`` times on every GPU (one process per GPU, in parallel, as the
workers of a study run; each with its own GPU warm-up), interleaving the configs so that drift
hits all of them alike. Prints, per config, the median on each GPU and the spread across GPUs
((max - min) / mean), beside the spread of the repeats on one GPU; then per bucket whether the
winner is the same on every GPU.

    python3 -m benchmarks.gpu_spread --storage URL --study wan2.1-t2v-1.3b-480p-w2 --work DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from fpstune.latency.bench import result_args, write_result


def top_configs(storage: str, study: str, top: int) -> list[dict[str, Any]]:
    """``top`` fastest COMPLETE trials of each kernel bucket of ``study``."""
    out = []
    prefix = f"{study}:kernel:"
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if not s.study_name.startswith(prefix):
            continue
        trials = optuna.load_study(study_name=s.study_name, storage=storage).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,)
        )
        for t in sorted(trials, key=lambda t: t.values[0])[:top]:
            out.append(
                {
                    "bucket": s.study_name[len(prefix) :],
                    "trial": t.number,
                    "study_ms": t.values[0],
                    "study_gpu": t.user_attrs.get("gpu_index"),
                    "candidate": t.user_attrs["candidate"],
                    "shape": t.user_attrs["details"]["shape"],
                }
            )
    return out


def measure_here(configs: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """In a child process that sees one GPU: every config ``repeats`` times, interleaved."""
    import torch

    from fpstune.kernels.fingerprint import device_identity
    from fpstune.latency.shape import AttentionShape
    from fpstune.stages.candidates import KernelCandidate
    from fpstune.stages.evaluators import KernelEvaluator

    device = torch.device("cuda")
    evaluators: dict[str, KernelEvaluator] = {}
    ms: list[list[float]] = [[] for _ in configs]
    for _ in range(repeats):
        for i, c in enumerate(configs):
            key = json.dumps(c["shape"], sort_keys=True)
            if key not in evaluators:  # the first warms the GPU (20 s)
                shape = AttentionShape.from_dict(c["shape"])
                evaluators[key] = KernelEvaluator(shape, device=device, warmup=10, reps=50)
            candidate = KernelCandidate.from_attr(c["candidate"])
            ms[i].append(evaluators[key].evaluate(candidate).values["latency_ms"])
    return {**device_identity(device), "ms": ms}


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python3 -m benchmarks.gpu_spread",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--storage", required=True)
    p.add_argument("--study", required=True, help="the study's name (as in its YAML)")
    p.add_argument("--top", type=int, default=2, help="configs per bucket")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpus", type=int, default=None, help="default: every GPU torch sees")
    p.add_argument("--work", type=Path, default=Path("."), help="folder for the per-GPU files")
    result_args(p)
    # internal: a child process measuring the configs of file CHILD on its one GPU into OUT
    p.add_argument(
        "--child", type=Path, nargs=2, metavar=("CONFIGS", "OUT"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.child:
        todo, out = args.child
        out.write_text(json.dumps(measure_here(json.loads(todo.read_text()), args.repeats)))
        return
    import torch

    gpus = args.gpus or torch.cuda.device_count()
    args.work.mkdir(parents=True, exist_ok=True)
    configs = top_configs(args.storage, args.study, args.top)
    if not configs:
        sys.exit(f"no COMPLETE kernel-stage trials of study {args.study!r} in the storage")
    todo = args.work / "spread-configs.json"
    todo.write_text(json.dumps(configs))
    procs = []
    for g in range(gpus):
        result = args.work / f"spread-gpu{g}.json"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(g)}
        safe = ["-P"] if sys.flags.safe_path else []  # as this process was started
        cmd = [sys.executable, *safe, "-m", "benchmarks.gpu_spread", "--storage", args.storage,
               "--study", args.study, "--repeats", str(args.repeats),
               "--child", str(todo), str(result)]  # fmt: skip
        procs.append((g, result, subprocess.Popen(cmd, env=env)))
    per_gpu = {}
    for g, result, proc in procs:
        if proc.wait() != 0:
            sys.exit(f"GPU {g}: the measuring process exited {proc.returncode}")
        per_gpu[g] = json.loads(result.read_text())
    rows = []
    for i, c in enumerate(configs):
        med = {g: statistics.median(r["ms"][i]) for g, r in per_gpu.items()}
        rep = max((max(r["ms"][i]) - min(r["ms"][i])) / med[g] for g, r in per_gpu.items())
        mean = statistics.fmean(med.values())
        rows.append(
            {
                **c,
                "median_ms": med,
                "gpu_spread": (max(med.values()) - min(med.values())) / mean,
                "repeat_spread": rep,
            }
        )
    flips = []
    for bucket in sorted({r["bucket"] for r in rows}):
        group = [r for r in rows if r["bucket"] == bucket]
        winners = {g: min(group, key=lambda r: r["median_ms"][g])["trial"] for g in per_gpu}
        study_winner = min(group, key=lambda r: r["study_ms"])["trial"]
        flips.append({"bucket": bucket, "winner_per_gpu": winners, "study_winner": study_winner,
                      "same_everywhere": len(set(winners.values())) == 1,
                      "margin": _margin(group)})  # fmt: skip
    uuids = {g: r.get("gpu_uuid") for g, r in per_gpu.items()}
    path = write_result("gpu_spread", {"study": args.study, "gpus": uuids, "configs": rows,
                        "buckets": flips}, out=args.out, folder=args.results)  # fmt: skip
    print(f"\nGPUs: {uuids}")
    print(
        "bucket                         trial  study ms (gpu)  "
        + "  ".join(f"gpu{g} ms" for g in per_gpu)
        + "  across GPUs  repeats"
    )
    for r in rows:
        cells = "  ".join(f"{r['median_ms'][g]:7.3f}" for g in per_gpu)
        print(
            f"{r['bucket'][:30]:<30} {r['trial']:>5}  {r['study_ms']:8.3f} ({r['study_gpu']})"
            f"  {cells}  {100 * r['gpu_spread']:10.2f}%  {100 * r['repeat_spread']:6.2f}%"
        )
    spreads = [r["gpu_spread"] for r in rows]
    med, top = 100 * statistics.median(spreads), 100 * max(spreads)
    print(f"spread across GPUs: median {med:.2f}%, max {top:.2f}%")
    same = sum(f["same_everywhere"] for f in flips)
    print(f"buckets whose winner is the same on every GPU: {same}/{len(flips)}")
    for f in flips:
        if not f["same_everywhere"]:
            margin = 100 * f["margin"]
            print(f"  {f['bucket']}: winners {f['winner_per_gpu']} (top-2 margin {margin:.2f}%)")
    print(f"written: {path}")


def _margin(group: list[dict[str, Any]]) -> float:
    """How far apart the bucket's two fastest configs are, on the GPUs' mean."""
    means = sorted(statistics.fmean(r["median_ms"].values()) for r in group)
    return (means[1] - means[0]) / means[0] if len(means) > 1 else float("inf")


if __name__ == "__main__":
    main()
