"""The latency table: what one attention call costs, per GPU fingerprint x shape x mode x sparsity x
pattern x tile x kernel config, in fpstune's own SQL table beside Optuna's.

Contract:
- One table, ``fpstune_latency``, in its own `MetaData` (never Optuna's), created idempotently by
  `LatencyTable` on first use; several processes may create it at once (the "already exists" race
  is tolerated).
- Every row carries its full hardware fingerprint and its timing statistics, and a ``source``:
  ``measured`` on a GPU, or ``estimated``. A query names one source; sources are never mixed.
- Rows are append-only: the same config measured twice is two rows; `LatencyTable.best` answers
  the lowest median among the rows that match.
- Rows are stored *resolved*: the tile and kernel config that actually ran (the spec's, or the
  runtime's default for the grid); ``bf16_dense`` runs torch SDPA, so its rows hold no tile/config.
- The JSON form (`export_json` / `load_json` / `packaged_table`) is what ships in the package, in
  ``fpstune/data/latency/<gpu-slug>.json``.

Errors: a query that matches nothing raises `NoLatencyRow` naming the shape, mode, sparsity and
fingerprint. Thread safety: a `LatencyTable` holds only an engine; each call opens its own session.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fpstune.kernels import AttentionSpec, KernelConfig, Mode, default_config, default_tile
from fpstune.kernels.atomic import write_text
from fpstune.kernels.fingerprint import GPU_TYPE_FIELDS, HardwareFingerprint
from fpstune.latency.measure import CPU_METHOD, Timing

Source = Literal["measured", "estimated"]
SOURCES: tuple[str, ...] = ("measured", "estimated")
JSON_FORMAT = "fpstune-latency"
JSON_VERSION = 1
PACKAGE_DATA = "fpstune.data.latency"
_SPARSITY_EPS = 1e-6


class NoLatencyRow(LookupError):
    """No row of the requested source matches; the message names what was asked for."""


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: (batch, heads, tokens, head_dim) over a (T, H, W) latent-patch grid."""

    batch: int
    heads: int
    head_dim: int
    grid: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if min(self.batch, self.heads, self.head_dim, *self.grid) < 1 or len(self.grid) != 3:
            raise ValueError(f"attention shape needs positive sizes and a 3D grid, got {self}")

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @classmethod
    def of_model(cls, model: Any, *, batch: int = 1) -> AttentionShape:
        """From anything with ``heads``, ``head_dim`` and ``grid`` (a policy's `ModelShape`)."""
        return cls(batch=batch, heads=model.heads, head_dim=model.head_dim, grid=tuple(model.grid))

    def describe(self) -> str:
        t, h, w = self.grid
        return f"{self.batch}x{self.heads}x{self.tokens}x{self.head_dim} (grid {t}x{h}x{w})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "grid": list(self.grid),
            "tokens": self.tokens,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttentionShape:
        return cls(
            batch=d["batch"], heads=d["heads"], head_dim=d["head_dim"], grid=tuple(d["grid"])
        )


def resolve_spec(spec: AttentionSpec, shape: AttentionShape) -> AttentionSpec:
    """The spec as the runtime runs it on ``shape``: tile and kernel config filled in with the
    defaults `attention()` would use; ``bf16_dense`` (torch SDPA) without either."""
    if spec.mode is Mode.BF16_DENSE:
        return AttentionSpec(mode=Mode.BF16_DENSE)
    tile = spec.tile or default_tile(shape.grid)
    kernel = spec.kernel or default_config(tile, shape.head_dim, spec.mode)
    return AttentionSpec.from_dict(
        {**spec.to_dict(), "tile": list(tile), "kernel": kernel.model_dump(mode="json")}
    )


