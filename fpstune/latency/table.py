"""The latency table in SQL: what one attention call costs, per GPU fingerprint x shape x mode x
sparsity x pattern x tile x kernel config, in fpstune's own table beside Optuna's.

Contract (checked on SQLite and PostgreSQL by tests/storage/test_latency_contract.py):
- One table, ``fpstune_latency``, in its own `MetaData` (never Optuna's), created or brought to
  the current schema by `LatencyTable` on first use (`fpstune.latency.migrate`: a recorded schema
  version and numbered steps; a database of a newer fpstune is refused in one line). Several
  processes may open a new database at once.
- Every row carries its full hardware fingerprint and its timing statistics, and a ``source``:
  ``measured`` on a GPU, or ``estimated``. A query names one source; sources are never mixed.
- Rows are append-only: the same config measured twice is two rows; `LatencyTable.best` answers
  the lowest median among the rows that match.
- Rows are stored *resolved*: the tile and kernel config that actually ran (the spec's, or the
  runtime's default for the grid); ``bf16_dense`` runs torch SDPA, so its rows hold no tile/config.

The row type and its JSON form are in `fpstune.latency.rows`; the tables shipped in the package in
`fpstune.latency.shipped`. Errors: a query that matches nothing raises `NoLatencyRow` naming the
shape, mode, sparsity and fingerprint. Thread safety: a `LatencyTable` holds only an engine; each
call opens its own session.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fpstune import trial_attrs
from fpstune.kernels import AttentionSpec, KernelConfig, Mode
from fpstune.kernels.fingerprint import GPU_TYPE_FIELDS, HardwareFingerprint
from fpstune.latency.measure import CPU_METHOD, Timing
from fpstune.latency.migrate import LATENCY_STEPS, LATENCY_TABLE, Migrations, upgrade
from fpstune.latency.rows import (
    LatencyRow,
    NoLatencyRow,
    Source,
    check_source,
    read_json,
    utc,
    write_json,
)
from fpstune.latency.shape import AttentionShape, resolve_spec

_SPARSITY_EPS = 1e-6


# -- the SQL table ---------------------------------------------------------------------------------


class Base(DeclarativeBase):
    """fpstune's own metadata: `create_all` never touches Optuna's tables."""

    metadata = sa.MetaData()


class LatencyRecord(Base):
    __tablename__ = LATENCY_TABLE
    __table_args__ = (
        sa.Index("fpstune_latency_lookup", "gpu", "heads", "tokens", "head_dim", "mode", "source"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    # what it ran on
    gpu: Mapped[str] = mapped_column(sa.String(128))
    sm_count: Mapped[int]
    capability_major: Mapped[int]
    capability_minor: Mapped[int]
    driver: Mapped[str | None] = mapped_column(sa.String(64))
    torch_version: Mapped[str] = mapped_column(sa.String(64))
    triton_version: Mapped[str | None] = mapped_column(sa.String(64))
    fpstune_version: Mapped[str] = mapped_column(sa.String(64))
    # the call
    batch: Mapped[int]
    heads: Mapped[int]
    tokens: Mapped[int]  # T*H*W + text tokens: a joint call's text is tokens - T*H*W
    head_dim: Mapped[int]
    grid: Mapped[str] = mapped_column(sa.String(64))  # "21x45x80"
    mode: Mapped[str] = mapped_column(sa.String(16))
    sparsity: Mapped[float]
    pattern: Mapped[str] = mapped_column(sa.String(16))  # "" when dense
    tile: Mapped[str] = mapped_column(sa.String(32))  # "2x8x8", "" for bf16_dense
    kernel: Mapped[str] = mapped_column(sa.String(256))  # canonical JSON, "" for bf16_dense
    spec: Mapped[str] = mapped_column(sa.Text)  # the resolved AttentionSpec as JSON
    # the figures
    median_ms: Mapped[float]
    iqr_ms: Mapped[float]
    reps: Mapped[int]
    warmup: Mapped[int]
    method: Mapped[str] = mapped_column(sa.String(64))
    source: Mapped[str] = mapped_column(sa.String(16))
    study: Mapped[str | None] = mapped_column(sa.String(512))
    trial: Mapped[int | None]
    created: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    gpu_uuid: Mapped[str | None] = mapped_column(sa.String(64))
    gpu_index: Mapped[int | None]


def create_engine(url: str) -> sa.Engine:
    """An engine as fpstune opens every database: pre-pinged; SQLite waits on locks."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}
    return sa.create_engine(url, **kwargs)


