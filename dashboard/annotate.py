"""Attach what the dashboard shows per trial: a note with the trial's schedule and latency split,
and three files in Optuna's artifact store, listed on the trial's page under "Trial Artifacts".

- ``trial-<n>-schedule.svg``: the step x layer heatmap (mode, sparsity), shown in the note;
- ``trial-<n>-latency.csv``: how the latency splits over the schedule's distinct specs;
- ``trial-<n>-policy.yaml``: the policy `fpstune export --trial N` would write, before it
  re-measures.

Optuna refuses to change a finished trial, `optuna.artifacts.upload_artifact` included (it writes
a trial system attribute). optuna-dashboard also reads a trial's artifacts from the *study's*
system attribute ``dashboard:artifacts:<trial_id>:<artifact_id>``, which a finished trial does
not block (the notes live in the study the same way), so each file is stored there: the trial's
page lists it, the study page does not. Studies annotated by an earlier fpstune keep their files
as study artifacts; they are found by name and not uploaded again.

Lazy and idempotent: `annotate_storage` fills in only what a COMPLETE trial lacks, so
`fpstune dashboard` runs it at start and again while a study runs; the controller's hot path never
pays for it. A note the trial already has (written here before, or by hand in the dashboard) is
never overwritten.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import optuna
from optuna.artifacts._protocol import ArtifactStore
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import save_note, save_plotly_graph_object

from fpstune.kernels import Mode, Policy
from fpstune.trial_attrs import SCHEDULE_STAGE, STAGE, study_spec

from .figures import cell_colour, cell_text, draw_front
from .info import baseline_name, front_info, is_feasible, metric_names
from .trials import (
    LatencyBreakdown,
    ScheduleInfo,
    export_preview,
    latency_breakdown,
    schedule_info,
    trial_policy,
)

log = logging.getLogger(__name__)
SCHEDULE, LATENCY, POLICY = "schedule.svg", "latency.csv", "policy.yaml"
_MIMETYPES = {SCHEDULE: "image/svg+xml", LATENCY: "text/csv", POLICY: "text/yaml"}
#: fpstune's front (baselines marked) among the dashboard's plots on the study page
FRONT_PLOT_ID = "fpstune-front"
#: a study system attribute ``<this><trial_id>:<artifact_id>`` is one of the trial's artifacts to
#: optuna-dashboard (`optuna_dashboard.artifact._backend.list_trial_artifacts`)
TRIAL_ARTIFACT_PREFIX = "dashboard:artifacts:"
_STUDY_ARTIFACT_PREFIX = "artifacts:"  # optuna.artifacts' study artifacts


def artifact_name(trial: int, kind: str) -> str:
    return f"trial-{trial:04d}-{kind}"


@dataclass(frozen=True)
class AnnotateResult:
    studies: int = 0
    trials: int = 0
    artifacts: int = 0
    notes: int = 0

    def __add__(self, o: AnnotateResult) -> AnnotateResult:
        return AnnotateResult(
            self.studies + o.studies,
            self.trials + o.trials,
            self.artifacts + o.artifacts,
            self.notes + o.notes,
        )


def annotate_storage(
    storage: optuna.storages.BaseStorage,
    *,
    artifact_store: ArtifactStore | None,
    storage_label: str,
) -> AnnotateResult:
    """Annotate every fpstune schedule study in ``storage``. ``storage_label`` is the masked URL
    written into the policy previews' provenance."""
    total = AnnotateResult()
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.user_attrs.get(STAGE) != SCHEDULE_STAGE:
            continue
        # A sampler without side effects: notes are saved through `optuna.Trial` handles.
        study = optuna.load_study(
            study_name=summary.study_name, storage=storage, sampler=optuna.samplers.RandomSampler()
        )
        total += annotate_study(study, artifact_store=artifact_store, storage_label=storage_label)
    return total


