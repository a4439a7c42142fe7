"""A study end to end on a real local Ray cluster: SQLite and PostgreSQL storage, resume, export."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import ray
from optuna.trial import TrialState
from service_helpers import TEST_GPU, TINY, fill_latency_table

from fpstune.export import export_policy
from fpstune.kernels.policy import Policy
from fpstune.run.controller import Controller
from fpstune.run.runner import run_study
from fpstune.stages.schedule import ScheduleStage

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="tiny:schedule", storage=url).get_trials()


def _check_bookkeeping(url: str, budget: int) -> list[optuna.trial.FrozenTrial]:
    trials = _trials(url)
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] == budget
    assert states[TrialState.RUNNING] == 0
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == len(trials)
    return [t for t in trials if t.state == TrialState.COMPLETE]


def test_sqlite_study_end_to_end(sqlite_url: str, tiny) -> None:
    fill_latency_table(sqlite_url, tiny)
    [summary] = run_study(TINY, storage_url=sqlite_url, workers=2, trials=5, progress=False)
    assert summary.complete == 5 and summary.budget == 5
    done = _check_bookkeeping(sqlite_url, 5)
    study = optuna.load_study(study_name="tiny:schedule", storage=sqlite_url)
    assert study.metric_names == ["latency_ms", "rel_l2"]
    for t in done:
        assert t.user_attrs["latency_source"] == "table"
        assert t.user_attrs["details"]["latency_fingerprint"]["gpu"] == TEST_GPU.gpu
        cells = {tuple(c) for c, _ in t.user_attrs["details"]["cell_rel_l2"]}
        assert cells == {(layer, step) for layer in range(2) for step in range(3)}
        assert set(t.constraints) >= {"rel_l2"}
        assert t.constraints["rel_l2"] == pytest.approx(t.values[1] - 0.3)
        assert t.user_attrs["constraints"] == {"rel_l2": t.constraints["rel_l2"]}
        Policy.from_dict(t.user_attrs["candidate"]["policy"])  # a valid policy per trial
    assert summary.front_size >= 1


def test_rerun_resumes_toward_the_total_budget(sqlite_url: str, tiny) -> None:
    fill_latency_table(sqlite_url, tiny)
    run_study(TINY, storage_url=sqlite_url, workers=1, trials=2, progress=False)
    first = {t.number: t.values for t in _trials(sqlite_url)}
    [summary] = run_study(TINY, storage_url=sqlite_url, workers=2, trials=4, progress=False)
    assert summary.complete == 4
    after = {t.number: t.values for t in _check_bookkeeping(sqlite_url, 4)}
    assert all(after[n] == v for n, v in first.items())  # nothing redone or lost
    # Already at the budget: a third run runs nothing.
    run_study(TINY, storage_url=sqlite_url, workers=1, trials=4, progress=False)
    assert len(_trials(sqlite_url)) == 4


def test_stopped_controller_requeues_and_the_next_run_finishes(sqlite_url: str, tiny) -> None:
    fill_latency_table(sqlite_url, tiny)
    controller = Controller(
        ScheduleStage(tiny), storage_url=sqlite_url, workers=2, budget=4, progress=False
    )
    controller.run(should_stop=lambda: True)  # stops with trials in flight (--timeout)
    trials = _trials(sqlite_url)
    # Stopped on purpose, not at fault: back in the queue as they are, nothing failed.
    assert not [t for t in trials if t.state in (TrialState.FAIL, TrialState.RUNNING)]
    stopped = {t.number: t.params for t in trials if t.state == TrialState.WAITING}
    assert stopped and all(stopped.values())
    run_study(TINY, storage_url=sqlite_url, workers=2, trials=4, progress=False)
    done = _check_bookkeeping(sqlite_url, 4)
    again = {t.number: t.params for t in done if t.number in stopped}
    assert again == stopped  # the same trials, run with the same parameters
    assert not [t for t in _trials(sqlite_url) if t.state == TrialState.FAIL]


def test_postgresql_with_8_workers_loses_nothing(pg_url: str, tiny) -> None:
    fill_latency_table(pg_url, tiny)
    [summary] = run_study(TINY, storage_url=pg_url, workers=8, trials=24, progress=False)
    assert summary.complete == 24
    done = _check_bookkeeping(pg_url, 24)
    assert all(len(t.values) == 2 and "candidate" in t.user_attrs for t in done)


def test_export_validate_load_round_trip(sqlite_url: str, tiny, tmp_path: Path) -> None:
    fill_latency_table(sqlite_url, tiny)
    run_study(TINY, storage_url=sqlite_url, workers=2, trials=4, progress=False)
    out = tmp_path / "policy.yaml"
    result = export_policy("tiny", storage_url=sqlite_url, output=out)
    policy = Policy.load(out, model=tiny.model.shape(), hardware=TEST_GPU)
    prov = policy.provenance
    assert prov is not None and prov.study == "tiny:schedule" and prov.trial == result.trial
    assert policy.hardware == TEST_GPU  # the GPU its latencies were measured on
    assert prov.remeasured["rel_l2"] == pytest.approx(result.stored["rel_l2"], rel=1e-6)
    assert prov.notes == (  # this machine, and the table's GPU it is not
        f"re-measured on cpu; latencies from table measured on {TEST_GPU.gpu} "
        "(not this machine: cpu)"
    )
    front = optuna.load_study(study_name="tiny:schedule", storage=sqlite_url).best_trials
    assert result.trial in {t.number for t in front}
    for step in range(tiny.model.steps):
        for layer in range(tiny.model.layers):
            spec = policy.spec(layer=layer, step=step)
            assert spec.mode.value == "bf16_dense" or spec.kernel is not None  # configs pinned


def test_controllers_of_one_run_share_the_pool(sqlite_url: str, tiny) -> None:
    """Controllers given one pool (a kernel stage: one per bucket) use the same worker processes
    and leave them running; closing the pool ends those processes."""
    from fpstune.run.pool import WorkerPool

    fill_latency_table(sqlite_url, tiny)
    pool = WorkerPool(ScheduleStage(tiny), sqlite_url, 2)
    try:
        pids = sorted(ray.get([a.pid.remote() for a in pool.actors]))
        for budget in (2, 4):  # a second controller of the same run resumes to 4
            Controller(
                ScheduleStage(tiny),
                storage_url=sqlite_url,
                workers=2,
                budget=budget,
                progress=False,
                pool=pool,
            ).run()
            assert sorted(ray.get([a.pid.remote() for a in pool.actors])) == pids
        _check_bookkeeping(sqlite_url, 4)
    finally:
        pool.close()
    # ray.kill is asynchronous: wait (at most 60 s) for the worker processes to be gone.
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
