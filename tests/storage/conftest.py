"""The backends every storage contract runs on, Optuna's tests/storages_tests style: each contract
class asks for ``db_url`` and runs once per backend.

- ``sqlite``: a file in the test's temporary folder.
- ``postgresql``: a database of its own per test module on the server at FPSTUNE_TEST_PG_URL
  (created like tests/conftest.py's ``pg_url``; under CI a missing server fails, never skips),
  emptied after each test so that every test starts from an empty database.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from shared_helpers import fresh_pg_database
from storage_helpers import empty_database

# The dashboard tests' study builder (tests/dashboard is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dashboard"))

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="module")
def pg_module_url() -> Iterator[str]:
    with fresh_pg_database("fpstune_storage") as url:
        yield url


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
        return
    url = request.getfixturevalue("pg_module_url")
    empty_database(url)
    yield url
    empty_database(url)
