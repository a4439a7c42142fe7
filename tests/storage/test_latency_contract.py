"""The latency table's contract (fpstune/latency/table.py, migrate.py), on every backend: rows round
trip, queries never mix sources or GPUs, rows are append-only, several processes may open a new
database and write at once, an older database is upgraded in place and a newer one refused."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from shared_helpers import A100, H100, H100_NEWER_TORCH
from storage_helpers import empty_database

from fpstune.errors import BadInput
from fpstune.kernels import AttentionSpec, KernelConfig, Mode
from fpstune.latency import (
    AttentionShape,
    LatencyRow,
    LatencyTable,
    NoLatencyRow,
    Timing,
    gpu_slug,
    read_json,
)
from fpstune.latency.migrate import (
    LATENCY_STEPS,
    SCHEMA_TABLE,
    Migrations,
    SchemaTooNew,
    recorded_version,
    upgrade,
)
from fpstune.latency.table import MIGRATIONS, Base, LatencyRecord, _to_record, create_engine

SHAPE = AttentionShape(batch=1, heads=4, head_dim=64, grid=(5, 12, 16))
K32 = KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
K16 = KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=2)
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)
GPU_COLUMNS = ("gpu_uuid", "gpu_index")


def gpu_timing(median: float, iqr: float = 0.01) -> Timing:
    return Timing(median_ms=median, iqr_ms=iqr, reps=20, warmup=5, method="cuda-events+flush-l2")


def fp8(
    tile: tuple[int, int, int] | None = None, kernel: KernelConfig | None = None
) -> AttentionSpec:
    return AttentionSpec(mode=Mode.FP8_DENSE, tile=tile, kernel=kernel)


def sparse(s: float, kind: str = "window") -> AttentionSpec:
    return AttentionSpec.from_dict(
        {"mode": "fp8_sparse", "sparsity": s, "tile": [1, 4, 8], "pattern": {"kind": kind}}
    )


def _columns(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns(LatencyRecord.__tablename__)}
    finally:
        engine.dispose()


def _old_database(url: str, *, gpu_columns: bool = False) -> LatencyRow:
    """A database as an earlier fpstune left it: the latency table with one row and no recorded
    schema version; without ``gpu_columns`` the first release's table (version 1)."""
    engine = create_engine(url)
    old = sa.Table(
        LatencyRecord.__tablename__,
        sa.MetaData(),
        *(
            sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
            for c in LatencyRecord.__table__.columns
            if gpu_columns or c.name not in GPU_COLUMNS
        ),
    )
    old.create(engine)
    row = LatencyTable.in_memory().record(
        fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(2.0)
    )
    record = _to_record(row)
    with engine.begin() as conn:
        values = {c.name: getattr(record, c.name) for c in old.columns if c.name != "id"}
        conn.execute(old.insert().values(values))
    engine.dispose()
    return row


def _create_and_record(url: str, barrier: Any, n: int) -> None:
    barrier.wait()
    table = LatencyTable.from_url(url)
    table.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(1.0 + n))
    table.engine.dispose()