def annotate_study(
    study: optuna.Study, *, artifact_store: ArtifactStore | None, storage_label: str
) -> AnnotateResult:
    storage = study._storage
    spec = study_spec(study.user_attrs)
    names = metric_names(study)
    attrs = storage.get_study_system_attrs(study._study_id)
    noted = {k for k in attrs if k.endswith(":note_ver")}
    stored = stored_artifacts(study._study_id, attrs) if artifact_store is not None else {}
    trials = artifacts = notes = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        wanted = [artifact_name(t.number, k) for k in (SCHEDULE, LATENCY, POLICY)]
        want_files = artifact_store is not None and not all(w in stored for w in wanted)
        want_note = f"dashboard:{t._trial_id}:note_ver" not in noted
        if not (want_files or want_note):
            continue
        try:
            policy = trial_policy(t, spec)
            breakdown = latency_breakdown(t)
            files = {}
            if want_files and artifact_store is not None:
                files = _artifact_files(
                    t, policy, breakdown, study.study_name, storage_label, names
                )
        except (KeyError, TypeError, ValueError) as e:  # attributes this fpstune cannot read
            log.warning("trial %d: not annotated (%s: %s)", t.number, type(e).__name__, e)
            continue
        before = artifacts + notes
        if artifact_store is not None:
            for kind, text in files.items():
                name = artifact_name(t.number, kind)
                if name not in stored:
                    stored[name] = _upload(artifact_store, study, t, kind, text)
                    artifacts += 1
        if want_note:
            links = {
                kind: stored[artifact_name(t.number, kind)]
                for kind in (SCHEDULE, LATENCY, POLICY)
                if artifact_name(t.number, kind) in stored
            }
            note = trial_note(t, names, breakdown, policy, study=study.study_name, links=links)
            save_note(optuna.Trial(study, t._trial_id), note)
            notes += 1
        # a trial with nothing to show (no stored policy nor latency) is looked at, not counted
        if artifacts + notes > before:
            trials += 1
    _save_front(study, saved=_saved_plot(attrs, FRONT_PLOT_ID))
    return AnnotateResult(studies=1, trials=trials, artifacts=artifacts, notes=notes)


def _save_front(study: optuna.Study, *, saved: str) -> None:
    """The dashboard's own Pareto plot has no axis titles and cannot mark baselines; this one,
    among the study's plots, does both. Saved when it differs from the ``saved`` JSON: new
    trials, or a figure an earlier fpstune drew."""
    front = front_info(study)
    if not front.points or len(front.directions) != 2:
        return
    fig = draw_front(front)
    fig.update_layout(
        title={"text": "fpstune: front, baselines and knee points", "font": {"size": 14}},
        height=440,  # the dashboard's plot box is 450 px high
        margin={"t": 36, "l": 60, "r": 10, "b": 10},
        legend={"font": {"size": 10}},
    )
    if fig.to_json() != saved:
        save_plotly_graph_object(study, fig, graph_object_id=FRONT_PLOT_ID)


def _saved_plot(study_attrs: dict[str, Any], plot_id: str) -> str:
    """The JSON `save_plotly_graph_object` stored in chunks, ``""`` if none."""
    prefix = f"dashboard:plot_data:{plot_id}:"
    chunks = {
        int(k.removeprefix(prefix)): v for k, v in study_attrs.items() if k.startswith(prefix)
    }
    return "".join(chunks[i] for i in sorted(chunks))


def _artifact_files(
    t: FrozenTrial,
    policy: Policy | None,
    breakdown: LatencyBreakdown | None,
    study_name: str,
    storage_label: str,
    names: tuple[str, ...],
) -> dict[str, str]:
    files: dict[str, str] = {}
    if policy is not None:
        files[SCHEDULE] = schedule_svg(schedule_info(policy, trial=t.number))
        preview = export_preview(
            t, policy, study=study_name, storage=storage_label, metric_names=names
        )
        files[POLICY] = _policy_yaml(preview)
    if breakdown is not None:
        files[LATENCY] = latency_csv(breakdown)
    return files


