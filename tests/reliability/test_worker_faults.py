"""Faults on the worker side: a worker killed again and again (retries are bounded and
configurable), candidates that fail (a policy for another model, NaN output) fail their own
trial with the reason and leave the worker usable; a stored candidate with an illegal config is
refused in one line. CUDA OOM and Triton compile errors: test_gpu_faults.py.

Worker death and controller death themselves (kill -9 mid-trial, kill -9 of the controller and
re-run) are tested in tests/service/test_faults.py.
"""

from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray
import torch
import yaml
from optuna.trial import TrialState
from reliability_helpers import (
    CHEAP,
    TINY,
    books,
    check_nothing_lost,
    evaluating_workers,
    fill_latency_table,
    start_fpstune,
)

from fpstune.quality.calibration import save_calibration, synthetic_calibration, tensor_name
from fpstune.run.controller import Controller
from fpstune.run.pool import WorkerPool
from fpstune.run.worker import Worker
from fpstune.spec.study import StudySpec, load_study
from fpstune.stages.candidates import ScheduleCandidate
from fpstune.stages.evaluation import CandidateError, CandidateFailure, Evaluation
from fpstune.stages.schedule import ScheduleStage

ILLEGAL = {  # block_m must be a power of two: the runtime refuses this before any launch
    "mode": "fp8_dense",
    "tile": [1, 4, 8],
    "kernel": {"block_m": 48, "block_n": 32, "num_warps": 4, "num_stages": 2},
}
ALIEN = {"mode": "bf16_dense", "layers": 3}  # a policy for a model of 3 layers (tiny has 2)


# -- bounded, configurable retries ---------------------------------------------------------------


