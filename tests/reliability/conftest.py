"""Fixtures for the reliability tests: Ray for tests that drive workers in this process, and a
private PostgreSQL server for tests that restart it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from reliability_helpers import PrivateServer


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """Ray for this module; another package's session-wide Ray is used as it is, and a Ray
    started here is shut down after the module so later packages can start their own."""
    import ray  # here, not at the top: the GPU tests run where Ray may not be installed

    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def private_pg() -> Iterator[PrivateServer]:
    server = PrivateServer()
    yield server
    server.close()
