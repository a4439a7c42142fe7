"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import uuid
import zlib
from collections.abc import Iterator

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # CPU tests use tiny tensors: intra-op threads only add synchronisation, and on a busy 2-core
    # runner their spin-waiting made the kernel tests ~6x slower (36 s vs 6 s wall).
    torch.set_num_threads(int(os.environ.get("FPSTUNE_TEST_THREADS", "1")))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from the test's id: fresh inputs per test, the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL server .ci/run starts (FPSTUNE_TEST_PG_URL)."""
    import sqlalchemy as sa  # here, not at the top: the GPU host runs the kernel tests without it

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