class TestLatencyTableContract:
    """What callers of `LatencyTable` rely on, whatever database holds it."""

    def test_round_trip_and_best(self, db_url: str) -> None:
        table = LatencyTable.from_url(db_url)
        for spec, ms in ((BF16, 2.0), (fp8((1, 4, 8), K32), 1.5), (fp8((1, 4, 8), K16), 1.2)):
            table.record(fingerprint=H100, shape=SHAPE, spec=spec, timing=gpu_timing(ms))
        table.record(
            fingerprint=H100,
            shape=SHAPE,
            spec=fp8((1, 4, 16), K32),
            timing=gpu_timing(1.3),
            study="mini:kernel:fp8_dense",
            trial=7,
        )
        with_card = dataclasses.replace(table.rows()[0], gpu_uuid="GPU-1234", gpu_index=3)
        table.add([with_card])
        table.engine.dispose()

        # a second engine on the same database sees the rows (and opening again is idempotent)
        again = LatencyTable.from_url(db_url)
        rows = again.rows()
        assert len(rows) == 5
        assert rows[3].study == "mini:kernel:fp8_dense" and rows[3].trial == 7
        assert rows[0].spec == BF16 and rows[0].tile is None and rows[0].kernel is None
        assert rows[0].created.tzinfo is not None
        assert rows[4] == dataclasses.replace(with_card, created=rows[4].created)
        assert (rows[4].gpu_uuid, rows[4].gpu_index) == ("GPU-1234", 3)

        best = again.best(SHAPE, "fp8_dense", gpu=H100)
        assert best.median_ms == 1.2 and best.kernel == K16 and best.tile == (1, 4, 8)
        assert again.best(SHAPE, Mode.FP8_DENSE, gpu=H100, tile=(1, 4, 16)).median_ms == 1.3
        assert again.best(SHAPE, Mode.FP8_DENSE, gpu=H100, kernel=K32).median_ms == 1.3
        assert again.best(SHAPE, Mode.FP8_DENSE, gpu="NVIDIA H100 80GB HBM3").median_ms == 1.2
        assert again.best(SHAPE, Mode.BF16_DENSE, gpu=H100, tile=(9, 9, 9)).median_ms == 2.0
        again.engine.dispose()

    def test_specs_are_stored_resolved(self, db_url: str) -> None:
        table = LatencyTable.from_url(db_url)
        row = table.record(fingerprint=H100, shape=SHAPE, spec=fp8(), timing=gpu_timing(1.0))
        assert row.tile is not None and row.kernel is not None  # the runtime's defaults, as run
        assert table.rows()[0].spec == row.spec
        table.engine.dispose()

    def test_rows_are_append_only(self, db_url: str) -> None:
        """The same config measured twice is two rows; `best` answers the lower median."""
        table = LatencyTable.from_url(db_url)
        for ms in (1.4, 1.1, 1.7):
            table.record(fingerprint=H100, shape=SHAPE, spec=sparse(0.5), timing=gpu_timing(ms))
        assert [r.median_ms for r in table.rows()] == [1.4, 1.1, 1.7]
        assert table.best(SHAPE, "fp8_sparse", 0.5, gpu=H100).median_ms == 1.1
        assert table.sparsities(SHAPE, "fp8_sparse", gpu=H100) == [0.5]
        table.engine.dispose()

    def test_sources_are_never_mixed(self, db_url: str) -> None:
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
        table.engine.dispose()

    def test_fingerprints_are_matched(self, db_url: str) -> None:
        table = LatencyTable.from_url(db_url)
        table.record(fingerprint=A100, shape=SHAPE, spec=BF16, timing=gpu_timing(0.1))
        table.record(fingerprint=H100_NEWER_TORCH, shape=SHAPE, spec=BF16, timing=gpu_timing(1.9))
        table.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(2.0))
        assert table.best(SHAPE, "bf16_dense", gpu=H100).median_ms == 1.9  # same GPU type
        assert table.best(SHAPE, "bf16_dense", gpu=H100, exact=True).median_ms == 2.0
        assert table.best(SHAPE, "bf16_dense", gpu=A100).fingerprint == A100
        assert table.fingerprints() == [A100, H100_NEWER_TORCH, H100]
        table.engine.dispose()

    def test_a_missing_row_is_one_line_naming_the_query(self, db_url: str) -> None:
        table = LatencyTable.from_url(db_url)
        table.record(fingerprint=H100, shape=SHAPE, spec=sparse(0.5), timing=gpu_timing(1.0))
        with pytest.raises(NoLatencyRow) as e:
            table.best(SHAPE, "fp8_sparse", 0.75, gpu=H100, pattern="window")
        msg = str(e.value)
        assert "\n" not in msg
        for part in ("1x4x960x64", "5x12x16", "fp8_sparse", "sparsity 0.75", "H100", "measured"):
            assert part in msg, (part, msg)
        assert table.best(SHAPE, "fp8_sparse", 0.5, gpu=H100, pattern="window").median_ms == 1.0
        with pytest.raises(NoLatencyRow):
            table.best(SHAPE, "fp8_sparse", 0.5, gpu=H100, pattern="topk")
        table.engine.dispose()

    def test_cpu_timings_are_refused_under_a_gpu_fingerprint(self, db_url: str) -> None:
        table = LatencyTable.from_url(db_url)
        cpu = Timing(median_ms=1.0, iqr_ms=0.0, reps=20, warmup=0, method="cpu-wallclock")
        with pytest.raises(ValueError, match="does not fit"):
            table.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=cpu)
        assert table.rows() == []
        table.engine.dispose()

    def test_json_export_loads_back_equal(self, db_url: str, tmp_path: Path) -> None:
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
        assert other.rows() == table.rows(source="measured") == read_json(path)
        table.engine.dispose()

    def test_joint_text_video_rows_are_their_own_shape(self, db_url: str, tmp_path: Path) -> None:
        """A joint call's text tokens (HunyuanVideo, CogVideoX) round-trip through the database
        and JSON, and a lookup never answers a joint shape with a video-only row or back."""
        joint = dataclasses.replace(SHAPE, text=77)
        table = LatencyTable.from_url(db_url)
        table.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(2.0))
        table.record(fingerprint=H100, shape=joint, spec=BF16, timing=gpu_timing(2.5))
        rows = LatencyTable.from_url(db_url).rows()
        assert [(r.shape.text, r.shape.tokens) for r in rows] == [(0, 960), (77, 1037)]
        assert table.best(joint, Mode.BF16_DENSE, gpu=H100).median_ms == 2.5
        assert table.best(SHAPE, Mode.BF16_DENSE, gpu=H100).median_ms == 2.0
        with pytest.raises(NoLatencyRow, match=r"1x4x1038x64 \(grid 5x12x16 \+ 78 text\)"):
            table.best(dataclasses.replace(SHAPE, text=78), Mode.BF16_DENSE, gpu=H100)
        path = tmp_path / "joint.json"
        table.export_json(path)
        assert read_json(path) == rows
        video_only = json.loads(path.read_text())["rows"][0]["shape"]
        assert "text" not in video_only  # rows without text read as they always did
        table.engine.dispose()

    def test_concurrent_writers_keep_every_row(self, db_url: str) -> None:
        """One `LatencyTable` shared by threads (each call its own session)."""
        table = LatencyTable.from_url(db_url)

        def write(n: int) -> None:
            for i in range(5):
                ms = 1.0 + n + i / 10
                table.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(ms))

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        got = sorted(r.median_ms for r in table.rows())
        assert got == pytest.approx(sorted(1.0 + n + i / 10 for n in range(4) for i in range(5)))
        table.engine.dispose()

    def test_processes_opening_a_new_database_at_once(self, db_url: str) -> None:
        """Several workers open the study's database at once: one creates the table, every
        row is kept, the schema version is recorded once."""
        ctx = multiprocessing.get_context("fork")
        for _attempt in range(3):
            empty_database(db_url)
            barrier = ctx.Barrier(3)
            procs = [
                ctx.Process(target=_create_and_record, args=(db_url, barrier, i)) for i in range(3)
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join(60)
            assert [p.exitcode for p in procs] == [0, 0, 0]
            table = LatencyTable.from_url(db_url)
            assert sorted(r.median_ms for r in table.rows()) == [1.0, 2.0, 3.0]
            assert recorded_version(table.engine, LatencyRecord.__tablename__) == MIGRATIONS.latest
            table.engine.dispose()

    # -- the schema ----------------------------------------------------------------------------

    def test_a_new_database_is_created_at_the_latest_version(self, db_url: str) -> None:
        table = LatencyTable.from_url(db_url)
        assert recorded_version(table.engine, LatencyRecord.__tablename__) == MIGRATIONS.latest
        assert _columns(db_url) == set(LatencyRecord.__table__.columns.keys())
        # Only fpstune's tables: Optuna's are Optuna's to create.
        assert set(sa.inspect(table.engine).get_table_names()) == {
            LatencyRecord.__tablename__,
            SCHEMA_TABLE,
        }
        table.engine.dispose()

    def test_opening_an_up_to_date_database_writes_nothing(self, db_url: str) -> None:
        LatencyTable.from_url(db_url).engine.dispose()
        engine = create_engine(db_url)
        statements: list[str] = []
        sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        LatencyTable(engine)
        assert len(statements) == 1 and statements[0].lstrip().upper().startswith("SELECT")
        engine.dispose()

    @pytest.mark.parametrize("gpu_columns", [False, True], ids=["first-release", "unversioned"])
    def test_a_database_of_an_older_schema_opens_and_is_upgraded(
        self, db_url: str, gpu_columns: bool
    ) -> None:
        """The first release's table (no gpu_uuid / gpu_index), and the current table from
        before versions were recorded: rows kept (the new fields NULL), new rows stored whole."""
        row = _old_database(db_url, gpu_columns=gpu_columns)
        table = LatencyTable.from_url(db_url)
        [kept] = table.rows()
        assert kept == row
        assert set(GPU_COLUMNS) <= _columns(db_url)
        assert recorded_version(table.engine, LatencyRecord.__tablename__) == MIGRATIONS.latest
        table.add([dataclasses.replace(row, gpu_uuid="GPU-1234", gpu_index=3)])
        assert [(r.gpu_uuid, r.gpu_index) for r in table.rows()] == [(None, None), ("GPU-1234", 3)]
        table.engine.dispose()
        assert len(LatencyTable.from_url(db_url).rows()) == 2  # and it opens again as it is

    def test_a_read_only_database_of_an_older_fpstune_is_read_as_it_is(self, db_url: str) -> None:
        """The current columns without a recorded version, on a database this process may not
        write (a read-only file, a read-only role): rows are read; nothing is written."""
        row = _old_database(db_url, gpu_columns=True)
        url = sa.engine.make_url(db_url)
        if url.get_backend_name() == "sqlite":
            url = url.set(database=f"file:{url.database}", query={"mode": "ro", "uri": "true"})
        else:
            url = url.update_query_dict({"options": "-c default_transaction_read_only=on"})
        table = LatencyTable.from_url(url.render_as_string(hide_password=False))
        assert table.rows() == [row]
        with pytest.raises(sa.exc.DBAPIError):  # read-only indeed
            table.add([row])
        table.engine.dispose()
        engine = create_engine(db_url)
        assert recorded_version(engine, LatencyRecord.__tablename__) is None
        assert not sa.inspect(engine).has_table(SCHEMA_TABLE)
        engine.dispose()

    def test_a_failing_upgrade_step_changes_nothing(self, db_url: str) -> None:
        _old_database(db_url)

        def fail(conn: sa.Connection) -> None:
            raise RuntimeError("step 3 failed")

        broken = Migrations(LatencyRecord.__tablename__, Base.metadata, (*LATENCY_STEPS, fail))
        engine = create_engine(db_url)
        with pytest.raises(RuntimeError, match="step 3 failed"):
            upgrade(engine, broken)
        # step 2 ran in the same transaction: rolled back with it
        assert not set(GPU_COLUMNS) & _columns(db_url)
        assert recorded_version(engine, LatencyRecord.__tablename__) is None
        engine.dispose()
        assert len(LatencyTable.from_url(db_url).rows()) == 1

    def test_a_database_of_a_newer_schema_is_refused_in_one_line(self, db_url: str) -> None:
        table = LatencyTable.from_url(db_url)
        table.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=gpu_timing(2.0))
        newer = MIGRATIONS.latest + 1
        with table.engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {SCHEMA_TABLE} SET version = {newer}"))
        table.engine.dispose()
        with pytest.raises(SchemaTooNew) as e:
            LatencyTable.from_url(db_url)
        msg = str(e.value)
        assert isinstance(e.value, BadInput)  # the CLI's one line on stderr, exit 2
        assert "\n" not in msg and "fpstune-ci" not in msg  # one line, no password
        assert f"schema version {newer}, newer than this fpstune knows" in msg
        assert "upgrade fpstune" in msg
        engine = create_engine(db_url)
        assert recorded_version(engine, LatencyRecord.__tablename__) == newer  # untouched
        engine.dispose()