def stored_artifacts(study_id: int, study_attrs: dict[str, Any]) -> dict[str, str]:
    """fpstune's files a study already has, ``{name: URL path the dashboard serves it at}``:
    the trials' artifacts, and the study artifacts an earlier fpstune stored instead."""
    out: dict[str, str] = {}
    for key, value in study_attrs.items():
        on_trial = key.startswith(TRIAL_ARTIFACT_PREFIX)
        if not (on_trial or key.startswith(_STUDY_ARTIFACT_PREFIX)) or not isinstance(value, str):
            continue
        meta = json.loads(value)  # None: deleted in the dashboard
        name = meta.get("filename", "") if isinstance(meta, dict) else ""
        if not name.startswith("trial-"):
            continue
        if on_trial:
            trial_id, artifact_id = key.removeprefix(TRIAL_ARTIFACT_PREFIX).split(":", 1)
            out[name] = f"/artifacts/{study_id}/{trial_id}/{artifact_id}"
        else:
            out.setdefault(name, f"/artifacts/{study_id}/{meta['artifact_id']}")
    return out


def _upload(store: ArtifactStore, study: optuna.Study, t: FrozenTrial, kind: str, text: str) -> str:
    """Store ``text`` as the trial's ``kind`` artifact; returns its URL path."""
    name, artifact_id = artifact_name(t.number, kind), str(uuid.uuid4())
    store.write(artifact_id, io.BytesIO(text.encode("utf-8")))  # the file first, then list it
    # the metadata optuna.artifacts writes, under the key optuna-dashboard reads for the trial
    meta = {
        "artifact_id": artifact_id,
        "filename": name,
        "mimetype": _MIMETYPES[kind],
        "encoding": None,
    }
    key = f"{TRIAL_ARTIFACT_PREFIX}{t._trial_id}:{artifact_id}"
    study._storage.set_study_system_attr(study._study_id, key, json.dumps(meta))
    return f"/artifacts/{study._study_id}/{t._trial_id}/{artifact_id}"


def _policy_yaml(policy: Policy) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / POLICY
        policy.dump(path)
        return path.read_text(encoding="utf-8")


def trial_note(
    t: FrozenTrial,
    names: tuple[str, ...],
    breakdown: LatencyBreakdown | None,
    policy: Policy | None,
    *,
    study: str,
    links: dict[str, str] | None = None,
) -> str:
    """A short Markdown note: what the trial is, its schedule (the artifact image, when stored),
    how its latency splits, and how to export it."""
    links = links or {}
    base = baseline_name(t)
    lines = [f"### Baseline `{base}`" if base else f"### Trial {t.number}"]
    values = ", ".join(f"**{n}** {v:.4g}" for n, v in zip(names, t.values, strict=True))
    # named constraints (Trial.set_constraint); "0", "1", ... are the dashboard's list form
    violated = sorted(k for k, v in t.constraints.items() if v > 0 and not k.isdigit())
    if is_feasible(t):
        state = "feasible"
    else:
        state = "infeasible (" + (", ".join(violated) or "a constraint") + " out of bounds)"
    lines.append(f"{values}; {state}.")
    if policy is not None:
        lines.append(f"Schedule (share of step x layer cells): {_schedule_summary(policy)}.")
    if SCHEDULE in links:
        lines.append(f"![step x layer schedule of trial {t.number}]({links[SCHEDULE]})")
    if breakdown is not None:
        gpu = breakdown.fingerprint.gpu if breakdown.fingerprint else "?"
        total = breakdown.total_ms or 1.0
        rows = [f"| {m} | {ms:.4g} | {ms / total:.0%} |" for m, ms in breakdown.by_mode().items()]
        lines.append(
            f"Latency {breakdown.total_ms:.4g} ms ({breakdown.source}, {breakdown.row_source} "
            f"rows, {gpu}):\n\n| mode | ms | share |\n|---|---:|---:|\n" + "\n".join(rows)
        )
    files = ", ".join(
        f"[{name}]({links[kind]})"
        for kind, name in ((SCHEDULE, "schedule"), (LATENCY, "latency split"), (POLICY, "policy"))
        if kind in links
    )
    if files:
        lines.append(f"Files: {files} (the policy as export would write it, before re-measuring).")
    lines.append(f"Export: `fpstune export {study} --trial {t.number} -o policy.yaml`")
    return "\n\n".join(lines)