#: the latency table's schema: the mapping above is its latest version
MIGRATIONS = Migrations(table=LATENCY_TABLE, metadata=Base.metadata, steps=LATENCY_STEPS)


def create_tables(engine: sa.Engine, *, attempts: int = 5) -> None:
    """Create fpstune's tables, or bring them to the current schema (`migrate.upgrade`). Safe
    when several processes open a new database at once: upgrades take turns under the database's
    write lock, and a loser of a race with an fpstune that takes none tries again. A table that
    cannot be upgraded but already has every column (a read-only database an fpstune from before
    recorded versions made) is used as it is."""
    for attempt in range(1, attempts + 1):
        try:
            upgrade(engine, MIGRATIONS)
            return
        except sqlalchemy.exc.DBAPIError:
            # PostgreSQL reports a creation race as a duplicate pg_type row, SQLite as "already
            # exists" or "database is locked"; the next attempt finds the work done.
            if _has_every_column(engine):
                return
            if attempt == attempts:
                raise
            time.sleep(0.05 * attempt)


def _has_every_column(engine: sa.Engine) -> bool:
    try:
        present = {c["name"] for c in sa.inspect(engine).get_columns(LATENCY_TABLE)}
    except (sqlalchemy.exc.NoSuchTableError, sqlalchemy.exc.DBAPIError):
        return False
    return present >= set(LatencyRecord.__table__.columns.keys())


