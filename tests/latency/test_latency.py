"""Latency: measure() statistics, the shipped JSON form, and policy composition. The latency table's
storage contract (SQLite and PostgreSQL) is tests/storage/test_latency_contract.py."""

from __future__ import annotations

import datetime as dt
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shared_helpers import A100, H100, H100_NEWER_TORCH

from fpstune.kernels import AttentionSpec, KernelConfig, Mode
from fpstune.kernels.fingerprint import HardwareFingerprint
from fpstune.kernels.policy import ModelShape, Policy, PolicyEntry, Provenance
from fpstune.latency import (
    AttentionShape,
    LatencyTable,
    MeasuredLatency,
    NoLatencyRow,
    Timing,
    compose,
    compose_with,
    gpu_slug,
    measure,
    packaged_table,
    read_json,
    summarize,
)

MINI = ModelShape(name="mini", heads=4, head_dim=64, layers=4, grid=(5, 12, 16), steps=10, cfg=2)
SHAPE = AttentionShape.of_model(MINI)
K32 = KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
K16 = KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=2)
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)


def gpu_timing(median: float, iqr: float = 0.01) -> Timing:
    return Timing(median_ms=median, iqr_ms=iqr, reps=20, warmup=5, method="cuda-events+flush-l2")


def fp8(
    tile: tuple[int, int, int] | None = None, kernel: KernelConfig | None = None
) -> AttentionSpec:
    return AttentionSpec(mode=Mode.FP8_DENSE, tile=tile, kernel=kernel)


def sparse(
    s: float,
    tile: tuple[int, int, int] = (1, 4, 8),
    kind: str = "window",
    kernel: KernelConfig | None = None,
) -> AttentionSpec:
    return AttentionSpec.from_dict(
        {
            "mode": "fp8_sparse",
            "sparsity": s,
            "tile": list(tile),
            "pattern": {"kind": kind},
            **({"kernel": kernel.model_dump()} if kernel else {}),
        }
    )


# -- measure() --------------------------------------------------------------------------------