def _schedule_summary(policy: Policy) -> str:
    cells = [s for row in policy.spec_table() for s in row]
    counts: dict[str, int] = {}
    for s in cells:
        counts[s.mode.value] = counts.get(s.mode.value, 0) + 1
    parts = [f"{m} {n / len(cells):.0%}" for m, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    sparse = [s.sparsity for s in cells if s.mode.sparse]
    text = ", ".join(parts)
    if sparse:
        text += f"; mean sparsity of the sparse cells {sum(sparse) / len(sparse):.2f}"
    return text


def latency_csv(b: LatencyBreakdown) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["mode", "spec", "calls", "ms_per_call", "total_ms", "share", "method"])
    total = b.total_ms or 1.0
    for p in b.parts:
        w.writerow(
            [
                p.mode,
                p.spec,
                p.calls,
                f"{p.ms_per_call:.6g}",
                f"{p.total_ms:.6g}",
                f"{p.total_ms / total:.3f}",
                p.method,
            ]
        )
    return out.getvalue()


def schedule_svg(s: ScheduleInfo) -> str:
    """The step x layer heatmap as a small SVG: equal neighbouring cells are drawn as one block
    (a policy is a few rectangles), so a 50-step x 40-layer schedule stays a few kB. The
    dashboard previews images; plotly would need a browser per trial for a static one."""
    cw = max(8, min(44, 640 // max(s.layers, 1)))
    ch = max(6, min(30, 480 // max(s.steps, 1)))
    left, top = 64, 40
    # wide enough for the legend line under the grid
    width, height = max(left + cw * s.layers + 16, 470), top + ch * s.steps + 36
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="16" font-size="13">{escape(s.title)}: step x layer</text>',
    ]
    every = max(1, -(-28 // cw))  # a tick label every 28 px or more
    for layer in range(0, s.layers, every):
        x = left + cw * layer + cw // 2
        out.append(f'<text x="{x}" y="{top - 6}" text-anchor="middle">L{layer}</text>')
    every = max(1, -(-14 // ch))
    for step in range(0, s.steps, every):
        y = top + ch * step + ch // 2 + 4
        out.append(f'<text x="{left - 6}" y="{y}" text-anchor="end">step {step}</text>')
    for s0, s1, l0, l1 in _blocks(s):
        mode, sp, spec = s.modes[s0][l0], s.sparsity[s0][l0], s.specs[s0][l0]
        x, y, w, h = left + cw * l0, top + ch * s0, cw * (l1 - l0), ch * (s1 - s0)
        out.append(
            f'<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{cell_colour(mode, sp)}" '
            f'stroke="#fff"><title>steps {s0}-{s1 - 1}, layers {l0}-{l1 - 1}: '
            f"{escape(spec)}</title></rect>"
        )
        if w >= 40 and h >= 14:
            ink = "#fff" if mode.sparse and sp >= 0.7 else "#000"  # legible on dark red
            out.append(
                f'<text x="{x + w // 2}" y="{y + h // 2 + 4}" text-anchor="middle" '
                f'font-size="10" fill="{ink}">{escape(cell_text(mode, sp))}</text>'
            )
    legend = "grey: bf16 dense | blue: fp8 dense | yellow to red: sparse, by sparsity"
    out.append(f'<text x="{left}" y="{height - 12}">{escape(legend)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _blocks(s: ScheduleInfo) -> list[tuple[int, int, int, int]]:
    """Maximal runs of equal cells along layers, merged over consecutive steps with the same
    run: ``(step0, step1, layer0, layer1)``, half-open."""
    Run = tuple[int, int, tuple[Mode, float, str]]
    rows: list[list[Run]] = []
    for step in range(s.steps):
        key = [(s.modes[step][i], s.sparsity[step][i], s.specs[step][i]) for i in range(s.layers)]
        runs, start = [], 0
        for layer in range(1, s.layers + 1):
            if layer == s.layers or key[layer] != key[start]:
                runs.append((start, layer, key[start]))
                start = layer
        rows.append(runs)
    blocks: list[tuple[int, int, int, int]] = []
    open_runs: dict[Run, int] = {}
    for step, runs in enumerate([*rows, []]):
        for run, first in list(open_runs.items()):
            if run not in runs:
                blocks.append((first, step, run[0], run[1]))
                del open_runs[run]
        for run in runs:
            open_runs.setdefault(run, step)
    return sorted(blocks)
