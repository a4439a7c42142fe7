"""Fixtures for the service tests: storages (SQLite, the real PostgreSQL server that .ci/run
starts), a local Ray cluster, and the tiny study."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
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
