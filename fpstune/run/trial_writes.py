"""What the controller writes to one trial, batched into one storage transaction.

Optuna's storage API writes each suggested parameter and each trial attribute in its own
transaction (a session, a connection check-out, a SELECT of the trial, the write, a commit): on
PostgreSQL over loopback on the 2-core dev machine, 3.2-3.4 ms wall and 2.3-2.5 ms of controller
CPU each, nearly all of it SQLAlchemy work in the controller process (a bare ``SELECT 1`` round
trip is 0.13 ms). A trial of the tiny study has 6 parameters and 8 attributes, so the controller
holds them and writes each group in one transaction:

- parameters: ``TrialWriter.hold_params`` holds what ``Trial.suggest_*`` would write, and
  ``write_params`` writes it in one session: Optuna's own per-parameter code the first time a
  name is seen (it checks the distribution against the study's), then the same row and the
  same compatibility check against that distribution, with one SELECT of the trial in all;
- attributes: ``TrialWriter.attrs`` writes all user and system attributes with one multi-row
  upsert per table, the statement Optuna's RDBStorage runs per attribute;
- results: ``tell_values`` is ``Study.tell`` without the final re-read of the whole trial (six
  SELECTs) that only builds the copy ``Study.tell`` returns.

These use Optuna internals (``optuna.storages._rdb``, ``optuna.study._tell``). Where they are
missing (another storage class, a database without upserts, a future Optuna that moved them)
every write goes through the public API one by one, as before: slower, never different
(``tests/storage/test_trial_writes_contract.py`` checks both store the same, on SQLite and
PostgreSQL).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import optuna
from optuna.distributions import (
    BaseDistribution,
    check_distribution_compatibility,
    distribution_to_json,
)
from optuna.trial import TrialState

from fpstune import trial_attrs

_Upsert = Callable[[Any, list[dict[str, Any]]], Any]
_Param = tuple[str, float, BaseDistribution]

#: The system attribute the optuna-dashboard reads constraints from: the older list form.
DASHBOARD_CONSTRAINTS_KEY = "constraints"
#: The prefix of the per-name keys ``Trial.set_constraint`` writes (Optuna reads both forms).
_CONSTRAINT_PREFIX = "constraints:"

try:
    from optuna.study._tell import _tell_with_warning

    _TELL = True
except ImportError:  # an Optuna without it: Study.tell
    _TELL = False

try:
    from optuna.storages._rdb import models as _models
    from optuna.storages._rdb.storage import _create_scoped_session

    _RDB_LAYER = True
except ImportError:  # an Optuna without this layout: the public API path
    _RDB_LAYER = False


def user_attrs_of(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation's attributes as trial user attributes: scalars each on their own, lists and
    mappings bundled into one ``details`` attribute (one value to write, not one per key)."""
    user = {k: v for k, v in attrs.items() if not isinstance(v, dict | list)}
    details = {k: v for k, v in attrs.items() if isinstance(v, dict | list)}
    if details:
        user[trial_attrs.DETAILS] = details
    return user


def counts_toward_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """A COMPLETE trial of the search; baseline trials (`fpstune baselines`) sit beside it."""
    return trial.state == TrialState.COMPLETE and "baseline" not in trial.user_attrs


def constraint_system_attrs(constraints: Mapping[str, float]) -> dict[str, Any]:
    """The system attributes of a trial's constraints (feasible when every value <= 0): one per
    name, as ``Trial.set_constraint`` writes them (what Optuna's samplers read), and the list the
    optuna-dashboard reads. Raises ValueError for NaN, as ``Trial.set_constraint`` does."""
    values = {name: float(v) for name, v in constraints.items()}
    for name, v in values.items():
        if math.isnan(v):
            raise ValueError(f"constraint {name!r} is NaN")
    attrs: dict[str, Any] = {f"{_CONSTRAINT_PREFIX}{name}": v for name, v in values.items()}
    if values:
        attrs[DASHBOARD_CONSTRAINTS_KEY] = list(values.values())
    return attrs


def tell_values(study: optuna.Study, trial: optuna.Trial, values: list[float]) -> None:
    """``study.tell(trial, values)``, less the copy of the told trial it returns."""
    if _TELL:
        _tell_with_warning(study=study, trial=trial, value_or_values=values)
    else:
        study.tell(trial, values)


