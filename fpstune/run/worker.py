"""The worker: one per GPU (a Ray actor with num_gpus=1), or per CPU core without a GPU.

A worker builds its stage's evaluator once and keeps it across trials, so the CUDA context,
Triton's compiled kernels, the calibration set and the cached references stay warm. It never
touches the study storage: results go back to the controller, which alone asks and tells.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch

from fpstune.kernels.fingerprint import device_identity
from fpstune.stages.base import Candidate, Stage
from fpstune.stages.evaluation import CandidateError, CandidateFailure, Evaluation, TrialResult
from fpstune.storage import retry_db


class Worker:
    def __init__(self, stage: Stage[Any], storage_url: str) -> None:
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Which card this worker measures on, stored with every result it returns.
        self._identity = device_identity(self._device)
        self._setup_error: str | None = None
        try:
            self._evaluator = stage.evaluator(self._device, storage_url)
        except Exception as e:  # reported by ready(); the controller stops before any trial
            self._setup_error = f"{type(e).__name__}: {e}"

    def ready(self) -> str | None:
        """None when the worker can evaluate, else why it cannot."""
        return self._setup_error

    def evaluate(self, candidate: Candidate) -> TrialResult:
        """Evaluate one candidate. A candidate at fault comes back as a `CandidateFailure`; the
        worker stays usable. Anything else raised is a worker fault and reaches the controller."""
        if self._setup_error is not None:
            raise RuntimeError(self._setup_error)
        try:
            # Evaluating only reads (the latency table, cached per spec); a database restart or
            # a dropped connection meanwhile is waited out and the evaluation repeated.
            ev: Evaluation = retry_db(lambda: self._evaluator.evaluate(candidate))
        except CandidateError as e:
            return CandidateFailure(str(e))
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            return CandidateFailure(f"CUDA out of memory: {str(e).splitlines()[0]}")
        # A NaN objective would make Optuna fail the trial without a reason (and a NaN
        # constraint is refused by the storage): say which value it was instead.
        for kind, named in (("objective", ev.values), ("constraint", ev.constraints)):
            bad = sorted(name for name, v in named.items() if not math.isfinite(v))
            if bad:
                return CandidateFailure(f"{kind} {bad[0]} is {named[bad[0]]} (not finite)")
        return dataclasses.replace(ev, attrs={**ev.attrs, **self._identity})

    def pid(self) -> int:
        return os.getpid()

    def device(self) -> str:
        if self._device.type == "cuda":
            return torch.cuda.get_device_name(self._device)
        return "cpu"
