"""Read-side helpers for the CLI: find a study by name or file, summarise studies and policies."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import optuna

from fpstune.kernels.policy import Policy

from .errors import BadInput
from .spec.study import StudySpec, load_study
from .storage import mask_url, open_existing_storage, retry_db


def load_study_by_ref(
    ref: str, *, storage_url: str, stage: str = "schedule"
) -> tuple[optuna.Study, StudySpec]:
    """``ref`` is a study YAML or a study name (``mini`` or ``mini:schedule``)."""
    storage = _open(storage_url)
    names = {s.study_name for s in retry_db(lambda: optuna.get_all_study_summaries(storage))}
    if ref.endswith((".yaml", ".yml")) or Path(ref).is_file():
        base = load_study(Path(ref)).name
    else:
        base = ref
    for name in (base, f"{base}:{stage}"):
        if name in names:
            study = optuna.load_study(study_name=name, storage=storage)
            raw = study.user_attrs.get("fpstune_study")
            if raw is None:
                raise BadInput(f"study {name}: not an fpstune study (no fpstune_study attribute)")
            return study, StudySpec.model_validate(raw)
    known = ", ".join(sorted(names)) or "none"
    raise BadInput(f"study {ref!r}: not found in {mask_url(storage_url)} (studies: {known})")


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
        "front_size": len(front),
        "front": [
            {"trial": t.number, **dict(zip(names, t.values, strict=True))}
            for t in sorted(front, key=lambda t: t.values[0])
        ],
    }


def list_studies(*, storage_url: str) -> list[dict[str, Any]]:
    storage = _open(storage_url)
    rows = []
    for s in retry_db(lambda: optuna.get_all_study_summaries(storage)):
        rows.append(
            {
                "study": s.study_name,
                "trials": s.n_trials,
                "stage": s.user_attrs.get("fpstune_stage", "?"),
                "started": s.datetime_start.isoformat(timespec="seconds")
                if s.datetime_start
                else None,
            }
        )
    return rows


def describe_policy(policy: Policy) -> str:
    m = policy.model
    lines = [
        f"model     {m.name}: {m.layers} layers x {m.heads} heads x {m.head_dim}, "
        f"grid {list(m.grid)}, {m.steps} steps x {m.cfg} passes",
        f"hardware  {policy.hardware.gpu} (sm {policy.hardware.sm_count})",
        f"default   {policy.default.to_dict()}",
    ]
    for i, e in enumerate(policy.entries):
        lines.append(
            f"entry {i}   steps {list(e.steps)} layers {list(e.layers)}: {e.spec.to_dict()}"
        )
    if policy.provenance is not None:
        lines.append(f"provenance {policy.provenance.model_dump(mode='json', exclude_none=True)}")
    return "\n".join(lines)


def _open(storage_url: str) -> optuna.storages.RDBStorage:
    try:
        return open_existing_storage(storage_url)
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(str(e)) from None
