"""Issue 4's check on a finished mini-e2e run: does the front beat every baseline, and does
the sampler beat random search?

    python3 -m benchmarks.mini_front --storage sqlite:///mini-e2e.db \
        [--study mini-e2e:schedule] [--random mini-e2e-random:schedule] [--at 100]

For each baseline (trials marked ``baseline`` by `fpstune baselines`): the best PSNR among the
search's trials whose latency is at most the baseline's (the front's value there), and the
difference (goal: at least +1 dB for every baseline); and, for a study that started from the
baselines (``sampler.start_from_baselines``), the search trial that ran the baseline's own
schedule, whose values must match the stored baseline's. Hypervolume after ``--at`` trials, for
the study's sampler and for the random-search study, in (latency, -PSNR) space with the
reference point (the slowest latency seen, each ``--psnr-floor``); only feasible trials count.
Optuna's hypervolume routine is private (``optuna._hypervolume.compute_hypervolume``); it is the
one its samplers use.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume

from fpstune.latency.bench import result_args, write_result
from fpstune.run.trial_writes import counts_toward_budget


def search_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if counts_toward_budget(t)]


def feasible(t: optuna.trial.FrozenTrial) -> bool:
    cons = t.user_attrs.get("constraints") or {}
    return all(v <= 0 for v in cons.values())


def own_schedules(
    study: optuna.Study, trials: list[optuna.trial.FrozenTrial]
) -> dict[str, optuna.trial.FrozenTrial]:
    """Baseline name -> the first search trial that ran its schedule (`baseline_params`)."""
    from fpstune.baselines import baseline_params
    from fpstune.spec.study import StudySpec

    spec = StudySpec.model_validate(study.user_attrs["fpstune_study"])
    params = baseline_params(spec.schedule_space, spec.model.shape())
    ordered = sorted(trials, key=lambda t: t.number)
    found = {name: next((t for t in ordered if t.params == p), None) for name, p in params.items()}
    return {name: t for name, t in found.items() if t is not None}


def hypervolume(trials: list[optuna.trial.FrozenTrial], ref: tuple[float, float]) -> float:
    pts = np.array(
        [[t.values[0], -t.values[1]] for t in trials if feasible(t)], dtype=float
    ).reshape(-1, 2)
    pts = pts[(pts[:, 0] < ref[0]) & (pts[:, 1] < ref[1])]
    if len(pts) == 0:
        return 0.0
    return float(compute_hypervolume(pts, np.array(ref, dtype=float)))


def recomposed(study_file: str) -> Any:
    """A function trial -> latency_ms composed again from the latency table fpstune ships now
    (the quality values are measured and stay). For runs whose table has since gained rows."""
    from datetime import UTC, datetime

    import torch

    from fpstune import __version__
    from fpstune.kernels.fingerprint import current_fingerprint
    from fpstune.kernels.policy import Policy, Provenance
    from fpstune.latency.compose import CallLatency, compose_with
    from fpstune.spec import load_study
    from fpstune.stages.evaluators import schedule_latency
    from fpstune.stages.schedule_space import schedule_from_params

    spec = load_study(study_file)
    model = spec.model
    assert spec.latency.target is not None, "recompose is for studies with a latency.target"
    source = schedule_latency(spec, device=torch.device("cpu"))
    assert not isinstance(source, str)
    per_call: CallLatency = source
    prov = Provenance(study=spec.name, created=datetime.now(UTC), fpstune_version=__version__)
    hw = current_fingerprint()

    def latency(t: optuna.trial.FrozenTrial) -> float:
        if "baseline" in t.user_attrs:
            policy = Policy.from_dict(t.user_attrs["policy"])
        else:
            policy = schedule_from_params(
                t.params, spec.schedule_space, model, hardware=hw, provenance=prov
            )
        return float(compose_with(policy, per_call, batch=model.batch).total_ms)

    return latency


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.mini_front",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--storage", required=True)
    ap.add_argument("--study", default="mini-e2e:schedule")
    ap.add_argument("--random", default="mini-e2e-random:schedule")
    ap.add_argument("--at", type=int, default=100)
    ap.add_argument("--psnr-floor", type=float, nargs="+", default=[12.0, 25.0])
    result_args(ap)
    ap.add_argument(
        "--recompose",
        metavar="STUDY_YAML",
        default=None,
        help="compose every trial's latency again from the latency table shipped now",
    )
    args = ap.parse_args()
    study = optuna.load_study(study_name=args.study, storage=args.storage)
    trials = search_trials(study)
    base = {
        t.user_attrs["baseline"]: t
        for t in study.get_trials(deepcopy=False)
        if "baseline" in t.user_attrs
    }
    if args.recompose:
        latency = recomposed(args.recompose)

        def again(t: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
            t = copy.deepcopy(t)
            t.values = [latency(t), t.values[1]]
            return t

        trials = [again(t) for t in trials]
        base = {k: again(t) for k, t in base.items()}
    out: dict[str, Any] = {"trials": len(trials), "baselines": {}}
    print(f"{args.study}: {len(trials)} search trials, {len(base)} baselines")
    print(
        f"{'baseline':22} {'latency ms':>11} {'PSNR':>7} | "
        f"{'best front PSNR at <= latency':>30} {'diff':>7}"
    )
    own = own_schedules(study, trials)
    for name, b in sorted(base.items()):
        lat, psnr = b.values
        # The front at this latency: every search trial counts (a baseline below the study's
        # PSNR constraint is compared with the best the search found there, feasible or not).
        cands = [t for t in trials if t.values[0] <= lat]
        best = max(cands, key=lambda t: t.values[1]) if cands else None
        diff = best.values[1] - psnr if best else float("nan")
        shown = (
            f"{best.values[1]:7.2f} (trial {best.number}, {best.values[0]:.0f} ms)"
            if best
            else "none"
        )
        print(f"{name:22} {lat:11.1f} {psnr:7.2f} | {shown:>30} {diff:+7.2f}")
        out["baselines"][name] = {
            "latency_ms": lat,
            "psnr": psnr,
            "best_psnr_at_or_below": best.values[1] if best else None,
            "best_trial": best.number if best else None,
            "diff_db": diff,
        }
        if name in own:
            t = own[name]
            print(f"{'':22} its own schedule in the search: trial {t.number}, "
                  f"{t.values[0]:.1f} ms, {t.values[1]:.2f} dB")  # fmt: skip
            out["baselines"][name]["own_schedule"] = {"trial": t.number, "values": t.values}
    bf16 = max(t.values[0] for t in trials + list(base.values()))
    first = sorted(trials, key=lambda t: t.number)[: args.at]
    try:
        rnd: list[optuna.trial.FrozenTrial] | None = sorted(
            search_trials(optuna.load_study(study_name=args.random, storage=args.storage)),
            key=lambda t: t.number,
        )[: args.at]
        if args.recompose:
            rnd = [again(t) for t in rnd]
    except KeyError:
        rnd = None
    out["hypervolume"] = []
    for floor in args.psnr_floor:
        ref = (bf16, -floor)
        hv: dict[str, Any] = {"reference": list(ref), "sampler": hypervolume(first, ref)}
        hv["sampler_trials"] = len(first)
        if rnd is not None:
            hv["random"], hv["random_trials"] = hypervolume(rnd, ref), len(rnd)
        out["hypervolume"].append(hv)
        print(
            f"hypervolume after {args.at} trials (ref latency {ref[0]:.0f} ms, PSNR {floor}):", hv
        )
    out.update(study=args.study, random=args.random, at=args.at, recompose=args.recompose)
    print("written:", write_result("mini_front", out, out=args.out, folder=args.results))


if __name__ == "__main__":
    main()
