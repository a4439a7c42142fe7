"""`fpstune export`: pick a feasible Pareto trial, re-check it, and write its policy YAML."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from fpstune import __version__, trial_attrs
from fpstune.catalog import load_study_by_ref
from fpstune.errors import BadInput
from fpstune.kernels.fingerprint import current_fingerprint
from fpstune.latency.table import stored_latency_table
from fpstune.outputs import check_output
from fpstune.pinning import pin_kernels
from fpstune.spec.study import StudySpec
from fpstune.stages.candidates import ScheduleCandidate
from fpstune.stages.evaluation import CandidateError
from fpstune.storage import mask_url
from fpstune.trial_attrs import metric_names

LATENCY = "latency_ms"


@dataclass(frozen=True)
class ExportResult:
    output: Path
    trial: int
    stored: dict[str, float]
    remeasured: dict[str, float]
    latency_source: str

    def summary(self) -> str:
        parts = [f"{self.output}: trial {self.trial}"]
        for name, v in self.stored.items():
            r = self.remeasured.get(name)
            again = f" (re-measured {r:.4g}, {_pct(r, v)})" if r is not None else ""
            parts.append(f"{name} {v:.4g}{again}")
        parts.append(f"latency from {self.latency_source}")
        for metric in E2E_PSNR:
            verified = self.remeasured.get(f"e2e_{metric}_verified")
            if verified is not None:
                parts.append(f"end-to-end {metric} verified {verified:.4g} dB")
        e2e, composed = self.remeasured.get("end_to_end_ms"), self.remeasured.get(LATENCY)
        if e2e is not None and composed is not None:
            parts.append(
                f"end-to-end run {e2e:.4g} ms vs composed {composed:.4g} ms ({_pct(composed, e2e)})"
            )
        return ", ".join(parts)


def pick_trial(
    study: optuna.Study,
    *,
    min_quality: float | None = None,
    max_latency: float | None = None,
) -> optuna.trial.FrozenTrial:
    """A feasible Pareto trial: with bounds, the fastest within them (or the best quality under a
    latency bound alone); without, the knee — the front point nearest the ideal point after
    scaling each objective to [0, 1] over the front."""
    names = list(metric_names(study))
    front = study.best_trials
    if not front:
        raise BadInput(f"study {study.study_name}: no feasible complete trial to export")
    lat_i = names.index(LATENCY) if LATENCY in names else 0
    qual_i = next(i for i in range(len(names)) if i != lat_i)
    maximize_q = study.directions[qual_i] == optuna.study.StudyDirection.MAXIMIZE

    def ok(t: optuna.trial.FrozenTrial) -> bool:
        q, lat = t.values[qual_i], t.values[lat_i]
        if min_quality is not None and (q < min_quality if maximize_q else q > min_quality):
            return False
        return max_latency is None or lat <= max_latency

    cands = [t for t in front if ok(t)]
    if not cands:
        given = {"--min-quality": min_quality, "--max-latency": max_latency}
        bounds = ", ".join(f"{opt} {v:g}" for opt, v in given.items() if v is not None)
        raise BadInput(
            f"study {study.study_name}: no Pareto trial meets {bounds}; the front spans "
            f"{names[qual_i]} {_span(front, qual_i)}, {names[lat_i]} {_span(front, lat_i)}"
        )
    if min_quality is not None:
        return min(cands, key=lambda t: t.values[lat_i])
    if max_latency is not None:
        return max(cands, key=lambda t: t.values[qual_i] * (1 if maximize_q else -1))
    return _knee(cands, study.directions)


def export_policy(
    study_ref: str,
    *,
    storage_url: str,
    output: Path,
    min_quality: float | None = None,
    max_latency: float | None = None,
    trial_number: int | None = None,
    verify_e2e: int | None = None,
) -> ExportResult:
    """``verify_e2e`` N: also re-generate the first N of the study's end-to-end seeds with the
    picked policy and refuse (`BadInput`, nothing written) when their PSNR misses the study's
    bar (`_psnr_bar`: ``min_quality`` on a psnr or frame_psnr objective, else such a
    constraint's min)."""
    check_output(output, option="output")  # before the re-measurement, which takes a while
    study, spec = load_study_by_ref(study_ref, storage_url=storage_url)
    bar = None if verify_e2e is None else _psnr_bar(study, spec, verify_e2e, min_quality)
    if trial_number is None:
        trial = pick_trial(study, min_quality=min_quality, max_latency=max_latency)
    else:
        trial = _trial_by_number(study, trial_number)
    names = study.metric_names or []
    stored = dict(zip(names, trial.values, strict=True))

    # Re-measure the pick on this machine before shipping it. torch and the evaluators are
    # imported only now: bad input above is told in about a second.
    import torch

    from fpstune.latency.e2e import measure_policy_run
    from fpstune.stages.evaluators import build_schedule_evaluator, end_to_end_probe

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    evaluator = build_schedule_evaluator(
        spec, device=device, latency_table=stored_latency_table(storage_url)
    )
    try:
        candidate = ScheduleCandidate.from_attr(trial.user_attrs[trial_attrs.CANDIDATE])
        again = evaluator.evaluate(candidate)
    except CandidateError as e:
        raise BadInput(f"study {study.study_name}: trial {trial.number} fails again: {e}") from e
    remeasured = {k: again.values[k] for k in names if k in again.values}
    policy = candidate.policy
    # Check the composition against one measured end-to-end run; not for a proxy costed at a
    # target shape (`latency.target`), whose latency is the target's and its run the proxy's.
    if device.type == "cuda" and spec.latency.target is None:
        run = measure_policy_run(policy, device=device, batch=spec.model.batch, runs=2)
        remeasured["end_to_end_ms"] = run.timing.median_ms

    # The policy is for the GPU its latencies were measured on, with the configs measured there.
    policy = pin_kernels(policy, trial_attrs.latency_lookups(again.attrs))
    if (fingerprint := trial_attrs.latency_fingerprint(again.attrs)) is not None:
        policy = policy.replace(hardware=fingerprint)
    where = current_fingerprint(device).gpu
    notes = f"re-measured on {where}"
    if verify_e2e is not None and bar is not None:
        e2e, (metric, floor) = spec.end_to_end, bar
        assert e2e is not None
        seeds = e2e.seeds[:verify_e2e]
        try:
            probe = end_to_end_probe(spec, seeds=seeds, device=device)
            psnr = probe.measure(policy).values[metric]
        except CandidateError as e:
            raise BadInput(f"--verify-e2e: trial {trial.number}: {e}") from e
        n = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
        if psnr < floor:
            raise BadInput(
                f"--verify-e2e: trial {trial.number}: end-to-end {metric} {psnr:.2f} dB on {n} "
                f"misses the bar {floor:g} dB by {floor - psnr:.2f} dB; no policy written"
            )
        remeasured[f"e2e_{metric}_verified"] = psnr
        notes += (
            f"; end-to-end {metric} {psnr:.2f} dB verified on {n} {list(seeds)} (bar {floor:g})"
        )
    if trial_attrs.LATENCY_PROVENANCE in again.attrs:  # says when the latencies are another GPU's
        notes += f"; latencies {again.attrs[trial_attrs.LATENCY_PROVENANCE]}"
    policy = policy.with_provenance(
        _provenance(study, trial, storage_url, stored, remeasured, again.attrs) | {"notes": notes}
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    policy.dump(output)
    return ExportResult(
        output=output,
        trial=trial.number,
        stored=stored,
        remeasured=remeasured,
        latency_source=trial_attrs.latency_source(again.attrs),
    )


def _provenance(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    storage_url: str,
    stored: dict[str, float],
    remeasured: dict[str, float],
    attrs: dict[str, Any],
) -> dict[str, Any]:
    return {
        "study": study.study_name,
        "trial": trial.number,
        "storage": mask_url(storage_url),
        "objectives": stored,
        "remeasured": remeasured,
        "latency_source": attrs.get(trial_attrs.LATENCY_SOURCE),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fpstune_version": __version__,
    }


#: End-to-end PSNRs an export can verify: of final latents, of decoded frames.
E2E_PSNR = ("psnr", "frame_psnr")


def _psnr_bar(
    study: optuna.Study, spec: StudySpec, n: int, min_quality: float | None
) -> tuple[str, float]:
    """(metric, bar): the end-to-end PSNR an export's verification must reach — ``min_quality``
    on a psnr / frame_psnr quality objective, else the min of such a constraint, else the
    study's ``end_to_end.min_psnr``; `BadInput` when it cannot be run."""
    if spec.end_to_end is None:
        raise BadInput(f"--verify-e2e: study {spec.name} has no end_to_end section")
    have = len(spec.end_to_end.seeds)
    if not 1 <= n <= have:
        raise BadInput(
            f"--verify-e2e: expected 1 to {have} (the study's end_to_end seeds), got {n}"
        )
    quality = [m for m in metric_names(study) if m != LATENCY]
    if min_quality is not None and quality[:1] in (["psnr"], ["frame_psnr"]):
        return quality[0], min_quality
    for c in spec.constraints:
        if c.name in E2E_PSNR and c.min is not None:
            return c.name, float(c.min)
    if (floor := spec.end_to_end.min_psnr) is not None:
        return "psnr", floor
    raise BadInput(
        f"--verify-e2e: study {spec.name} sets no psnr bar (end_to_end.min_psnr, a psnr or "
        "frame_psnr constraint with min, or --min-quality on such an objective)"
    )


def _trial_by_number(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            if t.state != optuna.trial.TrialState.COMPLETE:
                raise BadInput(f"--trial: trial {number} is {t.state.name}, not COMPLETE")
            return t
    raise BadInput(f"--trial: study {study.study_name} has no trial {number}")


def _knee(
    trials: list[optuna.trial.FrozenTrial], directions: list[optuna.study.StudyDirection]
) -> optuna.trial.FrozenTrial:
    signs = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in directions]
    vals = [[s * v for s, v in zip(signs, t.values, strict=True)] for t in trials]
    lo = [min(col) for col in zip(*vals, strict=True)]
    hi = [max(col) for col in zip(*vals, strict=True)]

    def dist(row: list[float]) -> float:
        return sum(
            ((v - a) / (b - a) if b > a else 0.0) ** 2 for v, a, b in zip(row, lo, hi, strict=True)
        )

    best = min(range(len(trials)), key=lambda i: (dist(vals[i]), trials[i].number))
    return trials[best]


def _span(trials: list[optuna.trial.FrozenTrial], i: int) -> str:
    vals = [t.values[i] for t in trials]
    return f"[{min(vals):.4g}, {max(vals):.4g}]"


def _pct(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.1f} %" if old else "n/a"


__all__ = ["ExportResult", "StudySpec", "export_policy", "pick_trial"]
