"""Latency: measure() statistics, the latency table on SQLite, and policy composition."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import multiprocessing
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

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
from fpstune.latency.table import create_tables

H100 = HardwareFingerprint(
    gpu="NVIDIA H100 80GB HBM3",
    sm_count=132,
    capability=(9, 0),
    driver="550.54.15",
    torch="2.11.0",
    triton="3.6.0",
    fpstune="0.1.0",
)
H100_NEWER_TORCH = H100.model_copy(update={"torch": "2.12.0"})
A100 = H100.model_copy(
    update={"gpu": "NVIDIA A100-SXM4-80GB", "sm_count": 108, "capability": (8, 0)}
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


# -- the latency table ------------------------------------------------------------------------


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def test_table_round_trip_and_best(db_url: str) -> None:
    table = LatencyTable.from_url(db_url)
    table.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(2.0))
    table.record(fingerprint=H100, shape=SHAPE, spec=fp8((1, 4, 8), K32), timing=gpu_timing(1.5))
    table.record(fingerprint=H100, shape=SHAPE, spec=fp8((1, 4, 8), K16), timing=gpu_timing(1.2))
    table.record(
        fingerprint=H100,
        shape=SHAPE,
        spec=fp8((1, 4, 16), K32),
        timing=gpu_timing(1.3),
        study="mini:kernel:fp8_dense",
        trial=7,
    )

    # a second engine on the same file sees the rows (and create_all is idempotent)
    again = LatencyTable.from_url(db_url)
    rows = again.rows()
    assert len(rows) == 4
    assert rows[3].study == "mini:kernel:fp8_dense" and rows[3].trial == 7
    assert rows[0].spec == BF16 and rows[0].tile is None and rows[0].kernel is None
    assert rows[0].created.tzinfo is not None

    best = again.best(SHAPE, "fp8_dense", gpu=H100)
    assert best.median_ms == 1.2 and best.kernel == K16 and best.tile == (1, 4, 8)
    assert again.best(SHAPE, Mode.FP8_DENSE, gpu=H100, tile=(1, 4, 16)).median_ms == 1.3
    assert again.best(SHAPE, Mode.FP8_DENSE, gpu=H100, kernel=K32).median_ms == 1.3
    assert again.best(SHAPE, Mode.FP8_DENSE, gpu="NVIDIA H100 80GB HBM3").median_ms == 1.2
    assert again.best(SHAPE, Mode.BF16_DENSE, gpu=H100, tile=(9, 9, 9)).median_ms == 2.0


def test_table_stores_resolved_specs(db_url: str) -> None:
    table = LatencyTable.from_url(db_url)
    row = table.record(fingerprint=H100, shape=SHAPE, spec=fp8(), timing=gpu_timing(1.0))
    assert row.tile is not None and row.kernel is not None  # the runtime's defaults, as run
    stored = table.rows()[0]
    assert stored.spec == row.spec


def test_table_never_mixes_sources(db_url: str) -> None:
    table = LatencyTable.from_url(db_url)
    table.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(2.0))
    table.record(
        fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(0.5), source="estimated"
    )
    assert table.best(SHAPE, "bf16_dense", gpu=H100).median_ms == 2.0
    est = table.best(SHAPE, "bf16_dense", gpu=H100, source="estimated")
    assert est.median_ms == 0.5 and est.source == "estimated"
    assert [r.source for r in table.rows(source="measured")] == ["measured"]
    with pytest.raises(ValueError, match="source"):
        table.best(SHAPE, "bf16_dense", gpu=H100, source="guessed")  # type: ignore[arg-type]


def test_table_fingerprints_are_matched(db_url: str) -> None:
    table = LatencyTable.from_url(db_url)
    table.record(fingerprint=A100, shape=SHAPE, spec=BF16, timing=gpu_timing(0.1))
    table.record(fingerprint=H100_NEWER_TORCH, shape=SHAPE, spec=BF16, timing=gpu_timing(1.9))
    table.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(2.0))
    assert table.best(SHAPE, "bf16_dense", gpu=H100).median_ms == 1.9  # same GPU type
    assert table.best(SHAPE, "bf16_dense", gpu=H100, exact=True).median_ms == 2.0
    assert table.best(SHAPE, "bf16_dense", gpu=A100).fingerprint == A100
    assert table.fingerprints() == [A100, H100_NEWER_TORCH, H100]


def test_table_error_names_the_query(db_url: str) -> None:
    table = LatencyTable.from_url(db_url)
    table.record(fingerprint=H100, shape=SHAPE, spec=sparse(0.5), timing=gpu_timing(1.0))
    with pytest.raises(NoLatencyRow) as e:
        table.best(SHAPE, "fp8_sparse", 0.75, gpu=H100, pattern="window")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("1x4x960x64", "5x12x16", "fp8_sparse", "sparsity 0.75", "NVIDIA H100", "measured"):
        assert part in msg, (part, msg)
    assert table.best(SHAPE, "fp8_sparse", 0.5, gpu=H100, pattern="window").median_ms == 1.0
    with pytest.raises(NoLatencyRow):
        table.best(SHAPE, "fp8_sparse", 0.5, gpu=H100, pattern="topk")


def test_table_refuses_cpu_timings_under_a_gpu_fingerprint(db_url: str) -> None:
    table = LatencyTable.from_url(db_url)
    cpu_timing = Timing(median_ms=1.0, iqr_ms=0.0, reps=20, warmup=0, method="cpu-wallclock")
    with pytest.raises(ValueError, match="does not fit"):
        table.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=cpu_timing)


def test_json_export_import_equal(db_url: str, tmp_path: Path) -> None:
    table = LatencyTable.from_url(db_url)
    table.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(2.0))
    table.record(
        fingerprint=H100,
        shape=SHAPE,
        spec=sparse(0.75, kind="topk"),
        timing=gpu_timing(0.7),
        study="s",
        trial=3,
    )
    table.record(
        fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(9.0), source="estimated"
    )
    path = tmp_path / "data" / f"{gpu_slug(H100.gpu)}.json"
    assert table.export_json(path) == 2  # measured rows only
    doc = json.loads(path.read_text())
    assert doc["format"] == "fpstune-latency" and doc["source"] == "measured"

    other = LatencyTable.in_memory()
    assert other.load_json(path) == 2
    assert other.rows() == table.rows(source="measured")
    assert read_json(path) == table.rows(source="measured")


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


def _create_and_record(url: str, barrier: Any, n: int) -> None:
    barrier.wait()
    engine = sa.create_engine(url, connect_args={"timeout": 60})
    create_tables(engine)
    LatencyTable(engine).record(
        fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(1.0 + n)
    )


def test_concurrent_create_all_from_two_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):  # the race hits about one attempt in three
        url = f"sqlite:///{tmp_path / f'race{attempt}.db'}"
        barrier = ctx.Barrier(2)
        procs = [ctx.Process(target=_create_and_record, args=(url, barrier, i)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0]
        rows = LatencyTable.from_url(url).rows()
        assert sorted(r.median_ms for r in rows) == [1.0, 2.0]


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


def test_a_table_made_before_the_gpu_columns_gets_them(tmp_path) -> None:
    """A database whose latency table predates ``gpu_uuid``/``gpu_index`` keeps its rows (the
    new fields NULL) and stores new rows with them."""
    from fpstune.latency.table import LatencyRecord, LatencyTable, _to_record, create_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    old = sa.Table(
        LatencyRecord.__tablename__,
        sa.MetaData(),
        *(
            sa.Column(c.name, c.type, primary_key=c.primary_key)
            for c in LatencyRecord.__table__.columns
            if c.name not in ("gpu_uuid", "gpu_index")
        ),
    )
    old.create(engine)
    row = LatencyTable.in_memory().record(
        fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(2.0)
    )
    record = _to_record(row)
    with engine.begin() as conn:
        conn.execute(old.insert().values({c.name: getattr(record, c.name) for c in old.columns}))
    table = LatencyTable.from_url(url)
    [kept] = table.rows()
    assert "gpu_uuid" in {c["name"] for c in sa.inspect(engine).get_columns(old.name)}
    assert kept.gpu_uuid is None and kept.gpu_index is None and kept.median_ms == row.median_ms
    table.add([dataclasses.replace(row, gpu_uuid="GPU-1234", gpu_index=3)])
    assert [(r.gpu_uuid, r.gpu_index) for r in table.rows()] == [(None, None), ("GPU-1234", 3)]
