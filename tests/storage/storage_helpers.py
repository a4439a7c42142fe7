"""Shared by the storage contracts: emptying a database between tests."""

from __future__ import annotations

import sqlalchemy as sa


def empty_database(url: str) -> None:
    """Drop every table (Optuna's and fpstune's); on PostgreSQL, other sessions closed first."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            if engine.dialect.name == "postgresql":
                c.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
            meta = sa.MetaData()
            meta.reflect(c)
            meta.drop_all(c)
    finally:
        engine.dispose()
