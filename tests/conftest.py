"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator

import pytest
import torch
from shared_helpers import fresh_pg_database


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
    with fresh_pg_database("fpstune_test") as url:
        yield url
