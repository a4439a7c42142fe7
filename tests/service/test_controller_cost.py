"""What a trial costs the controller in storage transactions (each ~3 ms of its time on
PostgreSQL): a guard against orchestration creeping back to one write per item."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from service_helpers import fill_latency_table

import fpstune.run.controller
from fpstune.run.controller import Controller
from fpstune.stages.schedule import ScheduleStage

pytestmark = pytest.mark.usefixtures("ray_cluster")

# Per trial, Optuna 5 with TPE: ask (3: waiting trials, create, read), the sampler's reads and
# its constant-liar note (~3), a heartbeat, the parameters (1), the attributes (1), tell (2); and
# the run's own start and end over only 8 trials. With one transaction per parameter and per
# attribute (before batching) this run took 25.8.
MAX_COMMITS_PER_TRIAL = 13


def test_a_trial_costs_a_bounded_number_of_transactions(
    sqlite_url: str, tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Periodic heartbeats and recounts are per second, not per trial: none in this short run.
    monkeypatch.setattr(fpstune.run.controller, "HEARTBEAT_S", 3600)
    fill_latency_table(sqlite_url, tiny)
    budget = 8
    controller = Controller(
        ScheduleStage(tiny), storage_url=sqlite_url, workers=2, budget=budget, progress=False
    )
    commits = [0]
    sa.event.listen(
        controller.storage.engine, "commit", lambda c: commits.__setitem__(0, commits[0] + 1)
    )
    summary = controller.run()
    assert summary.complete == budget and summary.failed == 0
    per_trial = commits[0] / budget
    assert per_trial <= MAX_COMMITS_PER_TRIAL, f"{per_trial:.1f} transactions per trial"
