"""The controller: one process that owns a study through Optuna's ask/tell and feeds Ray workers.

Bookkeeping rules:
- the budget counts COMPLETE trials of the study, so re-running the same command resumes;
- a trial whose worker died, or that was RUNNING under a controller that died (its heartbeat went
  stale), is failed with the reason and re-queued with the same parameters, at most
  ``max_retries`` times (Optuna's `RetryFailedTrialCallback`);
- a candidate at fault (infeasible, OOM, NaN) fails its trial with the reason; it is not retried.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import ray
from optuna.trial import TrialState

from .candidates import CandidateSource
from .latency.table import LatencyTable
from .progress import StudyProgress
from .spec.study import StudySpec
from .storage import open_storage, retry_db
from .worker import Worker

log = logging.getLogger(__name__)
HEARTBEAT_S = 5
# The optuna-dashboard reads constraints only from this older system attribute (a list).
_DASHBOARD_CONSTRAINTS_KEY = "constraints"


def ensure_ray(address: str | None, workers: int) -> None:
    """Join the Ray cluster at ``address``, or start a local one with a CPU slot per worker at
    least (so CPU workers never queue for a slot)."""
    if not ray.is_initialized():
        # Ray notes on every start that it enabled token auth (its default); keep stderr clean.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        ray.init(
            address=address,
            num_cpus=None if address else max(os.cpu_count() or 1, workers),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )


class WorkerStartError(RuntimeError):
    """Workers failed in their set-up (no GPU, no latency table, ...): nothing was run."""


class TooManyFailures(RuntimeError):
    """Trials keep failing back to back: something is wrong beyond one candidate."""


@dataclass(frozen=True)
class RunSummary:
    study_name: str
    complete: int
    failed: int
    budget: int
    front_size: int
    elapsed_s: float
    #: the controller's own time per trial this run (suggest, submit, tell, storage writes),
    #: not counting the wait for workers, nor the sampler (``sampler_ms_per_trial``: study.ask)
    overhead_ms_per_trial: float = 0.0
    sampler_ms_per_trial: float = 0.0


@dataclass
class _Pending:
    trial: optuna.Trial
    actor: Any
    candidate: dict[str, Any]


class Controller:
    def __init__(
        self,
        spec: StudySpec,
        source: CandidateSource,
        *,
        storage_url: str,
        workers: int = 1,
        budget: int,
        ray_address: str | None = None,
        max_retries: int = 2,
        progress: bool = True,
    ) -> None:
        self.spec = spec
        self.source = source
        self.budget = budget
        self.workers = workers
        self.ray_address = ray_address
        self.progress = progress
        self.max_failures_in_a_row = max(10, 3 * workers)
        self._streak = 0
        self._last_reason = ""
        self.max_retries = max_retries
        self.storage_url = storage_url
        self.storage = open_storage(storage_url, heartbeat_s=HEARTBEAT_S, max_retry=max_retries)
        self.latency_table = (
            LatencyTable.from_url(storage_url) if source.stage == "kernel" else None
        )

    def _open_study(self) -> optuna.Study:
        study = retry_db(
            lambda: optuna.create_study(
                study_name=self.source.study_name,
                storage=self.storage,
                directions=self.source.directions,
                sampler=self.spec.sampler.build(),
                load_if_exists=True,
            )
        )
        study.set_metric_names(self.source.metric_names)
        for key, value in self.source.study_attrs().items():
            study.set_user_attr(key, value)
        return study

    # ------------------------------------------------------------------ public
    def run(self, *, should_stop: Callable[[], bool] = lambda: False) -> RunSummary:
        with warnings.catch_warnings():
            # ask/tell with heartbeats is what we want; Optuna warns it expects optimize().
            warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            return self._run(should_stop)

    def _run(self, should_stop: Callable[[], bool]) -> RunSummary:
        start = time.monotonic()
        actors = self._start_workers()  # before the study exists: a failed start writes nothing
        self.study = self._open_study()
        optuna.storages.fail_stale_trials(self.study)
        pending: dict[ray.ObjectRef, _Pending] = {}
        bar = StudyProgress(self.study, self.budget, enabled=self.progress)
        last_beat = 0.0
        self._streak = 0  # failures in a row
        busy, finished = 0.0, 0
        self._sampler_s = 0.0
        try:
            with bar:
                complete = self._count(TrialState.COMPLETE)
                while True:
                    if complete >= self.budget and not pending:
                        self._settle_orphans()
                        break
                    idle = [a for a in actors if all(p.actor is not a for p in pending.values())]
                    want = self.budget - complete - len(pending)
                    t0 = time.perf_counter()
                    for actor in idle[: max(0, want)]:
                        ref, p = self._submit(actor)
                        pending[ref] = p
                    busy += time.perf_counter() - t0
                    if not pending:
                        break  # nothing left to run (the space is exhausted)
                    done, _ = ray.wait(list(pending), num_returns=1, timeout=HEARTBEAT_S)
                    t0 = time.perf_counter()
                    for ref in done:
                        p = pending.pop(ref)
                        actor, ok = self._finish(ref, p)
                        finished += 1
                        complete += ok
                        if actor is not p.actor:
                            actors[actors.index(p.actor)] = actor
                    busy += time.perf_counter() - t0
                    if time.monotonic() - last_beat >= HEARTBEAT_S:
                        for p in pending.values():
                            self._heartbeat(p.trial)
                        optuna.storages.fail_stale_trials(self.study)
                        # Other controllers may share the study: recount now and then.
                        complete = self._count(TrialState.COMPLETE)
                        last_beat = time.monotonic()
                    bar.update()
                    if should_stop():
                        break
                    if self._streak >= self.max_failures_in_a_row:
                        raise TooManyFailures(
                            f"{self._streak} trials failed in a row; last: {self._last_reason}"
                        )
        finally:
            for p in pending.values():
                self._fail(p.trial, "controller stopped before the trial finished", retry=True)
            for a in actors:
                ray.kill(a, no_restart=True)
        return RunSummary(
            study_name=self.study.study_name,
            complete=self._count(TrialState.COMPLETE),
            failed=self._count(TrialState.FAIL),
            budget=self.budget,
            front_size=len(self.study.best_trials),  # feasible trials only
            elapsed_s=time.monotonic() - start,
            overhead_ms_per_trial=1000 * (busy - self._sampler_s) / max(finished, 1),
            sampler_ms_per_trial=1000 * self._sampler_s / max(finished, 1),
        )

    # ----------------------------------------------------------------- helpers
    def _start_workers(self) -> list[Any]:
        ensure_ray(self.ray_address, self.workers)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        opts: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        if gpus and self.workers > gpus:
            log.warning("%d workers asked for but the cluster has %d GPUs", self.workers, gpus)
        self._worker_cls = ray.remote(Worker).options(**opts, max_restarts=0)
        self._worker_args = (self.spec.model_dump(mode="json"), self.source.stage, self.storage_url)
        actors = [self._new_worker() for _ in range(self.workers)]
        # A worker that cannot set up (no GPU, no latency table) stops the run before any trial.
        errors = {e for e in ray.get([a.ready.remote() for a in actors]) if e}
        if errors:
            for a in actors:
                ray.kill(a, no_restart=True)
            raise WorkerStartError("workers could not start: " + "; ".join(sorted(errors)))
        return actors

    def _new_worker(self) -> Any:
        """A worker like the others (same resources and arguments), e.g. to replace a dead one."""
        return self._worker_cls.remote(*self._worker_args)

    def _submit(self, actor: Any) -> tuple[ray.ObjectRef, _Pending]:
        t0 = time.perf_counter()
        trial = retry_db(self.study.ask)
        self._sampler_s += time.perf_counter() - t0
        # A first beat at once: a trial with no heartbeat at all is never found stale.
        self._heartbeat(trial)
        candidate = self.source.suggest(trial)
        trial.set_user_attr("candidate", candidate)
        ref = actor.evaluate.remote(candidate)
        return ref, _Pending(trial, actor, candidate)

    def _finish(self, ref: ray.ObjectRef, p: _Pending) -> tuple[Any, bool]:
        """Record one finished evaluation; returns the actor to use next (a new one if it died)
        and whether the trial completed."""
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._fail(p.trial, f"worker died: {_first_line(e)}", retry=True)
            return self._new_worker(), False
        except ray.exceptions.RayTaskError as e:
            self._fail(p.trial, f"worker error: {_first_line(e)}", retry=True)
            return p.actor, False
        if "error" in result:
            self._fail(p.trial, result["error"], retry=False)
            return p.actor, False
        trial = p.trial
        # Scalars as their own attributes; lists and mappings bundled into one ``details``
        # attribute: each attribute is a storage round trip.
        attrs = result["attrs"]
        for key, value in attrs.items():
            if not isinstance(value, dict | list):
                trial.set_user_attr(key, value)
        details = {k: v for k, v in attrs.items() if isinstance(v, dict | list)}
        if details:
            trial.set_user_attr("details", details)
        metrics = {**_numbers(result["attrs"]), **result["values"]}
        # Constraints bound quality, which only the schedule stage measures.
        cons: dict[str, float] = {}
        if self.source.stage == "schedule":
            cons = result["constraints"] or self.spec.constraint_values(metrics)
        if cons:
            for name, value in cons.items():
                trial.set_constraint(name, value)
            trial.set_user_attr("constraints", cons)
            self.storage.set_trial_system_attr(
                trial._trial_id, _DASHBOARD_CONSTRAINTS_KEY, list(cons.values())
            )
        if self.latency_table is not None:
            table = self.latency_table
            retry_db(
                lambda: table.record_evaluation(
                    result["attrs"], study=self.study.study_name, trial=trial.number
                )
            )
        values = [result["values"][name] for name in self.source.metric_names]
        retry_db(lambda: self.study.tell(trial, values))
        self._streak = 0
        return p.actor, True

    def _settle_orphans(self) -> None:
        """Trials left RUNNING by a controller that died stop sending heartbeats; wait (at most
        one grace period) until they are stale, so they end FAIL and re-queued, not RUNNING.
        Trials of another live controller keep beating and are left alone."""
        grace = self.storage.grace_period or 0
        deadline = time.monotonic() + grace + HEARTBEAT_S
        while time.monotonic() < deadline:
            optuna.storages.fail_stale_trials(self.study)
            if not self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                return
            time.sleep(1.0)

    def _heartbeat(self, trial: optuna.Trial) -> None:
        retry_db(lambda: self.storage.record_heartbeat(trial._trial_id))

    def _fail(self, trial: optuna.Trial, reason: str, *, retry: bool) -> None:
        log.info("trial %d failed: %s", trial.number, reason)
        self._streak += 1
        self._last_reason = reason
        trial.set_user_attr("fail_reason", reason)
        frozen = retry_db(lambda: self.study.tell(trial, state=TrialState.FAIL))
        if retry:
            self._requeue(frozen)

    def _requeue(self, failed: optuna.trial.FrozenTrial) -> None:
        """Queue the failed trial's parameters again, with Optuna's retry bookkeeping
        (``failed_trial``, ``retry_history``: what RetryHeartbeatStaleTrialCallback reads)."""
        history = [*failed.system_attrs.get("retry_history", []), failed.number]
        if len(history) > self.max_retries:
            log.warning("trial %d: not retried again (%d retries)", failed.number, self.max_retries)
            return
        retry_db(
            lambda: self.study.add_trial(
                optuna.create_trial(
                    state=TrialState.WAITING,
                    params=failed.params,
                    distributions=failed.distributions,
                    system_attrs={
                        "failed_trial": failed.system_attrs.get("failed_trial", failed.number),
                        "retry_history": history,
                    },
                )
            )
        )

    def _count(self, state: TrialState) -> int:
        return len(retry_db(lambda: self.study.get_trials(deepcopy=False, states=(state,))))


def _numbers(attrs: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in attrs.items() if isinstance(v, int | float)}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException) -> str:
    """The first line of an error, without Ray's colour codes; for a Ray error, its cause."""
    cause = getattr(e, "cause", None) or getattr(e, "error_msg", None)
    text = _ANSI.sub("", str(cause or e)).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
