"""fpstune's own tables under a recorded schema version, and the numbered steps that bring an older
database to the current one.

Not Alembic (installed with Optuna): Optuna's ``alembic_version`` table sits in the same database
and is Optuna's, and a revision-script folder with its env.py would outweigh the steps. The rules:

- ``fpstune_schema`` holds one row per fpstune table: its name and the schema version the
  database is at. The mapping (table.py) is always the latest version.
- Version 1 is a table's first release; ``steps[v - 1]`` brings a database at version v to v + 1.
  Each step is idempotent (it looks before it alters): re-run, or run on a table an older fpstune
  already changed, it does nothing wrong.
- `upgrade` runs on every open. At the latest version: one SELECT, nothing written. Otherwise, in
  one transaction holding the database's write lock (``BEGIN IMMEDIATE`` on SQLite, an advisory
  transaction lock on PostgreSQL), so openers racing each other take turns and the later ones find
  nothing to do: a database without the table gets the current one from the mapping; a table from
  before versions were recorded counts as version 1; the steps above the version run in order;
  the latest version is recorded. A failure rolls all of it back.
- A database at a version newer than this fpstune knows is refused before anything is written
  (`SchemaTooNew`, one line): an older fpstune must not write rows a newer one would misread.

To change a table: change its mapping, append a step here that makes the same change (when not
made yet), and open a database of the previous version in tests/storage's contract.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa
import sqlalchemy.exc

from fpstune.errors import BadInput
from fpstune.storage import mask_url

SCHEMA_TABLE = "fpstune_schema"
LATENCY_TABLE = "fpstune_latency"
_versions = sa.Table(
    SCHEMA_TABLE,
    sa.MetaData(),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)
#: the PostgreSQL advisory lock upgrades take (transaction-scoped: released at commit/rollback)
_PG_LOCK = zlib.crc32(SCHEMA_TABLE.encode())

Step = Callable[[sa.Connection], None]


class SchemaTooNew(BadInput):
    """The database was written by a newer fpstune (a later schema version): left untouched."""


@dataclass(frozen=True)
class Migrations:
    """One table's history: ``steps[v - 1]`` brings version v to v + 1; ``metadata`` creates the
    latest version in a database that has none of it."""

    table: str
    metadata: sa.MetaData
    steps: tuple[Step, ...]

    @property
    def latest(self) -> int:
        return len(self.steps) + 1


def upgrade(engine: sa.Engine, m: Migrations) -> None:
    """Bring ``m.table`` in ``engine``'s database to ``m.latest`` (creating it if missing)."""
    if _check(engine, m, recorded_version(engine, m.table)) == m.latest:
        return
    with _write_lock(engine) as conn:
        _versions.create(conn, checkfirst=True)
        found = _version_on(conn, m.table)
        recorded = found is not None
        if found is None:
            if sa.inspect(conn).has_table(m.table):
                found = 1  # made before versions were recorded: every step runs, idempotent
            else:
                m.metadata.create_all(conn)
                found = m.latest
        _check(engine, m, found)
        for version in range(found, m.latest):
            m.steps[version - 1](conn)
        if recorded:
            conn.execute(
                _versions.update().where(_versions.c.name == m.table).values(version=m.latest)
            )
        else:
            conn.execute(_versions.insert().values(name=m.table, version=m.latest))


def recorded_version(engine: sa.Engine, table: str) -> int | None:
    """The schema version recorded for ``table``; None when none is (or no version table)."""
    try:
        with engine.connect() as conn:
            return _version_on(conn, table)
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError):
        return None  # no fpstune_schema yet; a database that cannot be reached fails in upgrade


def _version_on(conn: sa.Connection, table: str) -> int | None:
    stmt = sa.select(_versions.c.version).where(_versions.c.name == table)
    return conn.execute(stmt).scalar_one_or_none()


def _check(engine: sa.Engine, m: Migrations, found: int | None) -> int | None:
    if found is not None and found > m.latest:
        where = mask_url(engine.url.render_as_string(hide_password=True))
        raise SchemaTooNew(
            f"{where}: table {m.table} is at schema version {found}, newer than this fpstune "
            f"knows ({m.latest}); upgrade fpstune to use this database"
        )
    return found


@contextlib.contextmanager
def _write_lock(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One transaction holding the database's write lock: concurrent upgrades take turns."""
    if engine.dialect.name == "sqlite":
        # pysqlite opens transactions only before DML; DDL needs an explicit one, and IMMEDIATE
        # takes the write lock at BEGIN (a second opener waits for it, up to the busy timeout).
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlalchemy.exc.OperationalError):  # rolled back already
                    conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
        yield conn


# -- the latency table ----------------------------------------------------------------------------


def _add_gpu_identity(conn: sa.Connection) -> None:
    """1 -> 2: the physical card of each row, ``gpu_uuid`` and ``gpu_index`` (NULL in old rows)."""
    present = {c["name"] for c in sa.inspect(conn).get_columns(LATENCY_TABLE)}
    for name, sql_type in (("gpu_uuid", "VARCHAR(64)"), ("gpu_index", "INTEGER")):
        if name not in present:
            conn.execute(sa.text(f"ALTER TABLE {LATENCY_TABLE} ADD COLUMN {name} {sql_type}"))


#: the latency table's steps: version 1 is its first release (no gpu_uuid / gpu_index)
LATENCY_STEPS: tuple[Step, ...] = (_add_gpu_identity,)
