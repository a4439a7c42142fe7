"""Read-side helpers for the CLI: find a study by name or file, summarise studies, trials and
policies, delete a study, read the measured latency table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState

from fpstune import trial_attrs
from fpstune.errors import BadInput
from fpstune.kernels import Mode
from fpstune.kernels.policy import Policy
from fpstune.latency.table import LatencyRecord, LatencyTable, create_engine
from fpstune.spec.study import StudySpec, load_study
from fpstune.storage import controller_lock, mask_url, open_existing_storage, retry_db
from fpstune.trial_attrs import is_feasible, metric_names

#: One character per mode in `describe_policy`'s grid: upper case dense, lower case sparse.
MODE_CODES: dict[Mode, str] = {
    Mode.BF16_DENSE: "B",
    Mode.BF16_SPARSE: "b",
    Mode.FP8_DENSE: "F",
    Mode.FP8_SPARSE: "f",
}


def find_study(ref: str, *, storage_url: str) -> tuple[optuna.storages.RDBStorage, str]:
    """The storage and the name of the study ``ref`` names: a study YAML or a study name
    (``mini`` or ``mini:schedule``); `BadInput` listing the studies there if none matches."""
    storage = _open(storage_url)
    names = {s.study_name for s in retry_db(lambda: optuna.get_all_study_summaries(storage))}
    if ref.endswith((".yaml", ".yml")) or Path(ref).is_file():
        base = load_study(Path(ref)).name
    else:
        base = ref
    for name in (base, f"{base}:{trial_attrs.SCHEDULE_STAGE}"):
        if name in names:
            return storage, name
    known = ", ".join(sorted(names)) or "none"
    raise BadInput(f"study {ref!r}: not found in {mask_url(storage_url)} (studies: {known})")


def load_study_by_ref(ref: str, *, storage_url: str) -> tuple[optuna.Study, StudySpec]:
    """``ref`` is a study YAML or a study name (``mini`` or ``mini:schedule``)."""
    storage, name = find_study(ref, storage_url=storage_url)
    study = optuna.load_study(study_name=name, storage=storage)
    spec = trial_attrs.study_spec(study.user_attrs)
    if spec is None:
        raise BadInput(f"study {name}: not an fpstune study (no {trial_attrs.STUDY} attribute)")
    return study, spec


def study_status(ref: str, *, storage_url: str) -> dict[str, Any]:
    study, _ = load_study_by_ref(ref, storage_url=storage_url)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    front = study.best_trials if states.get("COMPLETE") else []
    names = study.metric_names or []
    return {
        "study": study.study_name,
        "storage": mask_url(storage_url),
        "trials": len(trials),
        **{s.lower(): n for s, n in sorted(states.items())},
        **_waiting_note(states.get("WAITING", 0)),
        "front_size": len(front),
        # where the trials' latencies were measured, against the machine that composed them
        "latencies": latency_provenance(trials),
        "front": [
            {"trial": t.number, **dict(zip(names, t.values, strict=True))}
            for t in sorted(front, key=lambda t: t.values[0])
        ],
    }


def _waiting_note(waiting: int) -> dict[str, str]:
    """Say what WAITING trials are: those an interrupted run re-queued (its controller was
    stopped mid-trial) and that no run has picked up since, e.g. because the budget was met.
    They hold no result, are not on the front, and are the first a later `study run` with
    budget left runs again (same parameters); kept, not deleted, so no evaluation is lost."""
    if not waiting:
        return {}
    return {
        "waiting_note": f"{waiting} trial(s) re-queued by an interrupted run and not yet re-run; "
        "a later `study run` with budget left runs them first"
    }


def latency_provenance(trials: Sequence[FrozenTrial]) -> str | None:
    """Where the latencies of the COMPLETE trials were measured, as the evaluator labelled them
    (``from table measured on NVIDIA H100 80GB HBM3 (not this machine: cpu)``), most trials
    first, ``; ``-joined when they differ; None for trials made before the label existed."""
    seen = Counter(
        str(t.user_attrs[trial_attrs.LATENCY_PROVENANCE])
        for t in trials
        if t.state == TrialState.COMPLETE and trial_attrs.LATENCY_PROVENANCE in t.user_attrs
    )
    return "; ".join(p for p, _ in seen.most_common()) or None


def list_studies(*, storage_url: str) -> list[dict[str, Any]]:
    storage = _open(storage_url)
    rows = []
    for s in retry_db(lambda: optuna.get_all_study_summaries(storage)):
        rows.append(
            {
                "study": s.study_name,
                "trials": s.n_trials,
                "stage": s.user_attrs.get(trial_attrs.STAGE, "?"),
                "started": s.datetime_start.isoformat(timespec="seconds")
                if s.datetime_start
                else None,
            }
        )
    return rows


def study_trials(ref: str, *, storage_url: str, best: bool = False) -> list[dict[str, Any]]:
    """One row per trial: number, state, its values by metric name, feasibility (None without
    constraints), baseline name (None for a searched trial) and parameters. ``best``: only the
    Pareto-optimal feasible trials, by the first objective."""
    study, _ = load_study_by_ref(ref, storage_url=storage_url)
    names = metric_names(study)
    trials = study.get_trials(deepcopy=False)
    if best:
        done = any(t.state == TrialState.COMPLETE for t in trials)
        trials = sorted(study.best_trials, key=lambda t: t.values[0]) if done else []
    return [_trial_row(t, names) for t in trials]


def _trial_row(t: FrozenTrial, names: Sequence[str]) -> dict[str, Any]:
    values = t.values or [None] * len(names)
    return {
        "trial": t.number,
        "state": t.state.name,
        **dict(zip(names, values, strict=True)),
        "feasible": is_feasible(t) if t.constraints else None,
        "baseline": t.user_attrs.get("baseline"),  # `fpstune baselines` trials have no params
        "params": dict(t.params),
    }


def study_size(ref: str, *, storage_url: str) -> tuple[str, int]:
    """The name of the study ``ref`` names and its number of trials (what a deletion drops)."""
    storage, name = find_study(ref, storage_url=storage_url)
    study_id = storage.get_study_id_from_name(name)
    return name, len(retry_db(lambda: storage.get_all_trials(study_id, deepcopy=False)))


def delete_study(name: str, *, storage_url: str) -> None:
    """Delete one study and its trials. Refused (`StorageBusy`) while a controller runs on the
    SQLite file; the latency rows its trials measured stay in the storage's latency table."""
    storage = _open(storage_url)
    with controller_lock(storage_url):
        retry_db(lambda: optuna.delete_study(study_name=name, storage=storage))