@dataclass(frozen=True)
class LatencyRow:
    """One stored latency. ``spec`` is resolved (see `resolve_spec`)."""

    fingerprint: HardwareFingerprint
    shape: AttentionShape
    spec: AttentionSpec
    median_ms: float
    iqr_ms: float
    reps: int
    warmup: int
    method: str
    source: Source
    study: str | None = None
    trial: int | None = None
    created: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    #: the physical card (`device_identity`): rows of one fingerprint may come from several GPUs
    gpu_uuid: str | None = None
    gpu_index: int | None = None

    @property
    def mode(self) -> Mode:
        return self.spec.mode

    @property
    def sparsity(self) -> float:
        return self.spec.sparsity

    @property
    def pattern(self) -> str | None:
        return self.spec.pattern.kind if self.spec.pattern else None

    @property
    def tile(self) -> tuple[int, int, int] | None:
        return self.spec.tile

    @property
    def kernel(self) -> KernelConfig | None:
        return self.spec.kernel

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint.model_dump(mode="json"),
            "shape": self.shape.to_dict(),
            "spec": self.spec.to_dict(),
            "median_ms": self.median_ms,
            "iqr_ms": self.iqr_ms,
            "reps": self.reps,
            "warmup": self.warmup,
            "method": self.method,
            "source": self.source,
            "study": self.study,
            "trial": self.trial,
            "created": _utc(self.created).isoformat(),
            "gpu_uuid": self.gpu_uuid,
            "gpu_index": self.gpu_index,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyRow:
        return cls(
            fingerprint=HardwareFingerprint.model_validate(d["fingerprint"]),
            shape=AttentionShape.from_dict(d["shape"]),
            spec=AttentionSpec.from_dict(d["spec"]),
            median_ms=float(d["median_ms"]),
            iqr_ms=float(d["iqr_ms"]),
            reps=int(d["reps"]),
            warmup=int(d["warmup"]),
            method=str(d["method"]),
            source=_check_source(d["source"]),
            study=d.get("study"),
            trial=d.get("trial"),
            created=_utc(dt.datetime.fromisoformat(d["created"])),
            gpu_uuid=d.get("gpu_uuid"),
            gpu_index=d.get("gpu_index"),
        )


# -- the SQL table --------------------------------------------------------------------------------


class Base(DeclarativeBase):
    """fpstune's own metadata: `create_all` never touches Optuna's tables."""

    metadata = sa.MetaData()


class LatencyRecord(Base):
    __tablename__ = "fpstune_latency"
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
    tokens: Mapped[int]
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


def create_tables(engine: sa.Engine, *, attempts: int = 5) -> None:
    """Create fpstune's tables if missing. Safe when several processes race to create them: a
    loser's "already exists" error is absorbed once the tables are seen to exist."""
    for attempt in range(1, attempts + 1):
        try:
            Base.metadata.create_all(engine, checkfirst=True)
            _add_new_columns(engine)
            return
        except (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.ProgrammingError,
            sqlalchemy.exc.IntegrityError,
        ):
            # PostgreSQL reports the race as a duplicate pg_type row, SQLite as "already exists".
            present = set(sa.inspect(engine).get_table_names())
            if present >= set(Base.metadata.tables):
                return
            if attempt == attempts:
                raise
            time.sleep(0.05 * attempt)


#: columns added after the table's first release, with their SQL types: a database made by an
#: older fpstune gets them (NULL in old rows) when it is next opened
_NEW_COLUMNS = {"gpu_uuid": "VARCHAR(64)", "gpu_index": "INTEGER"}


def _add_new_columns(engine: sa.Engine) -> None:
    table = LatencyRecord.__tablename__
    present = {c["name"] for c in sa.inspect(engine).get_columns(table)}
    for name, sql_type in _NEW_COLUMNS.items():
        if name in present:
            continue
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError):
            # another process added it first
            if name not in {c["name"] for c in sa.inspect(engine).get_columns(table)}:
                raise


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
            source=_check_source(source),
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
                "source": attrs["latency_source"],
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
            stmt = stmt.where(LatencyRecord.source == _check_source(source))
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
            R.source == _check_source(source),
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
        rows = self.rows(source=source)
        doc = {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "source": source,
            "rows": [r.to_dict() for r in rows],
        }
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, json.dumps(doc, indent=1, sort_keys=False) + "\n")
        return len(rows)

    def load_json(self, path: str | os.PathLike[str]) -> int:
        """Add the rows of a JSON file written by `export_json`; returns the count."""
        return self.add(read_json(path))