class FakeClock:
    """A clock that only moves when the timed function says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_measure_statistics_on_a_fake_clock() -> None:
    clock = FakeClock()
    durations_ms = [float(d) for d in range(1, 26)]  # 25 reps
    random.Random(0).shuffle(durations_ms)
    warm = [100.0, 100.0, 100.0]  # warm-up runs must not be in the statistics
    script = iter(warm + durations_ms)
    calls = []

    def fn() -> None:
        calls.append(1)
        clock.now += next(script) / 1e3

    t = measure(fn, warmup=3, reps=25, clock=clock, device="cpu")
    assert len(calls) == 28
    assert t.method == "cpu-wallclock" and not t.is_gpu
    assert (t.reps, t.warmup) == (25, 3)
    assert t.samples_ms == pytest.approx(durations_ms)
    assert t.median_ms == pytest.approx(13.0)
    q1, q3 = np.percentile(durations_ms, [25, 75])
    assert t.iqr_ms == pytest.approx(q3 - q1)
    assert json.loads(json.dumps(t.to_dict())) == {
        "median_ms": t.median_ms,
        "iqr_ms": t.iqr_ms,
        "reps": 25,
        "warmup": 3,
        "method": "cpu-wallclock",
        "calls_per_sample": 1,
    }


def test_measure_rotates_input_sets_in_order() -> None:
    clock = FakeClock()
    seen: list[int] = []

    def fn(i: int, scale: float) -> None:
        seen.append(i)
        clock.now += scale * 1e-3

    sets = [(0, 1.0), (1, 2.0), (2, 3.0)]
    t = measure(fn, warmup=2, reps=21, rotate=sets, clock=clock, device="cpu")
    assert seen == [i % 3 for i in range(23)]
    # timed reps start at call 2: set 2, 0, 1, 2, ...
    assert t.samples_ms[:3] == pytest.approx([3.0, 1.0, 2.0])
    assert t.median_ms == pytest.approx(2.0)


def test_measure_real_sleep_structure() -> None:
    t = measure(lambda: time.sleep(0.0005), warmup=1, reps=20, device="cpu")
    assert t.reps == 20 == len(t.samples_ms)
    assert t.iqr_ms >= 0 and t.median_ms > 0
    assert min(t.samples_ms) <= t.median_ms <= max(t.samples_ms)


def test_measure_refuses_too_few_reps() -> None:
    with pytest.raises(ValueError, match="at least 20"):
        measure(lambda: None, warmup=0, reps=5, device="cpu")
    with pytest.raises(ValueError, match="rotate"):
        measure(lambda: None, warmup=0, reps=20, rotate=[], device="cpu")


def test_summarize_matches_numpy() -> None:
    xs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0]
    t = summarize(xs, warmup=0, method="x")
    q1, q3 = np.percentile(xs, [25, 75])
    assert t.median_ms == statistics.median(xs) and t.iqr_ms == pytest.approx(q3 - q1)


# -- the JSON form and the shipped tables ------------------------------------------------------


def test_json_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match=r"x\.json: not a latency table"):
        read_json(bad)
    with pytest.raises(ValueError, match="no such latency table"):
        read_json(tmp_path / "missing.json")


def test_packaged_table_missing_is_a_clear_error() -> None:
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    with pytest.raises(NoLatencyRow, match="ships no latency table for GPU 'Imaginary GPU'"):
        packaged_table("Imaginary GPU")


# -- composition -------------------------------------------------------------------------------


def make_policy(default: AttentionSpec, entries: list[tuple[Any, Any, AttentionSpec]]) -> Policy:
    return Policy(
        model=MINI,
        hardware=H100,
        provenance=Provenance(
            study="test", created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), fpstune_version="0.1.0"
        ),
        default=default,
        entries=tuple(PolicyEntry(steps=s, layers=la, spec=sp) for s, la, sp in entries),
    )


@pytest.fixture
def mini_table() -> LatencyTable:
    t = LatencyTable.in_memory()

    def rec(spec: AttentionSpec, ms: float, fp: HardwareFingerprint = H100, **kw: Any) -> None:
        t.record(fingerprint=fp, shape=SHAPE, spec=spec, timing=gpu_timing(ms), **kw)

    rec(BF16, 2.0)
    rec(fp8((1, 4, 8), K32), 1.2)
    rec(fp8((1, 4, 16), K32), 1.0)
    rec(sparse(0.5, kernel=K32), 0.9)
    rec(sparse(0.5, kernel=K16), 0.8)
    rec(sparse(0.75, kernel=K32), 0.5)
    rec(sparse(0.9, kernel=K32), 0.3)
    rec(sparse(0.75, kind="topk", kernel=K32), 0.6)
    # rows that must never be used: another GPU, another software stack, estimated
    rec(BF16, 0.01, fp=A100)
    rec(BF16, 0.02, fp=H100_NEWER_TORCH)
    rec(sparse(0.75, kernel=K32), 0.01, source="estimated")
    return t


def _hand_sum(policy: Policy, per_spec: dict[AttentionSpec, float]) -> float:
    total = 0.0
    for step in range(MINI.steps):
        for layer in range(MINI.layers):
            total += per_spec[policy.spec(layer=layer, step=step)] * MINI.cfg
    return total


def test_compose_equals_a_hand_computed_sum(mini_table: LatencyTable) -> None:
    dense = fp8()
    s80 = sparse(0.8)
    policy = make_policy(
        BF16,
        [((2, 5), (0, 4), dense), ((5, 10), (0, 1), dense), ((5, 10), (1, 4), s80)],
    )
    # fp8 dense without a tile: best stored tile (1.0); sparsity 0.8: bucket 0.75 below it (0.5)
    expected = _hand_sum(policy, {BF16: 2.0, dense: 1.0, s80: 0.5})
    got = compose(policy, mini_table, fingerprint=H100)
    assert got.total_ms == pytest.approx(expected)
    assert got.by_mode == pytest.approx(
        {
            "bf16_dense": 2 * 4 * 2 * 2.0,
            "fp8_dense": (3 * 4 + 5) * 2 * 1.0,
            "fp8_sparse": 5 * 3 * 2 * 0.5,
        }
    )
    assert got.calls_by_mode == {"bf16_dense": 16, "fp8_dense": 34, "fp8_sparse": 30}
    assert sum(got.calls_by_mode.values()) == MINI.steps * MINI.layers * MINI.cfg
    assert got.source == "table" and got.row_source == "measured" and got.fingerprint == H100
    attrs = json.loads(json.dumps(got.attrs()))
    used = {json.dumps(lk["requested"], sort_keys=True): lk for lk in attrs["latency_lookups"]}
    s80_used = used[json.dumps(s80.to_dict(), sort_keys=True)]["used"]
    assert s80_used["sparsity"] == 0.75 and s80_used["tile"] == [1, 4, 8]
    assert used[json.dumps(dense.to_dict(), sort_keys=True)]["used"]["tile"] == [1, 4, 16]


def test_compose_interpolates_when_asked(mini_table: LatencyTable) -> None:
    s80 = sparse(0.8)
    policy = make_policy(s80, [])
    got = compose(policy, mini_table, fingerprint=H100, sparsity_rule="interpolate")
    per_call = 0.5 + (0.8 - 0.75) / (0.9 - 0.75) * (0.3 - 0.5)
    assert got.total_ms == pytest.approx(per_call * MINI.steps * MINI.layers * MINI.cfg)
    exact = compose(make_policy(sparse(0.5), []), mini_table, fingerprint=H100)
    assert exact.total_ms == pytest.approx(0.8 * 80)  # best kernel config at the bucket


def test_compose_pinned_kernel_and_pattern_must_match(mini_table: LatencyTable) -> None:
    pinned = compose(make_policy(sparse(0.5, kernel=K32), []), mini_table, fingerprint=H100)
    assert pinned.total_ms == pytest.approx(0.9 * 80)
    topk = compose(make_policy(sparse(0.75, kind="topk"), []), mini_table, fingerprint=H100)
    assert topk.total_ms == pytest.approx(0.6 * 80)


def test_compose_missing_rows_are_clear_errors(mini_table: LatencyTable) -> None:
    with pytest.raises(NoLatencyRow, match=r"sparsity 0\.3 .*no sparsity bucket at or below"):
        compose(make_policy(sparse(0.3), []), mini_table, fingerprint=H100)
    with pytest.raises(NoLatencyRow, match=r"at or above"):
        compose(
            make_policy(sparse(0.95), []), mini_table, fingerprint=H100, sparsity_rule="interpolate"
        )
    with pytest.raises(NoLatencyRow, match="fp8_sparse"):
        compose(make_policy(sparse(0.5, tile=(1, 2, 16)), []), mini_table, fingerprint=H100)
    with pytest.raises(NoLatencyRow, match="A100"):
        compose(make_policy(fp8(), []), mini_table, fingerprint=A100)
    # estimated rows exist for sparse 0.75 only: a bf16 cell finds none
    with pytest.raises(NoLatencyRow, match="no estimated latency"):
        compose(make_policy(BF16, []), mini_table, fingerprint=H100, source="estimated")


def test_compose_with_measured_latency_on_the_cpu_test_path() -> None:
    tiny = ModelShape(name="tiny", heads=2, head_dim=64, layers=2, grid=(2, 4, 8), steps=3, cfg=1)
    policy = Policy(
        model=tiny,
        hardware=H100,
        provenance=Provenance(
            study="test", created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), fpstune_version="0.1.0"
        ),
        default=BF16,
        entries=(PolicyEntry(steps=(1, 3), layers=(0, 2), spec=fp8((1, 4, 8))),),
    )
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        MeasuredLatency("cpu")
    per_call = MeasuredLatency("cpu", warmup=0, reps=20, allow_cpu=True)
    got = compose_with(policy, per_call)
    assert got.source == "measured" and got.fingerprint.is_cpu
    assert got.calls_by_mode == {"bf16_dense": 2, "fp8_dense": 4}
    assert [lk.cost.method for lk in got.lookups] == ["cpu-wallclock"] * 2
    by_spec = {lk.requested: lk.cost.median_ms for lk in got.lookups}
    assert got.total_ms == pytest.approx(2 * by_spec[BF16] + 4 * by_spec[fp8((1, 4, 8))])
    assert compose_with(policy, per_call).total_ms == got.total_ms  # cached, not re-measured
