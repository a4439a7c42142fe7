"""Does the cheap attention proxy predict the video? (issue 23, item 2, on the mini model)

For N schedules of ``studies/mini-e2e.yaml``'s schedule space (the hand-set baselines' schedules
the space holds, then schedules drawn at random with a fixed seed through Optuna's
`RandomSampler` and `suggest_schedule`), measure

- ``rel_l2`` of the attention output on the study's SYNTHETIC calibration set (what studies use
  without a capture),
- ``rel_l2`` on Q/K/V CAPTURED from the mini's own BF16-dense denoising loop (the mini
  adapter's `capture`, every layer x step, every token; skipped with ``--no-capture``),
- end-to-end ``psnr`` / ``psnr_min`` of the generated videos against BF16 dense, by the study's
  own schedule evaluator (``end_to_end`` seeds and guidance as the study sets them),

and report the Spearman and Kendall rank correlations of each proxy with ``psnr`` (over all
schedules and over those whose PSNR is within ``--near-db`` of the best at equal or lower
latency, "near the front"). A perfect proxy has rho = -1 (lower rel_l2, higher psnr).

    python3 -m benchmarks.proxy_correlation --random 14 --seed 0 --max-minutes 7.5

Runs on a CPU (the mini is 960 tokens): about 20-35 s a schedule on 2 cores, almost all of it
the four end-to-end videos. Writes a JSON result with `write_result`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import torch
from scipy.stats import kendalltau, spearmanr

import fpstune
from fpstune.baselines import baseline_params
from fpstune.kernels.fingerprint import current_fingerprint
from fpstune.kernels.policy import Policy, Provenance
from fpstune.latency.bench import environment, result_args, result_path, write_result
from fpstune.models import adapters
from fpstune.spec.study import StudySpec, load_study
from fpstune.stages.candidates import ScheduleCandidate
from fpstune.stages.evaluators import build_schedule_evaluator
from fpstune.stages.schedule_space import schedule_from_params, suggest_schedule

STUDY = Path("studies/mini-e2e.yaml")


def schedules(spec: StudySpec, n_random: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """The baselines' schedules the space holds, then ``n_random`` distinct random draws."""
    space, shape = spec.schedule_space, spec.model.shape()
    out = [(f"baseline {name}", p) for name, p in baseline_params(space, shape).items()]
    seen = {tuple(sorted(p.items())) for _, p in out}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    draws = 0
    while sum(1 for label, _ in out if label.startswith("random")) < n_random:
        draws += 1
        if draws > 50 * max(n_random, 1):
            raise RuntimeError("the space yields too few distinct schedules")
        trial = study.ask()
        suggest_schedule(trial, space, spec.model)
        study.tell(trial, 0.0)
        key = tuple(sorted(trial.params.items()))
        if key in seen:
            continue
        seen.add(key)
        out.append((f"random {trial.number}", dict(trial.params)))
    return out


def policy_of(spec: StudySpec, params: dict[str, Any], label: str) -> Policy:
    return schedule_from_params(
        params,
        spec.schedule_space,
        spec.model,
        hardware=current_fingerprint(),
        provenance=Provenance(
            study="proxy-correlation",
            created=datetime.now(UTC),
            fpstune_version=fpstune.__version__,
            notes=label,
        ),
    )


def capture_spec(
    spec: StudySpec, folder: Path, seeds: list[int]
) -> tuple[StudySpec, dict[str, Any]]:
    """Capture the mini's own Q/K/V (BF16 dense, the study's end-to-end guidance, ``seeds``,
    every layer, step and token) and return the study pointed at it, attention proxy only."""
    from fpstune.models import mini

    assert spec.end_to_end is not None
    adapter = adapters.get(spec.model.adapter)
    transformer, _ = adapter.load(None, device="cpu")
    start = time.perf_counter()
    cap = adapter.capture(
        transformer,
        mini.sampling(steps=spec.model.steps, guidance=spec.end_to_end.guidance),
        mini.conditions(seeds),
        out=folder / "mini-capture.safetensors",
        name=spec.model.name,
        seeds=seeds,
    )
    seconds = time.perf_counter() - start
    cal = spec.calibration.model_copy(update={"source": str(cap.path), "max_tokens": None})
    proxy = spec.model_copy(
        update={
            "calibration": cal,
            "objectives": [o for o in spec.objectives if o.name != "psnr"],
            "constraints": [],
        }
    )
    meta = {
        "seeds": seeds,
        "guidance": spec.end_to_end.guidance,
        "cells": len(cap.meta.cells),
        "q_shape": list(cap.meta.q_shape),
        "kv_shape": list(cap.meta.tensor_shape),
        "seconds": round(seconds, 1),
    }
    return proxy, meta


def correlations(rows: list[dict[str, Any]], proxy: str) -> dict[str, Any]:
    xs = [r[proxy] for r in rows if r.get(proxy) is not None and r.get("psnr") is not None]
    ys = [r["psnr"] for r in rows if r.get(proxy) is not None and r.get("psnr") is not None]
    if len(xs) < 3:
        return {"n": len(xs)}
    rho, p_rho = spearmanr(xs, ys)
    tau, p_tau = kendalltau(xs, ys)
    return {
        "n": len(xs),
        "spearman_rho": float(rho),
        "spearman_p": float(p_rho),
        "kendall_tau": float(tau),
        "kendall_p": float(p_tau),
    }


