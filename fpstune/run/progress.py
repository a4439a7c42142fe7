"""A progress bar for a running study: complete trials / budget, front size, failures, ETA.

The bar costs the controller no storage round trip per trial: the controller counts each trial it
finishes (``finished``); ``sync`` (every heartbeat, a few seconds apart, and at the end) takes the
counts from the study, which other controllers may share; the front is read from the study at
most every ``_FRONT_EVERY_S`` seconds, and only while the bar is shown.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fpstune.run.trial_writes import counts_toward_budget

# Redraws run on rich's thread and hold the GIL the controller needs; twice a second is plenty.
_REFRESH_PER_S = 2
# Reading the front costs two storage reads (~10 ms); once a second cost ~8 ms per trial on 2 cores.
_FRONT_EVERY_S = 2.0


class StudyProgress:
    def __init__(self, study: optuna.Study, budget: int, *, enabled: bool = True) -> None:
        self._study = study
        self._budget = budget
        self.enabled = enabled
        self.complete = 0
        self.failed = 0
        self.front = 0
        self._front_at = 0.0
        self._front_stale = False
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("front {task.fields[front]}  failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not enabled,
            refresh_per_second=_REFRESH_PER_S,
        )
        self._task = self._progress.add_task(study.study_name, total=budget, front=0, failed=0)

    def __enter__(self) -> StudyProgress:
        self._progress.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def finished(self, *, complete: bool) -> None:
        """One trial finished here, COMPLETE or FAIL: counted, no storage access but the front's
        (at most every ``_FRONT_EVERY_S``)."""
        if complete:
            self.complete += 1
            self._front_stale = True
        else:
            self.failed += 1
        self._show()

    def sync(self, trials: Sequence[FrozenTrial]) -> None:
        """Take the counts from ``trials`` (all the study's trials, just read), and the front
        size (feasible trials only) from the study."""
        self.complete = sum(counts_toward_budget(t) for t in trials)
        self.failed = sum(t.state == TrialState.FAIL for t in trials)
        self._front_stale, self._front_at = True, 0.0
        self._show()

    def _show(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._front_stale and now - self._front_at >= _FRONT_EVERY_S:
            self.front = len(self._study.best_trials) if self.complete else 0
            self._front_stale, self._front_at = False, now
        self._progress.update(
            self._task,
            completed=min(self.complete, self._budget),
            front=self.front,
            failed=self.failed,
        )
