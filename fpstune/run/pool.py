"""The workers of a run: Ray actors, one per GPU (or per CPU slot), started once per run.

A kernel stage runs one controller per bucket; they share one pool, so each worker's set-up
(CUDA context, the GPU warm-up, Triton's compiled kernels) is paid once per run, not per bucket.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from fpstune.run.worker import Worker
from fpstune.stages.base import Stage

log = logging.getLogger(__name__)


class WorkerStartError(RuntimeError):
    """Workers failed in their set-up (no GPU, no latency table, ...): nothing was run."""


class WorkerPool:
    """``workers`` actors with one GPU each when the Ray cluster has GPUs, else one CPU each.
    Each builds ``stage``'s evaluator, which serves every stage object of the same kind (a
    kernel stage's buckets). A dead actor is replaced by ``replace``; ``close`` kills them all."""

    def __init__(self, stage: Stage[Any], storage_url: str, workers: int) -> None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        opts: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        if gpus and workers > gpus:
            log.warning("%d workers asked for but the cluster has %d GPUs", workers, gpus)
        self._cls = ray.remote(Worker).options(**opts, max_restarts=0)
        self._args = (stage, storage_url)
        self.actors: list[Any] = [self._cls.remote(*self._args) for _ in range(workers)]
        # A worker that cannot set up (no GPU, no latency table) stops the run before any trial.
        errors = {e for e in ray.get([a.ready.remote() for a in self.actors]) if e}
        if errors:
            self.close()
            raise WorkerStartError("workers could not start: " + "; ".join(sorted(errors)))

    def replace(self, dead: Any) -> Any:
        """A worker like the others (same resources and arguments) in place of a dead one."""
        new = self._cls.remote(*self._args)
        self.actors[self.actors.index(dead)] = new
        return new

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