def read_json(path: str | os.PathLike[str]) -> list[LatencyRow]:
    """Rows of a latency JSON file; ValueError naming the file for anything malformed."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{p}: no such latency table") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a latency table JSON: {e}") from None
    return _rows_of(doc, str(p))


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (the shipped file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def shipped_tables() -> list[str]:
    """GPU slugs of the latency tables shipped in the package, sorted."""
    try:
        entries = list(importlib.resources.files(PACKAGE_DATA).iterdir())
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return []
    return sorted(p.name.removesuffix(".json") for p in entries if p.name.endswith(".json"))


def packaged_table(gpu: HardwareFingerprint | str) -> LatencyTable:
    """The latency table shipped in the package for a GPU name or slug (or a fingerprint's GPU),
    loaded into an in-memory SQLite. Raises `NoLatencyRow` when fpstune ships none for it."""
    name = gpu if isinstance(gpu, str) else gpu.gpu
    fname = f"{gpu_slug(name)}.json"
    try:
        res = importlib.resources.files(PACKAGE_DATA).joinpath(fname)
        text = res.read_text(encoding="utf-8") if res.is_file() else None
    except ModuleNotFoundError:
        text = None
    if text is None:
        raise NoLatencyRow(
            f"fpstune ships no latency table for GPU {name!r} (looked for {PACKAGE_DATA}/{fname}); "
            "measure one with a kernel-stage study on that GPU"
        )
    table = LatencyTable.in_memory()
    table.add(_rows_of(json.loads(text), f"{PACKAGE_DATA}/{fname}"))
    return table


# -- helpers --------------------------------------------------------------------------------------


def _rows_of(doc: Any, where: str) -> list[LatencyRow]:
    if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
        raise ValueError(f"{where}: not a latency table (expected format {JSON_FORMAT!r})")
    if doc.get("version") != JSON_VERSION:
        raise ValueError(f"{where}: latency table version {doc.get('version')!r} is not supported")
    rows = []
    for i, d in enumerate(doc.get("rows", [])):
        try:
            rows.append(LatencyRow.from_dict(d))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: rows[{i}]: {' '.join(str(e).splitlines())}") from None
    return rows


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
        created=_utc(r.created),
        gpu_uuid=r.gpu_uuid,
        gpu_index=r.gpu_index,
    )


def _from_record(rec: LatencyRecord) -> LatencyRow:
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
            grid=tuple(int(x) for x in rec.grid.split("x")),  # type: ignore[arg-type]
        ),
        spec=AttentionSpec.from_dict(json.loads(rec.spec)),
        median_ms=rec.median_ms,
        iqr_ms=rec.iqr_ms,
        reps=rec.reps,
        warmup=rec.warmup,
        method=rec.method,
        source=_check_source(rec.source),
        study=rec.study,
        trial=rec.trial,
        created=_utc(rec.created),
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


def _check_source(source: Any) -> Source:
    if source not in SOURCES:
        raise ValueError(f"latency source must be one of {', '.join(SOURCES)}, got {source!r}")
    return source  # type: ignore[no-any-return,unused-ignore]


def _utc(t: dt.datetime) -> dt.datetime:
    # SQLite drops the zone; every time fpstune writes is UTC.
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def stored_latency_table(url: str) -> LatencyTable | None:
    """The study storage's own latency table when a kernel stage (or an import) filled it with
    measured rows; None otherwise, so the caller measures or uses the shipped table."""
    table = LatencyTable.from_url(url)
    return table if table.rows(source="measured") else None