def near_front(rows: list[dict[str, Any]], db: float) -> list[dict[str, Any]]:
    """Rows whose psnr is within ``db`` of the best psnr at equal or lower latency."""
    out = []
    for r in rows:
        best = max(o["psnr"] for o in rows if o["latency_ms"] <= r["latency_ms"])
        if r["psnr"] >= best - db:
            out.append(r)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, default=STUDY)
    ap.add_argument("--random", type=int, default=60, help="random schedules beside baselines")
    ap.add_argument("--seed", type=int, default=0, help="RandomSampler seed")
    ap.add_argument("--no-capture", action="store_true", help="skip the captured-Q/K/V proxy")
    ap.add_argument(
        "--capture-seeds",
        default="0",
        help="comma-separated seeds of the captured videos (default: %(default)s; each seed "
        "adds one video x CFG 2 x 40 cells of 960 tokens to every proxy evaluation)",
    )
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="take no new schedule after this many minutes (the result says how many ran)",
    )
    ap.add_argument("--near-db", type=float, default=3.0, help="'near the front' margin (dB)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    result_args(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    spec = load_study(args.study)
    todo = schedules(spec, args.random, args.seed)
    print(f"{len(todo)} schedules ({len(todo) - args.random} baselines, {args.random} random)")

    # the study's own evaluator: latency at the target, rel_l2 (synthetic), psnr (end to end)
    e2e = build_schedule_evaluator(spec, device="cpu")
    captured = None
    capture_meta: dict[str, Any] | None = None
    tmp = tempfile.TemporaryDirectory(prefix="fpstune-proxy-")
    if not args.no_capture:
        proxy_spec, capture_meta = capture_spec(
            spec, Path(tmp.name), [int(x) for x in args.capture_seeds.split(",")]
        )
        captured = build_schedule_evaluator(proxy_spec, device="cpu")
        print(f"capture: {capture_meta}")

    env = environment("cpu")
    out = args.out or result_path("proxy-correlation", args.results, gpu=env.get("gpu"))
    rows: list[dict[str, Any]] = []
    stopped = None
    for i, (label, params) in enumerate(todo):
        if args.max_minutes is not None and time.perf_counter() - t0 > 60 * args.max_minutes:
            stopped = f"--max-minutes {args.max_minutes:g}: stopped after {i} of {len(todo)}"
            print(stopped)
            break
        t = time.perf_counter()
        cand = ScheduleCandidate(policy_of(spec, params, label))
        ev = e2e.evaluate(cand)
        row: dict[str, Any] = {
            "label": label,
            "params": params,
            "latency_ms": ev.values["latency_ms"],
            "rel_l2_synthetic": ev.values["rel_l2"],
            "psnr": ev.values["psnr"],
            "psnr_min": ev.values["psnr_min"],
        }
        if captured is not None:
            row["rel_l2_captured"] = captured.evaluate(cand).values["rel_l2"]
        row["seconds"] = round(time.perf_counter() - t, 2)
        rows.append(row)
        cap_txt = f" captured {row['rel_l2_captured']:.4f}" if captured is not None else ""
        print(
            f"[{i + 1}/{len(todo)}] {label}: {row['latency_ms'] / 1e3:.1f} s, "
            f"psnr {row['psnr']:.2f} (min {row['psnr_min']:.2f}), "
            f"rel_l2 synthetic {row['rel_l2_synthetic']:.4f}{cap_txt} ({row['seconds']} s)",
            flush=True,
        )

    proxies = ["rel_l2_synthetic"] + (["rel_l2_captured"] if captured is not None else [])
    front = near_front(rows, args.near_db)
    table = {
        subset: {p: correlations(sel, p) for p in proxies}
        for subset, sel in (("all", rows), (f"near_front_{args.near_db:g}db", front))
    }
    # psnr_min as the target too (the worst video)
    table["all_vs_psnr_min"] = {
        p: correlations([{**r, "psnr": r["psnr_min"]} for r in rows], p) for p in proxies
    }
    wall = time.perf_counter() - t0
    print(f"\n{'subset':<22} {'proxy':<18} {'N':>3} {'rho':>7} {'tau':>7} {'p (rho)':>9}")
    for subset, per in table.items():
        for p, c in per.items():
            if "spearman_rho" in c:
                print(
                    f"{subset:<22} {p:<18} {c['n']:>3} {c['spearman_rho']:>7.3f} "
                    f"{c['kendall_tau']:>7.3f} {c['spearman_p']:>9.2g}"
                )
    print(f"wall {wall:.0f} s")
    path = write_result(
        "proxy-correlation",
        {
            "study": str(args.study),
            "seed": args.seed,
            "n_schedules": len(rows),
            "n_planned": len(todo),
            "stopped": stopped,
            "near_db": args.near_db,
            "calibration_synthetic": spec.calibration.model_dump(mode="json"),
            "capture": capture_meta,
            "end_to_end": spec.end_to_end.model_dump(mode="json") if spec.end_to_end else None,
            "correlations": table,
            "wall_s": round(wall, 1),
            "torch_threads": torch.get_num_threads(),
            "rows": rows,
        },
        out=out,
        env=env,
        argv=argv,
    )
    tmp.cleanup()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
