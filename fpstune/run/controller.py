"""The controller: one process that owns a study through Optuna's ask/tell and feeds Ray workers.

Bookkeeping rules:
- the budget counts COMPLETE trials of the study, so re-running the same command resumes;
- a trial whose worker died, or that was RUNNING under a controller that died (its heartbeat went
  stale), is failed with the reason and re-queued with the same parameters, at most
  ``max_retries`` times (Optuna's `RetryFailedTrialCallback`);
- a candidate at fault (infeasible, OOM, NaN) fails its trial with the reason; it is not retried;
- an interrupted controller (Ctrl-C, SIGTERM: a KeyboardInterrupt, or SystemExit), or one stopped
  by ``should_stop`` (``--timeout``), puts the trials it was running back to WAITING as they are
  (`requeue_interrupted`): the next run's ``ask`` takes them first, with their parameters, and
  they never count as failed.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
import ray
from optuna.trial import TrialState

from fpstune.latency.table import LatencyTable
from fpstune.run.budget import claim_slot
from fpstune.run.pool import WorkerPool
from fpstune.run.progress import StudyProgress
from fpstune.run.trial_writes import (
    TrialWriter,
    constraint_system_attrs,
    counts_toward_budget,
    tell_values,
    user_attrs_of,
)
from fpstune.stages.base import Candidate, Stage
from fpstune.stages.evaluation import CandidateFailure, TrialResult
from fpstune.storage import open_storage, requeue_interrupted, retry_db
from fpstune.trial_attrs import CANDIDATE, FAIL_REASON, QUEUED_AS

log = logging.getLogger(__name__)
HEARTBEAT_S = 5


def ensure_ray(address: str | None, workers: int) -> None:
    """Join the Ray cluster at ``address``, or start a local one with a CPU slot per worker at
    least (so CPU workers never queue for a slot)."""
    if not ray.is_initialized():
        # Ray notes on every start that it enabled token auth (its default); keep stderr clean.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        # ray.init replaces the SIGTERM handler with sys.exit(15): keep the caller's (the CLI's
        # stops a run as Ctrl-C does), and give it a SIGTERM that came during the start.
        before = signal.getsignal(signal.SIGTERM)
        if not address:
            _loopback_only()
        try:
            ray.init(
                address=address,
                num_cpus=None if address else max(os.cpu_count() or 1, workers),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except SystemExit as e:
            if e.code == signal.SIGTERM and callable(before):
                before(signal.SIGTERM, None)
            raise
        finally:
            if callable(before) and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, before)


def _loopback_only() -> None:
    """Make the local cluster listen on 127.0.0.1 only (GCS, raylet, workers, driver, agents).

    Ray's servers bind to loopback exactly when the node's IP is 127.0.0.1, else to every
    interface; ``ray.init(_node_ip_address="127.0.0.1")`` does not do it (Ray swaps a loopback
    address for the machine's routable one). Ray keeps the node's IP on 127.0.0.1 when its
    multi-machine mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), which this process read
    when it imported ray: set both, the variable for the processes Ray starts."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait for the end of the block (main thread only; elsewhere a no-op), so
    an interruption never comes between a trial's ``ask`` and the controller noting it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:  # None: a handler not set from Python, left alone
            handlers[sig] = handler
            signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])  # to the handler it was meant for


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
    #: the controller's own wall time per finished trial this run: everything its loop does
    #: (suggest, attribute writes, tell, heartbeats, progress, Ray submit and get) except waiting
    #: for workers and the sampler; with workers on the same cores it includes time they take
    overhead_ms_per_trial: float = 0.0
    #: the sampler's wall time per trial: ``study.ask`` and its joint (relative) sampling
    sampler_ms_per_trial: float = 0.0
    #: the controller thread's CPU time in the same two parts (no waiting for a core or the DB)
    overhead_cpu_ms_per_trial: float = 0.0
    sampler_cpu_ms_per_trial: float = 0.0


@dataclass
class _Stopwatch:
    """Wall and controller-thread CPU time spent inside its ``with`` blocks."""

    wall: float = 0.0
    cpu: float = 0.0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.thread_time() - cpu


@dataclass
class _Pending:
    trial: optuna.Trial
    actor: Any
    candidate: Candidate