def test_retries_are_bounded_by_max_retries(tmp_path: Path) -> None:
    """One worker, --max-retries 1: the first trial's worker is killed, its re-run's worker too;
    the parameters are then not tried a third time, and the study still reaches its budget."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    fill_latency_table(url, load_study(CHEAP))
    run = start_fpstune(
        "study", "run", str(CHEAP), "--storage", url, "--workers", "1", "--trials", "3",
        "--max-retries", "1", "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    killed: list[int] = []
    deadline = time.monotonic() + 240
    while len(killed) < 2 and time.monotonic() < deadline and run.poll() is None:
        for pid in evaluating_workers(run.pid):
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.005)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert len(killed) == 2, "the worker was not caught inside evaluate twice"

    b = books(url, "cheap:schedule")
    check_nothing_lost(b, budget=3)
    died = sorted(b.failed, key=lambda t: t.number)
    assert len(died) == 2 and all("worker died" in t.user_attrs["fail_reason"] for t in died)
    first, rerun = died
    assert rerun.system_attrs["failed_trial"] == first.number  # the re-run of the first
    assert rerun.params == first.params
    # Bounded: nothing else re-runs those parameters (retry history [first, rerun] > 1).
    assert [t.number for t in b.trials if t.system_attrs.get("failed_trial") is not None] == [
        rerun.number
    ]
    assert b.states[TrialState.WAITING] == 0


# -- failing candidates on the CPU ----------------------------------------------------------------


def overflow_calibration(spec: StudySpec, path: Path) -> None:
    """A calibration set for ``spec``'s model, finite everywhere, on which FP8 attention of cell
    (layer 0, step 0) produces NaN and BF16 does not: one query and one key row of ~2.25e18,
    whose q·k sits just under float32's maximum in BF16, while FP8 rounding (403.2 -> 416 on the
    e4m3 grid, +3 % on each side) pushes it past it; inf - inf in the softmax gives NaN."""
    cal = synthetic_calibration(spec.model, seed=0)
    a = 2.25e18
    row = torch.full((spec.model.head_dim,), a)
    row[0] = a * 448 / 403.2  # the tile's amax: puts a at 403.2 on the FP8 scale
    for which, token in (("q", 5), ("k", 9)):
        name = tensor_name(which, 0, 0)
        t = cal.tensors[name].float()
        t[0, 0, token] = row
        cal.tensors[name] = t.bfloat16()
    save_calibration(cal, path)


@pytest.fixture
def overflow_study(tmp_path: Path) -> tuple[StudySpec, str]:
    """The tiny study on the overflow calibration set, and an SQLite storage with its table."""
    raw = yaml.safe_load(TINY.read_text())
    raw["kernel_space"] = str(TINY.parent / raw["kernel_space"])
    raw["schedule_space"] = str(TINY.parent / raw["schedule_space"])
    raw["calibration"] = {"source": "overflow.safetensors", "seed": 0}
    overflow_calibration(load_study(TINY), tmp_path / "overflow.safetensors")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    spec = load_study(tmp_path / "study.yaml")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    fill_latency_table(url, spec)
    return spec, url


def _policy(candidate: ScheduleCandidate, default: dict[str, Any]) -> dict[str, Any]:
    """The candidate's stored form running ``default`` everywhere (a hand-made variant:
    unsigned); a ``layers`` key in ``default`` sets the policy's model's."""
    stored = copy.deepcopy(candidate.to_attr())
    policy, default = stored["policy"], dict(default)
    policy.pop("checksum", None)
    policy["model"]["layers"] = default.pop("layers", policy["model"]["layers"])
    policy["default"], policy["entries"] = default, []
    return stored


class FaultyStage(ScheduleStage):
    """The study's own candidates, every one rewritten by ``plan`` (cycled by trial number):
    ``good`` runs BF16 everywhere, ``alien`` is a policy for a model of another shape, ``nan``
    FP8 everywhere (NaN on the overflow calibration set). The faults are real: the worker's
    evaluator meets them as it would meet a bad suggestion."""

    def __init__(self, spec: StudySpec, plan: list[str]) -> None:
        super().__init__(spec)
        self.plan = plan

    def suggest(self, trial: optuna.Trial) -> ScheduleCandidate:
        kind = self.plan[trial.number % len(self.plan)]
        trial.set_user_attr("planned", kind)
        default = {"good": {"mode": "bf16_dense"}, "alien": ALIEN, "nan": {"mode": "fp8_dense"}}
        return ScheduleCandidate.from_attr(_policy(super().suggest(trial), default[kind]))


@pytest.mark.usefixtures("local_ray")
def test_failing_candidates_fail_their_trial_with_the_reason(
    overflow_study: tuple[StudySpec, str],
) -> None:
    spec, url = overflow_study
    stage = FaultyStage(spec, ["good", "alien", "nan"])
    pool = WorkerPool(ScheduleStage(spec), url, 2)  # the workers need not import this module
    try:
        controller = Controller(
            stage, storage_url=url, workers=2, budget=4, progress=False, pool=pool
        )
        summary = controller.run()
    finally:
        pool.close()
    assert summary.complete == 4

    b = books(url, stage.study_name)
    check_nothing_lost(b, budget=4)
    reasons = {t.user_attrs["planned"]: t.user_attrs["fail_reason"] for t in b.failed}
    assert {t.user_attrs["planned"] for t in b.failed} == {"alien", "nan"}
    assert "policy model.layers is 3, this evaluator's model has 2" in reasons["alien"]
    assert "layer 0, step 0 (fp8_dense): attention output holds NaN" in reasons["nan"]
    assert all(t.user_attrs["planned"] == "good" for t in b.complete)
    # A candidate at fault is not re-run, and no worker died (none was replaced).
    assert not any("failed_trial" in t.system_attrs for t in b.trials)
    assert not any("worker" in t.user_attrs["fail_reason"] for t in b.failed)


@pytest.mark.usefixtures("local_ray")
def test_worker_survives_illegal_config_and_nan_output(
    overflow_study: tuple[StudySpec, str],
) -> None:
    spec, url = overflow_study
    actor = ray.remote(Worker).options(num_cpus=1).remote(ScheduleStage(spec), url)
    try:
        assert ray.get(actor.ready.remote()) is None
        pid = ray.get(actor.pid.remote())
        trial = optuna.create_study(directions=["minimize", "minimize"]).ask()
        candidate = ScheduleStage(spec).suggest(trial)
        with pytest.raises(CandidateError, match="block_m=48 is not a power of two"):
            ScheduleCandidate.from_attr(_policy(candidate, ILLEGAL))  # a stored candidate
        results = [
            ray.get(actor.evaluate.remote(ScheduleCandidate.from_attr(_policy(candidate, d))))
            for d in (ALIEN, {"mode": "fp8_dense"}, {"mode": "bf16_dense"})
        ]
        assert results[0] == CandidateFailure(
            "policy model.layers is 3, this evaluator's model has 2"
        )
        assert isinstance(results[1], CandidateFailure)
        assert "attention output holds NaN" in results[1].reason
        assert isinstance(results[2], Evaluation)
        assert results[2].values["rel_l2"] == 0.0  # BF16 against the BF16 reference
        assert ray.get(actor.pid.remote()) == pid  # the same process throughout
    finally:
        ray.kill(actor, no_restart=True)


def test_a_non_finite_objective_is_a_failed_candidate_not_a_silent_fail(
    overflow_study: tuple[StudySpec, str],
) -> None:
    """Optuna turns a NaN objective into a FAIL with no reason (and refuses a NaN constraint):
    the worker names the value instead. The probe here stands for any quality probe (end-to-end
    PSNR/SSIM) that returns a NaN; the worker's own code path is what is tested."""
    spec, url = overflow_study
    worker = Worker(ScheduleStage(spec), url)

    class NaNProbe:
        def evaluate(self, candidate: Any) -> Evaluation:
            return Evaluation(values={"latency_ms": 1.0, "rel_l2": float("nan")})

    worker._evaluator = NaNProbe()
    assert worker.evaluate(None) == CandidateFailure("objective rel_l2 is nan (not finite)")
