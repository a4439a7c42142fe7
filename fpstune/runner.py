"""`fpstune study run`: load and validate the study, then run its stage's controller(s)."""

from __future__ import annotations

from pathlib import Path

import ray

from .candidates import CandidateSource, KernelSource, ScheduleSource
from .controller import Controller, RunSummary, ensure_ray
from .errors import BadInput
from .pool import WorkerPool
from .quality.calibration import CalibrationError, load_calibration
from .space.kernel import kernel_buckets
from .spec.study import SYNTHETIC, StudySpec, load_study
from .storage import check_reachable, check_url, controller_lock

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
    """Everything is validated before the storage is touched, so bad input writes nothing.

    ``max_retries``: how often a trial whose worker or controller died is re-run with the same
    parameters. On an SQLite file, a second controller is refused (`controller_lock`)."""
    if stage not in STAGES:
        raise BadInput(f"--stage: {stage!r} is not one of {', '.join(STAGES)}")
    if max_retries < 0:
        raise BadInput(f"--max-retries: must be >= 0, got {max_retries}")
    try:
        check_url(storage_url)
    except ValueError as e:
        raise BadInput(str(e)) from None
    spec = load_study(study_file)
    if stage == "schedule":
        check_calibration(spec, study_file)
    sources: list[CandidateSource]
    if stage == "schedule":
        sources = [ScheduleSource(spec)]
        budget = trials or spec.trials.schedule
    else:
        sources = [
            KernelSource(spec, b) for b in kernel_buckets(spec.kernel_space, spec.model.head_dim)
        ]
        budget = trials or spec.trials.kernel
    check_reachable(storage_url)  # before Ray starts: a wrong password costs no Ray start
    with controller_lock(storage_url):
        ensure_ray(ray_address, workers)
        if stage == "kernel" and not ray.cluster_resources().get("GPU"):
            raise BadInput(
                f"{study_file}: --stage kernel measures kernel latency and needs a GPU; "
                "the Ray cluster has none"
            )
        # One pool of workers for all the stage's controllers (a kernel stage has one per
        # bucket): each worker sets up, and warms its GPU, once per run.
        pool = WorkerPool(spec, stage, storage_url, workers)
        try:
            return [
                Controller(
                    spec,
                    source,
                    storage_url=storage_url,
                    workers=workers,
                    budget=budget,
                    ray_address=ray_address,
                    max_retries=max_retries,
                    progress=progress,
                    pool=pool,
                ).run()
                for source in sources
            ]
        finally:
            pool.close()


def check_calibration(spec: StudySpec, study_file: Path) -> None:
    """Read the study's calibration file as the workers will (safetensors header, tensor shapes,
    NaN/Inf, the model's shape, the cells asked for), so a bad file is bad input naming the
    study's ``calibration.source``, found before the storage or Ray is touched."""
    cal = spec.calibration
    if cal.source == SYNTHETIC:
        return
    try:
        loaded = load_calibration(cal.source, model=spec.model)
        loaded.select(layers=cal.layer_indices(spec.model), steps=cal.step_indices(spec.model))
    except CalibrationError as e:
        raise BadInput(f"{study_file}: calibration.source: {e}") from None
    except KeyError as e:
        raise BadInput(f"{study_file}: calibration: {e.args[0]} ({cal.source})") from None