class TrialWriter:
    """Batched writes to unfinished trials of one storage. Errors are what Optuna's setters
    raise (RuntimeError for a finished trial, ValueError for a distribution that does not match
    the study's, ``StorageInternalError`` for a database error); a failed batch writes nothing."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.storage = storage
        rdb = storage if isinstance(storage, optuna.storages.RDBStorage) else None
        usable = _RDB_LAYER and hasattr(rdb, "_set_trial_param_without_commit")
        self._rdb = rdb if usable else None
        self._upsert = _upsert_for(self._rdb.engine.name) if self._rdb is not None else None
        # Distributions already checked against the study's: later trials skip that query.
        self._dists: dict[str, BaseDistribution] = {}

    def attrs(
        self,
        trial_id: int,
        *,
        user: Mapping[str, Any] | None = None,
        system: Mapping[str, Any] | None = None,
    ) -> None:
        """Set user and system attributes of one trial."""
        user, system = dict(user or {}), dict(system or {})
        if self._rdb is None or self._upsert is None:
            for key, value in user.items():
                self.storage.set_trial_user_attr(trial_id, key, value)
            for key, value in system.items():
                self.storage.set_trial_system_attr(trial_id, key, value)
            return
        if not user and not system:
            return
        tables = (
            (_models.TrialUserAttributeModel, user),
            (_models.TrialSystemAttributeModel, system),
        )
        rows = {m: [_row(trial_id, k, v) for k, v in a.items()] for m, a in tables if a}
        with _create_scoped_session(self._rdb.scoped_session) as session:
            trial = _models.TrialModel.find_or_raise_by_id(trial_id, session)
            self._rdb.check_trial_is_updatable(trial_id, cast(TrialState, trial.state))
            for model, values in rows.items():
                session.execute(self._upsert(model, values))

    @contextmanager
    def hold_params(self, trial: optuna.Trial) -> Iterator[list[_Param]]:
        """Inside the block, the parameters suggested on ``trial`` are held in the list it
        yields, for ``write_params``, instead of written one by one."""
        if self._rdb is None:
            yield []
            return
        held = _HeldParams(trial.storage)
        # Trial.suggest_* write through this attribute (optuna/trial/_trial.py, _suggest); if a
        # future Optuna does not, nothing is held and each parameter is written as before.
        trial.storage = held  # type: ignore[assignment]
        try:
            yield held.params
        finally:
            trial.storage = held.inner

    def write_params(self, trial_id: int, params: list[_Param]) -> None:
        """Write held parameters in one transaction (the trial must be unfinished; each
        distribution must match the study's)."""
        if not params:
            return
        assert self._rdb is not None
        rdb = self._rdb
        with _create_scoped_session(rdb.scoped_session) as session:
            trial = _models.TrialModel.find_or_raise_by_id(trial_id, session)
            rdb.check_trial_is_updatable(trial_id, cast(TrialState, trial.state))
            for name, value, dist in params:
                known = self._dists.get(name)
                if known is None:
                    # First seen this run: Optuna's own code checks it against the study's.
                    rdb._set_trial_param_without_commit(session, trial_id, name, value, dist)
                    continue
                # What that code does once the distribution is known, less its SELECT per item.
                check_distribution_compatibility(known, dist)
                json_dist = distribution_to_json(dist)
                session.add(
                    _models.TrialParamModel(
                        trial_id=trial_id,
                        param_name=name,
                        param_value=value,
                        distribution_json=json_dist,
                    )
                )
        for name, _, dist in params:
            self._dists.setdefault(name, dist)


class _HeldParams:
    """Stands in for a trial's storage: holds parameter writes, passes everything else on."""

    def __init__(self, inner: optuna.storages.BaseStorage) -> None:
        self.inner = inner
        self.params: list[_Param] = []

    def set_trial_param(
        self, trial_id: int, name: str, value: float, distribution: BaseDistribution
    ) -> None:
        self.params.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _row(trial_id: int, key: str, value: Any) -> dict[str, Any]:
    return {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}


def _upsert_for(dialect: str) -> _Upsert | None:
    """The multi-row form of the upsert RDBStorage runs per attribute, or None where it has none
    (the public API path is used there)."""
    insert: Any
    if dialect == "mysql":
        from sqlalchemy.dialects.mysql import insert

        def on_duplicate(model: Any, rows: list[dict[str, Any]]) -> Any:
            stmt = insert(model).values(rows)
            return stmt.on_duplicate_key_update(value_json=stmt.inserted.value_json)

        return on_duplicate
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0):
        from sqlalchemy.dialects.sqlite import insert
    else:
        return None

    def on_conflict(model: Any, rows: list[dict[str, Any]]) -> Any:
        stmt = insert(model).values(rows)
        return stmt.on_conflict_do_update(
            index_elements=[model.trial_id, model.key],
            set_={"value_json": stmt.excluded.value_json},
        )

    return on_conflict