def measured_latency_table(storage_url: str) -> LatencyTable:
    """The storage's latency table; `BadInput` if the storage or its measured rows are missing
    (never creates an SQLite file)."""
    _open(storage_url)
    engine = create_engine(storage_url)
    # A storage without the latency table is left without one (opening it would create it).
    if sa.inspect(engine).has_table(LatencyRecord.__tablename__):
        table = LatencyTable(engine)
        if table.rows(source="measured"):
            return table
    engine.dispose()
    raise BadInput(
        f"--storage: no measured latencies in {mask_url(storage_url)}; "
        "run `fpstune study run STUDY --stage kernel` first"
    )


def describe_policy(policy: Policy) -> str:
    """The policy's model, hardware, specs and provenance, then its step x layer grid of modes."""
    m = policy.model
    lines = [
        f"model       {m.name}: {m.layers} layers x {m.heads} heads x {m.head_dim}, "
        f"grid {list(m.grid)}, {m.steps} steps x {m.cfg} passes",
        f"hardware    {policy.hardware.gpu} (sm {policy.hardware.sm_count})",
        f"default     {policy.default.describe()}",
    ]
    for e in policy.entries:
        lines.append(
            f"entry       steps [{e.steps[0]}, {e.steps[1]}) layers [{e.layers[0]}, "
            f"{e.layers[1]}): {e.spec.describe()}"
        )
    if policy.provenance is not None:
        for key, value in policy.provenance.model_dump(mode="json", exclude_none=True).items():
            if value != {}:
                lines.append(f"provenance  {key}: {_short(value)}")
    return "\n".join([*lines, "", *mode_grid(policy.grid_of_modes())])


def mode_grid(grid: Sequence[Sequence[Mode]]) -> list[str]:
    """Rows = steps, columns = layers, one `MODE_CODES` character per cell, and a legend."""
    layers = len(grid[0]) if grid else 0
    width = max(len("layer"), len(str(len(grid) - 1)))
    lines = ["modes by step (rows) and layer (columns):"]
    if layers > 10:  # the tens digit of every tenth layer, above the units digits
        tens = "".join(str(i // 10) if i % 10 == 0 else " " for i in range(layers))
        lines.append(" " * (width + 2) + tens.rstrip())
    lines.append(f"{'layer':<{width}}  " + "".join(str(i % 10) for i in range(layers)))
    lines += [f"{s:>{width}}  " + "".join(MODE_CODES[c] for c in row) for s, row in enumerate(grid)]
    used = [m for m in MODE_CODES if any(m in row for row in grid)]
    lines.append("legend: " + ", ".join(f"{MODE_CODES[m]} {m.value}" for m in used))
    return lines


def _short(value: Any) -> str:
    """A provenance value on one line, floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def _open(storage_url: str) -> optuna.storages.RDBStorage:
    try:
        return open_existing_storage(storage_url)
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(str(e)) from None