class LatencyTable:
    """Latency rows in a SQL database (the study storage, or in-memory SQLite for shipped JSON)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        create_tables(engine)

    @classmethod
    def from_url(cls, url: str) -> LatencyTable:
        return cls(create_engine(url))

    @classmethod
    def in_memory(cls) -> LatencyTable:
        return cls(
            sa.create_engine(
                "sqlite://",
                connect_args={"check_same_thread": False},
                poolclass=sa.pool.StaticPool,
            )
        )

    # -- writing ------------------------------------------------------------------------------

    def record(
        self,
        *,
        fingerprint: HardwareFingerprint,
        shape: AttentionShape,
        spec: AttentionSpec,
        timing: Timing,
        source: Source = "measured",
        study: str | None = None,
        trial: int | None = None,
    ) -> LatencyRow:
        """Store one timing of ``spec`` on ``shape``. A CPU wall-clock timing is refused under a
        GPU fingerprint (and a GPU timing under the CPU one): the method must match the device."""
        if (timing.method == CPU_METHOD) != fingerprint.is_cpu:
            raise ValueError(
                f"timing method {timing.method!r} does not fit fingerprint gpu={fingerprint.gpu!r}"
            )
        row = LatencyRow(
            fingerprint=fingerprint,
            shape=shape,
            spec=resolve_spec(spec, shape),
            median_ms=timing.median_ms,
            iqr_ms=timing.iqr_ms,
            reps=timing.reps,
            warmup=timing.warmup,
            method=timing.method,
            source=check_source(source),
            study=study,
            trial=trial,
        )
        self.add([row])
        return row

    def record_evaluation(
        self, attrs: Mapping[str, Any], *, study: str | None = None, trial: int | None = None
    ) -> LatencyRow:
        """Store a kernel-stage trial from the attrs `KernelEvaluator` returns."""
        row = LatencyRow.from_dict(
            {
                **attrs,
                "source": attrs[trial_attrs.LATENCY_SOURCE],
                "study": study,
                "trial": trial,
                "created": dt.datetime.now(dt.UTC).isoformat(),
            }
        )
        self.add([row])
        return row

    def add(self, rows: Iterable[LatencyRow]) -> int:
        records = [_to_record(r) for r in rows]
        with Session(self.engine) as session, session.begin():
            session.add_all(records)
        return len(records)

    # -- reading ------------------------------------------------------------------------------

    def rows(self, *, source: Source | None = None) -> list[LatencyRow]:
        """Every row (of one source, when given), oldest first."""
        stmt = sa.select(LatencyRecord).order_by(LatencyRecord.id)
        if source is not None:
            stmt = stmt.where(LatencyRecord.source == check_source(source))
        with Session(self.engine) as session:
            return [_from_record(r) for r in session.scalars(stmt)]

    def fingerprints(self, *, source: Source = "measured") -> list[HardwareFingerprint]:
        """The distinct fingerprints rows of ``source`` were made on, in first-seen order."""
        seen: dict[HardwareFingerprint, None] = {}
        for r in self.rows(source=source):
            seen.setdefault(r.fingerprint, None)
        return list(seen)

    def best(
        self,
        shape: AttentionShape,
        mode: Mode | str,
        sparsity: float = 0.0,
        *,
        gpu: HardwareFingerprint | str,
        tile: tuple[int, int, int] | None = None,
        pattern: str | None = None,
        kernel: KernelConfig | None = None,
        source: Source = "measured",
        exact: bool = False,
    ) -> LatencyRow:
        """The row with the lowest median for this call, among rows of one ``source``.

        gpu: a GPU name, or a fingerprint: rows of the same GPU type (name, capability, SM count),
          or with ``exact=True`` of exactly that fingerprint (driver and versions too).
        tile / pattern / kernel: None means any (the best over them); ``bf16_dense`` has none.
        Raises `NoLatencyRow` naming the shape, mode, sparsity and fingerprint.
        """
        stmt = self._select(shape, mode, gpu, tile, pattern, kernel, source, exact)
        stmt = (
            stmt.where(
                LatencyRecord.sparsity.between(sparsity - _SPARSITY_EPS, sparsity + _SPARSITY_EPS)
            )
            .order_by(LatencyRecord.median_ms, LatencyRecord.id)
            .limit(1)
        )
        with Session(self.engine) as session:
            rec = session.scalars(stmt).first()
            if rec is None:
                raise NoLatencyRow(
                    _no_row(shape, mode, sparsity, gpu, tile, pattern, kernel, source, exact)
                )
            return _from_record(rec)

    def sparsities(
        self,
        shape: AttentionShape,
        mode: Mode | str,
        *,
        gpu: HardwareFingerprint | str,
        tile: tuple[int, int, int] | None = None,
        pattern: str | None = None,
        kernel: KernelConfig | None = None,
        source: Source = "measured",
        exact: bool = False,
    ) -> list[float]:
        """The sparsity buckets that have rows for this call, ascending."""
        stmt = self._select(shape, mode, gpu, tile, pattern, kernel, source, exact)
        buckets = stmt.with_only_columns(LatencyRecord.sparsity).distinct()
        with Session(self.engine) as session:
            return sorted(float(s) for s in session.scalars(buckets))

    def _select(
        self,
        shape: AttentionShape,
        mode: Mode | str,
        gpu: HardwareFingerprint | str,
        tile: tuple[int, int, int] | None,
        pattern: str | None,
        kernel: KernelConfig | None,
        source: Source,
        exact: bool,
    ) -> sa.Select[Any]:
        R = LatencyRecord
        mode = Mode(mode)
        stmt = sa.select(R).where(
            R.source == check_source(source),
            R.batch == shape.batch,
            R.heads == shape.heads,
            R.head_dim == shape.head_dim,
            R.tokens == shape.tokens,
            R.grid == _grid_key(shape.grid),
            R.mode == mode.value,
        )
        if isinstance(gpu, str):
            stmt = stmt.where(R.gpu == gpu)
        else:
            stmt = stmt.where(
                R.gpu == gpu.gpu,
                R.sm_count == gpu.sm_count,
                R.capability_major == gpu.capability[0],
                R.capability_minor == gpu.capability[1],
            )
            if exact:
                stmt = stmt.where(
                    _eq(R.driver, gpu.driver),
                    R.torch_version == gpu.torch,
                    _eq(R.triton_version, gpu.triton),
                    R.fpstune_version == gpu.fpstune,
                )
        if mode is not Mode.BF16_DENSE:
            if tile is not None:
                stmt = stmt.where(R.tile == _tile_key(tile))
            if pattern is not None:
                stmt = stmt.where(R.pattern == pattern)
            if kernel is not None:
                stmt = stmt.where(R.kernel == _kernel_key(kernel))
        return stmt

    # -- JSON ---------------------------------------------------------------------------------

    def export_json(self, path: str | os.PathLike[str], *, source: Source = "measured") -> int:
        """Write the rows of one source as the shipped JSON form (atomically); returns the count."""
        return write_json(path, self.rows(source=source), source)

    def load_json(self, path: str | os.PathLike[str]) -> int:
        """Add the rows of a JSON file written by `export_json`; returns the count."""
        return self.add(read_json(path))


# -- helpers --------------------------------------------------------------------------------------


def _to_record(r: LatencyRow) -> LatencyRecord:
    fp, spec = r.fingerprint, r.spec
    return LatencyRecord(
        gpu=fp.gpu,
        sm_count=fp.sm_count,
        capability_major=fp.capability[0],
        capability_minor=fp.capability[1],
        driver=fp.driver,
        torch_version=fp.torch,
        triton_version=fp.triton,
        fpstune_version=fp.fpstune,
        batch=r.shape.batch,
        heads=r.shape.heads,
        tokens=r.shape.tokens,
        head_dim=r.shape.head_dim,
        grid=_grid_key(r.shape.grid),
        mode=spec.mode.value,
        sparsity=float(spec.sparsity),
        pattern=spec.pattern.kind if spec.pattern else "",
        tile=_tile_key(spec.tile) if spec.tile else "",
        kernel=_kernel_key(spec.kernel) if spec.kernel else "",
        spec=json.dumps(spec.to_dict(), sort_keys=True),
        median_ms=r.median_ms,
        iqr_ms=r.iqr_ms,
        reps=r.reps,
        warmup=r.warmup,
        method=r.method,
        source=r.source,
        study=r.study,
        trial=r.trial,
        created=utc(r.created),
        gpu_uuid=r.gpu_uuid,
        gpu_index=r.gpu_index,
    )


def _from_record(rec: LatencyRecord) -> LatencyRow:
    grid = tuple(int(x) for x in rec.grid.split("x"))
    return LatencyRow(
        fingerprint=HardwareFingerprint(
            gpu=rec.gpu,
            sm_count=rec.sm_count,
            capability=(rec.capability_major, rec.capability_minor),
            driver=rec.driver,
            torch=rec.torch_version,
            triton=rec.triton_version,
            fpstune=rec.fpstune_version,
        ),
        shape=AttentionShape(
            batch=rec.batch,
            heads=rec.heads,
            head_dim=rec.head_dim,
            grid=grid,  # type: ignore[arg-type]
            text=rec.tokens - math.prod(grid),
        ),
        spec=AttentionSpec.from_dict(json.loads(rec.spec)),
        median_ms=rec.median_ms,
        iqr_ms=rec.iqr_ms,
        reps=rec.reps,
        warmup=rec.warmup,
        method=rec.method,
        source=check_source(rec.source),
        study=rec.study,
        trial=rec.trial,
        created=utc(rec.created),
        gpu_uuid=rec.gpu_uuid,
        gpu_index=rec.gpu_index,
    )


def _no_row(
    shape: AttentionShape,
    mode: Mode | str,
    sparsity: float,
    gpu: HardwareFingerprint | str,
    tile: tuple[int, int, int] | None,
    pattern: str | None,
    kernel: KernelConfig | None,
    source: str,
    exact: bool,
) -> str:
    if isinstance(gpu, str):
        who = f"gpu {gpu!r}"
    else:
        fields = GPU_TYPE_FIELDS if not exact else tuple(HardwareFingerprint.model_fields)
        who = "fingerprint " + ", ".join(f"{f}={getattr(gpu, f)}" for f in fields)
    extra = "".join(
        f", {name} {value}"
        for name, value in (
            ("tile", list(tile) if tile else None),
            ("pattern", pattern),
            ("kernel", _kernel_key(kernel) if kernel else None),
        )
        if value is not None and Mode(mode) is not Mode.BF16_DENSE
    )
    return (
        f"no {source} latency for shape {shape.describe()}, mode {Mode(mode).value}, "
        f"sparsity {sparsity:g}{extra} on {who}"
    )


def _eq(column: Any, value: str | None) -> Any:
    return column.is_(None) if value is None else column == value


def _grid_key(grid: tuple[int, int, int]) -> str:
    return "x".join(str(int(g)) for g in grid)


def _tile_key(tile: tuple[int, int, int]) -> str:
    return "x".join(str(int(t)) for t in tile)


def _kernel_key(kernel: KernelConfig) -> str:
    return json.dumps(kernel.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def stored_latency_table(url: str) -> LatencyTable | None:
    """The study storage's own latency table when a kernel stage (or an import) filled it with
    measured rows; None otherwise, so the caller measures or uses the shipped table."""
    table = LatencyTable.from_url(url)
    return table if table.rows(source="measured") else None
