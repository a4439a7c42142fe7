"""Shared pieces of the service tests: the tiny study and a labelled synthetic latency table."""

from __future__ import annotations

from pathlib import Path

from fpstune.kernels.fingerprint import HardwareFingerprint
from fpstune.latency.measure import Timing
from fpstune.latency.shape import AttentionShape
from fpstune.latency.table import LatencyTable
from fpstune.spec.study import StudySpec
from fpstune.stages.kernel_space import bucket_points, kernel_buckets

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny.yaml"
# Latencies in these tests come from a cost model, never from a GPU; the fingerprint says so.
TEST_GPU = HardwareFingerprint(
    gpu="TEST-GPU (synthetic latencies, tests only)",
    sm_count=1,
    capability=(9, 0),
    torch="test",
    fpstune="test",
)


def fill_latency_table(url: str, spec: StudySpec) -> int:
    """One row per feasible kernel point: fp8 ~0.6x bf16, sparse ~ kept fraction."""
    table = LatencyTable.from_url(url)
    shape = AttentionShape.of_model(spec.model, batch=spec.model.batch)
    n = 0
    for bucket in kernel_buckets(spec.kernel_space, spec.model.head_dim):
        for i, point in enumerate(bucket_points(spec.kernel_space, spec.model.head_dim, bucket)):
            ms = (0.6 if point.mode.fp8 else 1.0) * (1.05 - point.sparsity) + 0.01 * i
            timing = Timing(median_ms=ms, iqr_ms=0.01 * ms, reps=20, warmup=1, method="test")
            table.record(fingerprint=TEST_GPU, shape=shape, spec=point.spec, timing=timing)
            n += 1
    table.engine.dispose()
    return n
