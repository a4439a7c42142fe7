"""The progress bar reads the study only now and then, never once per trial."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

import fpstune.run.progress
from fpstune.run.progress import StudyProgress


class _Study:
    """Counts reads of the front."""

    study_name = "s"

    def __init__(self) -> None:
        self.reads = 0

    @property
    def best_trials(self) -> list[Any]:
        self.reads += 1
        return [object(), object()]


def _trial(state: TrialState) -> optuna.trial.FrozenTrial:
    values = [1.0, 2.0] if state == TrialState.COMPLETE else None
    return optuna.trial.create_trial(state=state, values=values)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(fpstune.run.progress.time, "monotonic", lambda: now[0])
    return now


def test_front_is_read_at_most_every_two_seconds(clock: list[float]) -> None:
    study = _Study()
    bar = StudyProgress(study, budget=10, enabled=True)  # type: ignore[arg-type]
    for _ in range(5):
        bar.finished(complete=True)
    assert (study.reads, bar.complete, bar.front) == (1, 5, 2)
    clock[0] += 2.0
    bar.finished(complete=False)  # catches up with the 4 completions since the last read
    assert (study.reads, bar.failed) == (2, 1)
    bar.finished(complete=False)
    bar.finished(complete=True)
    assert study.reads == 2  # within 2 s of the last read
    clock[0] += 2.0
    bar.finished(complete=False)
    assert study.reads == 3
    bar.finished(complete=False)
    clock[0] += 5.0
    bar.finished(complete=False)  # nothing completed since the last read: none
    assert study.reads == 3
    bar.sync([_trial(TrialState.COMPLETE), _trial(TrialState.FAIL), _trial(TrialState.RUNNING)])
    assert (study.reads, bar.complete, bar.failed) == (4, 1, 1)  # a sync reads it at once


def test_a_hidden_bar_never_reads_the_study(clock: list[float]) -> None:
    study = _Study()
    bar = StudyProgress(study, budget=10, enabled=False)  # type: ignore[arg-type]
    for ok in (True, False, True):
        bar.finished(complete=ok)
    bar.sync([_trial(TrialState.COMPLETE)])
    assert study.reads == 0 and (bar.complete, bar.failed) == (1, 0)
