"""The worker: one per GPU (a Ray actor with num_gpus=1), or per CPU core without a GPU.

A worker builds its evaluator once and keeps it across trials, so the CUDA context, Triton's
compiled kernels, the calibration set and the cached references stay warm. It never touches the
study storage: results go back to the controller, which alone asks and tells.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from fpstune.kernels.fingerprint import device_identity
from fpstune.latency.table import stored_latency_table
from fpstune.spec.study import StudySpec
from fpstune.stages.evaluation import CandidateError, Evaluation, Evaluator
from fpstune.stages.evaluators import build_evaluator
from fpstune.storage import retry_db


class Worker:
    def __init__(self, study: dict[str, Any], stage: str, storage_url: str) -> None:
        self._spec = StudySpec.model_validate(study)
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Which card this worker measures on, stored with every result it returns.
        self._identity = device_identity(self._device)
        self._setup_error: str | None = None
        try:
            self._evaluator = self._build(stage, storage_url)
        except Exception as e:  # reported by ready(); the controller stops before any trial
            self._setup_error = f"{type(e).__name__}: {e}"

    def _build(self, stage: str, storage_url: str) -> Evaluator:
        # Latencies measured by this study's kernel stage, if any; else the evaluator measures
        # (GPU) or uses the table shipped with fpstune (CPU), and labels which.
        table = stored_latency_table(storage_url) if stage == "schedule" else None
        return build_evaluator(self._spec, stage=stage, device=self._device, latency_table=table)

    def ready(self) -> str | None:
        """None when the worker can evaluate, else why it cannot."""
        return self._setup_error

    def evaluate(self, candidate: dict[str, Any]) -> dict[str, Any]:
        """Evaluate one candidate. A candidate at fault comes back as ``{"error": reason}``; the
        worker stays usable. Anything else raised is a worker fault and reaches the controller."""
        if self._setup_error is not None:
            raise RuntimeError(self._setup_error)
        try:
            # Evaluating only reads (the latency table, cached per spec); a database restart or
            # a dropped connection meanwhile is waited out and the evaluation repeated.
            ev: Evaluation = retry_db(lambda: self._evaluator.evaluate(candidate))
        except CandidateError as e:
            return {"error": str(e)}
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            return {"error": f"CUDA out of memory: {str(e).splitlines()[0]}"}
        # A NaN objective would make Optuna fail the trial without a reason (and a NaN
        # constraint is refused by the storage): say which value it was instead.
        for kind, named in (("objective", ev.values), ("constraint", ev.constraints)):
            bad = sorted(name for name, v in named.items() if not math.isfinite(v))
            if bad:
                return {"error": f"{kind} {bad[0]} is {named[bad[0]]} (not finite)"}
        attrs = {**ev.attrs, **self._identity}
        return {"values": ev.values, "constraints": ev.constraints, "attrs": attrs}

    def pid(self) -> int:
        return os.getpid()

    def device(self) -> str:
        if self._device.type == "cuda":
            return torch.cuda.get_device_name(self._device)
        return "cpu"
