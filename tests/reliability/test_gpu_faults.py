"""Failing candidates that only a GPU can produce, provoked for real: a CUDA out-of-memory error
and a Triton compile failure. Each fails its own trial with the reason, and the same worker runs
the next candidate. Run on a CUDA machine: ``python3 -m pytest -q -m gpu tests/reliability``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from reliability_helpers import CHEAP

from fpstune.kernels import AttentionSpec
from fpstune.run.worker import Worker
from fpstune.spec.study import load_study
from fpstune.stages.candidates import KernelCandidate
from fpstune.stages.evaluation import CandidateFailure, Evaluation
from fpstune.stages.kernel import KernelStage
from fpstune.stages.kernel_space import kernel_buckets

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _kernel_worker(tmp_path: Path) -> tuple[Worker, KernelCandidate]:
    """A kernel-stage worker (on this GPU) for the cheap model made Wan-like (head_dim 128, a
    2x16x32 grid), and a feasible FP8 candidate for it (tile 1x16x32, 64x64 blocks)."""
    raw = yaml.safe_load(CHEAP.read_text())
    raw["kernel_space"] = str((CHEAP.parent / raw["kernel_space"]).resolve())
    raw["schedule_space"] = str((CHEAP.parent / raw["schedule_space"]).resolve())
    raw["model"].update(head_dim=128, grid=[2, 16, 32])
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    spec = load_study(tmp_path / "study.yaml")
    stage = KernelStage(spec, kernel_buckets(spec.kernel_space)[0])
    worker = Worker(stage, f"sqlite:///{tmp_path / 's.db'}")
    assert worker.ready() is None, worker.ready()
    good = {
        "mode": "fp8_dense",
        "tile": [1, 16, 32],
        "kernel": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2},
    }
    return worker, KernelCandidate(AttentionSpec.from_dict(good))


def test_cuda_oom_fails_the_candidate_and_the_worker_recovers(tmp_path: Path) -> None:
    """A real CUDA OOM: another tenant (here: this test) takes all free GPU memory between two
    trials. The trial fails with the reason; once the memory is back, the same worker runs."""
    worker, good = _kernel_worker(tmp_path)
    assert isinstance(worker.evaluate(good), Evaluation)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # what the worker cached goes back to the driver: the hog takes it
    hog: list[torch.Tensor] = []
    chunk = 1 << 30
    while chunk >= 1 << 20:
        try:
            hog.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            chunk //= 2
    result = worker.evaluate(good)
    print("OOM:", str(result)[:300])
    del hog
    torch.cuda.empty_cache()
    assert isinstance(result, CandidateFailure), result
    assert result.reason.startswith("CUDA out of memory"), result
    again = worker.evaluate(good)
    assert isinstance(again, Evaluation), again


def test_triton_compile_error_fails_the_candidate_and_the_worker_survives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real Triton compile failure: the runtime's feasibility check (which refuses the config
    before launch) is switched off so a config the FP8 kernel cannot be built for (P·V with
    block_n=16: an FP8 dot needs K >= 32) reaches the compiler. The trial fails with the
    compiler's reason; the worker runs on."""
    import fpstune.kernels.api
    import fpstune.stages.evaluators

    worker, good = _kernel_worker(tmp_path)
    monkeypatch.setattr(fpstune.stages.evaluators, "infeasibility", lambda *a, **k: [])
    monkeypatch.setattr(fpstune.kernels.api, "check_feasible", lambda *a, **k: None)
    spec = good.spec.to_dict()
    spec["kernel"] = {"block_m": 64, "block_n": 16, "num_warps": 4, "num_stages": 2}
    result = worker.evaluate(KernelCandidate(AttentionSpec.from_dict(spec)))
    print("compile failure:", str(result)[:300])
    assert isinstance(result, CandidateFailure) and "kernel failed" in result.reason, result
    assert isinstance(worker.evaluate(good), Evaluation)