class Controller:
    def __init__(
        self,
        stage: Stage[Any],
        *,
        storage_url: str,
        workers: int = 1,
        budget: int,
        ray_address: str | None = None,
        max_retries: int = 2,
        progress: bool = True,
        pool: WorkerPool | None = None,
    ) -> None:
        """``pool``: workers shared with other controllers of the run (left running at the
        end); without one the controller starts its own and stops them when it ends."""
        self.spec = stage.spec
        self.pool = pool
        self.stage = stage
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
        #: trials this controller asked for, over all its runs
        self.trials_asked = 0
        # Asked and not yet told, by trial id: what an interruption puts back in the queue.
        self._open: dict[int, optuna.Trial] = {}
        # A trial's parameters, and its attributes, each in one transaction, not one per item.
        self.writer = TrialWriter(self.storage)
        self.latency_table = LatencyTable.from_url(storage_url) if stage.records_latency else None

    def _open_study(self) -> optuna.Study:
        study = retry_db(
            lambda: optuna.create_study(
                study_name=self.stage.study_name,
                storage=self.storage,
                directions=self.stage.directions,
                sampler=self.spec.sampler.build(),
                load_if_exists=True,
            )
        )
        study.set_metric_names(self.stage.metric_names)
        for key, value in self.stage.study_attrs().items():
            study.set_user_attr(key, value)
        for params, label in self.stage.first_trials():
            # skip_if_exists: a resumed study does not queue them twice
            _enqueue_once(study, params, {QUEUED_AS: label})
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
        # Before the study exists: a failed start writes nothing.
        own_pool = self.pool is None
        self._workers = pool = self._start_workers() if self.pool is None else self.pool
        actors = pool.actors  # the pool replaces a dead actor in this list
        self.study = self._open_study()
        optuna.storages.fail_stale_trials(self.study)
        pending: dict[ray.ObjectRef, _Pending] = {}
        # The bar is also the run's tally of COMPLETE trials (the budget counts the study's).
        bar = StudyProgress(self.study, self.budget, enabled=self.progress)
        self._streak = 0  # failures in a row
        finished = 0
        # Overhead = the loop's time less waiting for workers, the sampler and the final wait.
        loop, waiting, settling, self._sampler = (_Stopwatch() for _ in range(4))
        interrupted = stopped = False  # stopped: by ``should_stop`` (--timeout)
        try:
            with bar, loop():
                bar.sync(self._trials())
                last_beat = time.monotonic()
                while True:
                    if bar.complete >= self.budget and not pending:
                        with settling():
                            self._settle_orphans()
                        bar.sync(self._trials())
                        break
                    idle = [a for a in actors if all(p.actor is not a for p in pending.values())]
                    want = self.budget - bar.complete - len(pending)
                    for actor in idle[: max(0, want)]:
                        submitted = self._submit(actor)
                        if submitted is None:
                            break  # the budget is taken (by other controllers' trials too)
                        pending[submitted[0]] = submitted[1]
                    if not pending:
                        if not self._others_running():
                            break  # nothing left to run (budget met, or the space is exhausted)
                        # Another controller's trials hold the rest of the budget: they may yet
                        # fail (or go stale) and free a slot.
                        time.sleep(1.0)
                        optuna.storages.fail_stale_trials(self.study)
                        bar.sync(self._trials())
                        if should_stop():
                            stopped = True
                            break
                        continue
                    with waiting():
                        done, _ = ray.wait(list(pending), num_returns=1, timeout=HEARTBEAT_S)
                    for ref in done:
                        p = pending.pop(ref)
                        actor, ok = self._finish(ref, p)
                        finished += 1
                        bar.finished(complete=ok)
                    if time.monotonic() - last_beat >= HEARTBEAT_S:
                        for p in pending.values():
                            self._heartbeat(p.trial)
                        optuna.storages.fail_stale_trials(self.study)
                        # Other controllers may share the study: recount now and then.
                        bar.sync(self._trials())
                        last_beat = time.monotonic()
                    if should_stop():
                        stopped = True
                        break
                    if self._streak >= self.max_failures_in_a_row:
                        raise TooManyFailures(
                            f"{self._streak} trials failed in a row; last: {self._last_reason}"
                        )
        except (KeyboardInterrupt, SystemExit):
            interrupted = True
            raise
        finally:
            if interrupted or stopped:
                self._requeue_open()
            for p in pending.values():
                if p.trial._trial_id in self._open:
                    self._fail(p, "controller stopped before the trial finished", retry=True)
            if own_pool:
                pool.close()
        trials = self._trials()
        own_wall = loop.wall - waiting.wall - settling.wall - self._sampler.wall
        own_cpu = loop.cpu - waiting.cpu - settling.cpu - self._sampler.cpu
        ms = 1000 / max(finished, 1)
        return RunSummary(
            study_name=self.study.study_name,
            complete=sum(counts_toward_budget(t) for t in trials),
            failed=sum(t.state == TrialState.FAIL for t in trials),
            budget=self.budget,
            front_size=len(self.study.best_trials),  # feasible trials only
            elapsed_s=time.monotonic() - start,
            overhead_ms_per_trial=own_wall * ms,
            sampler_ms_per_trial=self._sampler.wall * ms,
            overhead_cpu_ms_per_trial=own_cpu * ms,
            sampler_cpu_ms_per_trial=self._sampler.cpu * ms,
        )

    # ----------------------------------------------------------------- helpers
    def _start_workers(self) -> WorkerPool:
        ensure_ray(self.ray_address, self.workers)
        return WorkerPool(self.stage, self.storage_url, self.workers)

    def _submit(self, actor: Any) -> tuple[ray.ObjectRef, _Pending] | None:
        """Ask a trial and send it to ``actor``; None if the study's budget is taken."""
        with self._sampler(), _signals_deferred():
            trial = retry_db(self._ask)
            if trial is None:
                return None
            self._open[trial._trial_id] = trial
            self.trials_asked += 1
            # Optuna runs the sampler's joint (relative) sampling lazily, inside the first
            # suggest, which follows at once anyway: run it here so it counts as the sampler's.
            _ = trial.relative_params
        # A first beat at once: a trial with no heartbeat at all is never found stale.
        self._heartbeat(trial)
        with self.writer.hold_params(trial) as params:
            candidate = self.stage.suggest(trial)
        retry_db(lambda: self.writer.write_params(trial._trial_id, params))
        # The candidate is stored with the result (``_finish``, ``_fail``), in the same write.
        ref = actor.evaluate.remote(candidate)
        return ref, _Pending(trial, actor, candidate)

    def _ask(self) -> optuna.Trial | None:
        """`Study.ask` inside a claim on the budget (`fpstune.run.budget`): however many
        controllers share the study, no more trials run or complete than the budget."""
        study_id = self.study._study_id
        with claim_slot(self.storage.engine, study_id, self.budget) as free:
            return self.study.ask() if free else None

    def _others_running(self) -> bool:
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return any(t._trial_id not in self._open for t in running)

    def _finish(self, ref: ray.ObjectRef, p: _Pending) -> tuple[Any, bool]:
        """Record one finished evaluation; returns the actor to use next (a new one if it died)
        and whether the trial completed."""
        try:
            result: TrialResult = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._fail(p, f"worker died: {_first_line(e)}", retry=True)
            return self._workers.replace(p.actor), False
        except ray.exceptions.RayTaskError as e:
            self._fail(p, f"worker error: {_first_line(e)}", retry=True)
            return p.actor, False
        if isinstance(result, CandidateFailure):
            self._fail(p, result.reason, retry=False)
            return p.actor, False
        trial = p.trial
        user: dict[str, Any] = {CANDIDATE: p.candidate.to_attr(), **user_attrs_of(result.attrs)}
        cons = self.stage.constraints(result)
        system: dict[str, Any] = {}
        if cons:
            # Three forms: per name as Trial.set_constraint writes them (Optuna's samplers), the
            # older list (optuna-dashboard), and a user attribute with the names.
            user["constraints"] = cons
            system = constraint_system_attrs(cons)
        # All attributes in one transaction: written one by one, each is a storage round trip.
        retry_db(lambda: self.writer.attrs(trial._trial_id, user=user, system=system))
        if self.latency_table is not None:
            table = self.latency_table
            retry_db(
                lambda: table.record_evaluation(
                    result.attrs, study=self.study.study_name, trial=trial.number
                )
            )
        values = [result.values[name] for name in self.stage.metric_names]
        retry_db(lambda: tell_values(self.study, trial, values))
        self._open.pop(trial._trial_id, None)
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

    def _fail(self, p: _Pending, reason: str, *, retry: bool) -> None:
        trial = p.trial
        log.info("trial %d failed: %s", trial.number, reason)
        self._streak += 1
        self._last_reason = reason
        user = {FAIL_REASON: reason, CANDIDATE: p.candidate.to_attr()}
        retry_db(lambda: self.writer.attrs(trial._trial_id, user=user))
        frozen = retry_db(lambda: self.study.tell(trial, state=TrialState.FAIL))
        self._open.pop(trial._trial_id, None)
        if retry:
            self._requeue(frozen)

    def _requeue_open(self) -> None:
        """Put the trials in flight back in the queue as they are, not failed: the controller
        was stopped, the trials are not at fault. One that cannot be (the database is gone) stays
        RUNNING, and the next run fails it as stale and re-queues it."""
        for trial_id, trial in list(self._open.items()):
            try:
                if requeue_interrupted(self.storage, trial_id):
                    log.info("trial %d interrupted, back in the queue", trial.number)
            except Exception as e:
                log.warning("trial %d left RUNNING: %s", trial.number, _first_line(e))
        self._open.clear()

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

    def _trials(self) -> list[optuna.trial.FrozenTrial]:
        return retry_db(lambda: self.study.get_trials(deepcopy=False))


def _enqueue_once(study: optuna.Study, params: dict[str, Any], attrs: dict[str, Any]) -> None:
    retry_db(lambda: study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=True))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException) -> str:
    """The first line of an error, without Ray's colour codes; for a Ray error, its cause."""
    cause = getattr(e, "cause", None) or getattr(e, "error_msg", None)
    text = _ANSI.sub("", str(cause or e)).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
