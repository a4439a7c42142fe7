"""The trial budget is the storage's promise (issue 24, item 3): two controllers on one study,
run at once as a user runs them, end with exactly the budget of COMPLETE trials, over repeated
runs — on one PostgreSQL study (the budget claim, `fpstune.run.budget`), and on one SQLite file
reached through a symlink (the one-controller lock resolves the real path)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from reliability_helpers import CHEAP, ROOT
from service_helpers import fill_latency_table

from fpstune.run.trial_writes import counts_toward_budget
from fpstune.spec.study import load_study

pytestmark = pytest.mark.slow

SERVICE = ROOT / "tests" / "service" / "data"
BUDGET = 8
REPEATS = 3


def _study(tmp: Path, name: str) -> Path:
    study = yaml.safe_load(CHEAP.read_text())
    study["name"] = name
    study["kernel_space"] = str(SERVICE / "kernel-tiny.yaml")
    study["schedule_space"] = str(SERVICE / "schedule-tiny.yaml")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _both(study: Path, urls: list[str], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Two controllers at once; on this module's Ray cluster (one Ray start, not two per run:
    the test stays within a minute on two cores)."""
    import ray

    address = ray.get_runtime_context().gcs_address
    args = ["--trials", str(BUDGET), "--workers", "1", "--no-progress", "--ray-address", address]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fpstune", "study", "run", str(study), "--storage", url, *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        for url in urls
    ]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _complete(url: str, name: str) -> tuple[int, Counter[TrialState]]:
    trials = optuna.load_study(study_name=f"{name}:schedule", storage=url).get_trials()
    return sum(counts_toward_budget(t) for t in trials), Counter(t.state for t in trials)


def test_two_controllers_on_one_postgres_study_meet_the_budget(
    pg_url: str, tmp_path: Path, local_ray: None
) -> None:
    fill_latency_table(pg_url, load_study(CHEAP))
    # The schema first: two controllers creating it on an empty database at once race in
    # Optuna's create_all ("type studydirection already exists"), another issue.
    optuna.storages.RDBStorage(pg_url).engine.dispose()
    for i in range(REPEATS):
        name = f"budget{i}"
        runs = _both(_study(tmp_path, name), [pg_url, pg_url], tmp_path)
        for r in runs:
            assert r.returncode == 0, r.stderr
        complete, states = _complete(pg_url, name)
        print(f"postgres run {i}: {complete}/{BUDGET} complete, {dict(states)}")
        assert complete == BUDGET, states
        assert states[TrialState.RUNNING] == 0


def test_two_controllers_on_one_sqlite_file_through_a_symlink(
    tmp_path: Path, local_ray: None
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for i in range(REPEATS):
        name = f"budget{i}"
        db = f"store{i}.db"
        urls = [f"sqlite:///{tmp_path / 'real' / db}", f"sqlite:///{tmp_path / 'link' / db}"]
        fill_latency_table(urls[0], load_study(CHEAP))
        runs = _both(_study(tmp_path, name), urls, tmp_path)
        for r in runs:  # the second is refused while the first runs, or finds the budget met
            assert r.returncode == 0 or "controller" in r.stderr, r.stderr
        complete, states = _complete(urls[0], name)
        print(f"sqlite run {i}: {complete}/{BUDGET} complete, {dict(states)}")
        assert complete == BUDGET, states
