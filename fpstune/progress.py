"""A progress bar for a running study: complete trials / budget, front size, failures, ETA."""

from __future__ import annotations

import time
from types import TracebackType

import optuna
from optuna.trial import TrialState
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_REFRESH_S = 1.0


class StudyProgress:
    def __init__(self, study: optuna.Study, budget: int, *, enabled: bool = True) -> None:
        self._study = study
        self._budget = budget
        self._last = 0.0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("front {task.fields[front]}  failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self._task = self._progress.add_task(study.study_name, total=budget, front=0, failed=0)

    def __enter__(self) -> StudyProgress:
        self._progress.start()
        self.update(force=True)
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.update(force=True)
        self._progress.stop()

    def update(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < _REFRESH_S:
            return
        self._last = now
        trials = self._study.get_trials(deepcopy=False)
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        failed = sum(t.state == TrialState.FAIL for t in trials)
        front = len(self._study.best_trials) if complete else 0
        self._progress.update(
            self._task, completed=min(complete, self._budget), front=front, failed=failed
        )
