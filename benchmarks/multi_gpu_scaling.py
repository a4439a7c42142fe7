"""Trials per hour of one study with 1, 2, ... workers (issue 8): one Ray actor per GPU.

For each worker count W the study file is copied under the name ``<name>-w<W>`` (a fresh study in
the same storage, so each count starts from nothing) and run with ``fpstune study run --workers
W``. Two rates per run:

- wall: COMPLETE trials / the command's whole wall time (Ray start, worker set-up and GPU
  warm-up, every bucket's controller, the final wait);
- busy: COMPLETE trials / the span from the first trial's start to the last trial's end, as
  the storage recorded them (leaves out the fixed start-up, which does not scale with W).

Efficiency = rate(W) / (W x rate(1)). Each run gets a fresh ``TRITON_CACHE_DIR``, so every
worker compiles the kernels it measures, as on a fresh host.

    python3 -m benchmarks.multi_gpu_scaling studies/wan2.1-t2v-1.3b-480p.yaml --stage kernel \
        --storage postgresql+psycopg://postgres@127.0.0.1:55432/fpstune --workers 1 2 --trials 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from fpstune.latency.bench import result_args, write_result


def study_copy(study_file: Path, name: str, folder: Path) -> Path:
    """The study under another name, its space files made absolute so the copy can live here."""
    d = yaml.safe_load(study_file.read_text())
    d["name"] = name
    for key in ("kernel_space", "schedule_space"):
        if key in d:
            d[key] = str((study_file.parent / d[key]).resolve())
    out = folder / f"{name}.yaml"
    out.write_text(yaml.safe_dump(d))
    return out


def stage_trials(storage: str, name: str, stage: str) -> list[optuna.trial.FrozenTrial]:
    prefix = f"{name}:{stage}"
    trials = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if s.study_name == prefix or s.study_name.startswith(prefix + ":"):
            study = optuna.load_study(study_name=s.study_name, storage=storage)
            trials += study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in trials if "baseline" not in t.user_attrs]


def run_one(args: argparse.Namespace, workers: int, folder: Path) -> dict[str, float | int]:
    base = yaml.safe_load(args.study.read_text())["name"]
    name = f"{base}-w{workers}"
    copy = study_copy(args.study, name, folder)
    env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix=f"triton-w{workers}-")}
    cmd = [
        sys.executable, "-m", "fpstune", "study", "run", str(copy), "--stage", args.stage,
        "--workers", str(workers), "--trials", str(args.trials), "--storage", args.storage,
        "--no-progress",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (folder / f"{name}-{args.stage}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"{name}: fpstune study run exited {done.returncode}:\n{done.stderr[-2000:]}")
    trials = stage_trials(args.storage, name, args.stage)
    first = min(t.datetime_start for t in trials if t.datetime_start)
    last = max(t.datetime_complete for t in trials if t.datetime_complete)
    busy = (last - first).total_seconds()
    gpus = sorted({t.user_attrs.get("gpu_index", -1) for t in trials})
    return {
        "workers": workers,
        "complete": len(trials),
        "wall_s": wall,
        "busy_s": busy,
        "per_hour_wall": 3600 * len(trials) / wall,
        "per_hour_busy": 3600 * len(trials) / busy,
        "gpus_used": len([g for g in gpus if g >= 0]),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python3 -m benchmarks.multi_gpu_scaling",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("study", type=Path, help="study YAML")
    p.add_argument("--stage", choices=("kernel", "schedule"), default="schedule")
    p.add_argument("--storage", required=True, help="storage URL (PostgreSQL for several GPUs)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--trials", type=int, required=True, help="budget (per bucket for kernel)")
    p.add_argument("--work", type=Path, default=Path("."), help="folder for study copies and logs")
    result_args(p)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [run_one(args, w, args.work) for w in args.workers]
    base = rows[0]
    for r in rows:
        for kind in ("wall", "busy"):
            per_worker = r[f"per_hour_{kind}"] / (r["workers"] / base["workers"])
            r[f"efficiency_{kind}"] = per_worker / base[f"per_hour_{kind}"]
    payload = {"study": str(args.study), "stage": args.stage, "trials": args.trials, "rows": rows}
    path = write_result(f"multi_gpu_scaling-{args.stage}", payload, out=args.out,
                        folder=args.results)  # fmt: skip
    print(f"\n{args.study.name}, stage {args.stage}, {args.trials} trials per study")
    print(
        "workers  GPUs used  trials  wall s  busy s  trials/h wall  trials/h busy"
        "  eff wall  eff busy"
    )
    for r in rows:
        print(
            f"{r['workers']:>7}  {r['gpus_used']:>9}  {r['complete']:>6}  {r['wall_s']:>6.1f}  "
            f"{r['busy_s']:>6.1f}  {r['per_hour_wall']:>13,.0f}  {r['per_hour_busy']:>13,.0f}  "
            f"{r['efficiency_wall']:>8.2f}  {r['efficiency_busy']:>8.2f}"
        )
    print(f"written: {path}")


if __name__ == "__main__":
    main()
