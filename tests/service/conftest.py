"""Fixtures for the service tests: storages (SQLite, the real PostgreSQL server that .ci/run
starts), a local Ray cluster, and the tiny study."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import sqlalchemy as sa
from service_helpers import TINY

from fpstune.spec.study import StudySpec, load_study


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def tiny() -> StudySpec:
    return load_study(TINY)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL server .ci/run starts (FPSTUNE_TEST_PG_URL)."""
    admin = os.environ.get("FPSTUNE_TEST_PG_URL")
    if not admin:
        if os.environ.get("CI"):
            pytest.fail("FPSTUNE_TEST_PG_URL is not set: .ci/run must start PostgreSQL")
        pytest.skip("no PostgreSQL server (set FPSTUNE_TEST_PG_URL; .ci/run does)")
    name = f"fpstune_test_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    url = sa.engine.make_url(admin).set(database=name).render_as_string(hide_password=False)
    yield url
    with engine.connect() as c:
        c.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
    engine.dispose()
