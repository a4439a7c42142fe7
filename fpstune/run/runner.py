"""`fpstune study run`: load and validate the study, then run its stage's controller(s)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fpstune.errors import BadInput
from fpstune.safetensors_check import check_safetensors
from fpstune.spec.study import SYNTHETIC, StudySpec, load_study
from fpstune.storage import (
    check_reachable,
    check_url,
    controller_lock,
    remove_sqlite_file,
    sqlite_path,
)

if TYPE_CHECKING:
    from fpstune.run.controller import Controller, RunSummary
    from fpstune.stages.base import Stage


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
    timeout_s: float | None = None,
) -> list[RunSummary]:
    """Everything is validated before the storage is touched, so bad input writes nothing.

    ``max_retries``: how often a trial whose worker or controller died is re-run with the same
    parameters. On an SQLite file, a second controller is refused (`controller_lock`); an SQLite
    file the run created is removed if it stops (interrupted, failed) before its first trial.
    ``timeout_s``: no trial is started after this many seconds (from the call); trials still
    running then are stopped and re-queued for the next run."""
    deadline = time.monotonic() + (float("inf") if timeout_s is None else timeout_s)
    if max_retries < 0:
        raise BadInput(f"--max-retries: must be >= 0, got {max_retries}")
    try:
        check_url(storage_url)
    except ValueError as e:
        raise BadInput(str(e)) from None
    spec = load_study(study_file)
    # Ray, torch and the stages are imported once the arguments and the study file are known
    # good: bad input is told in about a second.
    import ray

    from fpstune.run.controller import Controller, ensure_ray
    from fpstune.run.pool import WorkerPool
    from fpstune.run.preflight import check_schedule_latency
    from fpstune.stages.kernel import KernelStage
    from fpstune.stages.kernel_space import kernel_buckets
    from fpstune.stages.schedule import ScheduleStage

    kinds = (KernelStage.name, ScheduleStage.name)
    if stage not in kinds:
        raise BadInput(f"--stage: {stage!r} is not one of {', '.join(kinds)}")
    # The one place the CLI's stage name becomes stage objects (a kernel stage: one per bucket).
    stages: list[Stage[Any]]
    if stage == ScheduleStage.name:
        check_calibration(spec, study_file)
        check_weights(spec, study_file)
        stages = [ScheduleStage(spec)]
        budget = trials or spec.trials.schedule
    else:
        buckets = kernel_buckets(spec.kernel_space, spec.model.head_dim)
        stages = [KernelStage(spec, b) for b in buckets]
        budget = trials or spec.trials.kernel
    check_reachable(storage_url)  # before Ray starts: a wrong password costs no Ray start
    if isinstance(stages[0], ScheduleStage):
        check_schedule_latency(spec, study_file, storage_url)  # reads the storage, writes nothing
    with controller_lock(storage_url), _new_database_removed_unless_used(storage_url) as used:
        ensure_ray(ray_address, workers)
        if isinstance(stages[0], KernelStage) and not ray.cluster_resources().get("GPU"):
            raise BadInput(
                f"{study_file}: --stage kernel measures kernel latency and needs a GPU; "
                "the Ray cluster has none"
            )
        # One pool of workers for all the stage's controllers (a kernel stage has one per
        # bucket): each worker sets up, and warms its GPU, once per run.
        pool = WorkerPool(stages[0], storage_url, workers)
        try:
            summaries = []
            for one in stages:
                if time.monotonic() >= deadline:
                    break  # --timeout: the remaining controllers do not start
                controller = Controller(
                    one,
                    storage_url=storage_url,
                    workers=workers,
                    budget=budget,
                    ray_address=ray_address,
                    max_retries=max_retries,
                    progress=progress,
                    pool=pool,
                )
                used.append(controller)
                summaries.append(controller.run(should_stop=lambda: time.monotonic() >= deadline))
            return summaries
        finally:
            pool.close()


@contextlib.contextmanager
def _new_database_removed_unless_used(storage_url: str) -> Iterator[list[Controller]]:
    """Yields a list for the run's controllers. If the SQLite file did not exist on entry (enter
    under `controller_lock`: then no other controller can be creating it) and the block raises
    (Ctrl-C, a failed start) before any of them asked for a trial, the file is removed: an
    interrupted start leaves nothing half-written. A file that was there is never touched."""
    db = sqlite_path(storage_url)
    controllers: list[Controller] = []
    if db is None or db.exists():
        yield controllers
        return
    import ray

    ray_was_up = ray.is_initialized()
    try:
        yield controllers
    except BaseException:
        if not any(c.trials_asked for c in controllers):
            if not ray_was_up and ray.is_initialized():
                ray.shutdown()  # workers still setting up may yet create the file
            remove_sqlite_file(db)
        raise


def check_calibration(spec: StudySpec, study_file: Path) -> None:
    """Read the study's calibration file as the workers will (safetensors header, tensor shapes,
    NaN/Inf, the model's shape, the cells asked for), so a bad file is bad input naming the
    study's ``calibration.source``, found before the storage or Ray is touched."""
    cal = spec.calibration
    if cal.source == SYNTHETIC:
        return
    from fpstune.quality.calibration import CalibrationError, load_calibration

    try:
        loaded = load_calibration(cal.source, model=spec.model)
        loaded.select(layers=cal.layer_indices(spec.model), steps=cal.step_indices(spec.model))
    except CalibrationError as e:
        raise BadInput(f"{study_file}: calibration.source: {e}") from None
    except KeyError as e:
        raise BadInput(f"{study_file}: calibration: {e.args[0]} ({cal.source})") from None


def check_weights(spec: StudySpec, study_file: Path) -> None:
    """Check ``end_to_end.weights`` (a safetensors file: header, dtypes, sizes, and the mini
    model's tensor names) as `check_calibration` checks the calibration file: before the
    storage or Ray is touched, so a bad file is bad input, not a worker's failure."""
    weights = spec.end_to_end.weights if spec.end_to_end is not None else None
    if weights is None or not Path(weights).is_file():
        return  # the packaged weights, or a checkpoint directory (its adapter checks it)
    field = f"{study_file}: end_to_end.weights"
    try:
        shapes = check_safetensors(weights, what="weights file", error=BadInput)
    except BadInput as e:
        raise BadInput(f"{field}: {e}") from None
    from fpstune.models import mini  # diffusers: only for a weights file

    packaged = mini.packaged_weights()
    if spec.model.adapter == "mini" and packaged.is_file():
        expected = check_safetensors(packaged, what="packaged weights", error=BadInput)
        for name, shape in expected.items():
            if shapes.get(name) != shape:
                got = "missing" if name not in shapes else f"shape {shapes[name]}"
                raise BadInput(
                    f"{field}: {weights}: tensor {name!r}: {got}, the mini model needs {shape}"
                )
