"""`fpstune study run`: load and validate the study, then run its stage's controller(s)."""

from __future__ import annotations

from pathlib import Path

import ray

from .candidates import CandidateSource, KernelSource, ScheduleSource
from .controller import Controller, RunSummary, ensure_ray
from .errors import BadInput
from .space.kernel import kernel_buckets
from .spec.study import load_study
from .storage import check_url

STAGES = ("kernel", "schedule")


def run_study(
    study_file: Path,
    *,
    storage_url: str,
    workers: int = 1,
    trials: int | None = None,
    stage: str = "schedule",
    ray_address: str | None = None,
    progress: bool = True,
    max_retries: int = 2,
) -> list[RunSummary]:
    """Everything is validated before the storage is touched, so bad input writes nothing."""
    if stage not in STAGES:
        raise BadInput(f"--stage: {stage!r} is not one of {', '.join(STAGES)}")
    try:
        check_url(storage_url)
    except ValueError as e:
        raise BadInput(str(e)) from None
    spec = load_study(study_file)
    sources: list[CandidateSource]
    if stage == "schedule":
        sources = [ScheduleSource(spec)]
        budget = trials or spec.trials.schedule
    else:
        sources = [
            KernelSource(spec, b) for b in kernel_buckets(spec.kernel_space, spec.model.head_dim)
        ]
        budget = trials or spec.trials.kernel
    ensure_ray(ray_address, workers)
    if stage == "kernel" and not ray.cluster_resources().get("GPU"):
        raise BadInput(
            f"{study_file}: --stage kernel measures kernel latency and needs a GPU; "
            "the Ray cluster has none"
        )
    summaries = []
    for source in sources:
        controller = Controller(
            spec,
            source,
            storage_url=storage_url,
            workers=workers,
            budget=budget,
            ray_address=ray_address,
            max_retries=max_retries,
            progress=progress,
        )
        summaries.append(controller.run())
    return summaries
