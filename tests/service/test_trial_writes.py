"""Batched trial writes store exactly what Optuna's own per-item setters store, in one transaction,
and a failed batch writes nothing."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from fpstune.run.trial_writes import TrialWriter, constraint_system_attrs, tell_values

USER = {"candidate": {"policy": {"entries": [1, 2]}}, "latency_source": "table", "n": 3}
CONS = {"rel_l2": -0.05, "cosine": 0.01}


@pytest.fixture(params=["sqlite", "postgresql"])
def rdb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[optuna.storages.RDBStorage]:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    storage = optuna.storages.RDBStorage(url)
    yield storage
    storage.engine.dispose()


def _study(storage: optuna.storages.BaseStorage) -> optuna.Study:
    return optuna.create_study(storage=storage, directions=["minimize", "minimize"])


def _commits(engine: sa.Engine) -> list[int]:
    n = [0]
    sa.event.listen(engine, "commit", lambda conn: n.__setitem__(0, n[0] + 1))
    return n


def _suggest(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "x": trial.suggest_float("x", 0.0, 1.0, step=0.25),
        "n": trial.suggest_int("n", 0, 4),
        "pattern": trial.suggest_categorical("pattern", ["window", "topk"]),
        "x_again": trial.suggest_float("x", 0.0, 1.0, step=0.25),  # the same value, not rewritten
    }


def test_attrs_in_one_transaction_store_what_optunas_setters_store(rdb) -> None:
    study = _study(rdb)
    by_optuna, batched = study.ask(), study.ask()
    for key, value in USER.items():
        by_optuna.set_user_attr(key, value)
    for name, value in CONS.items():
        by_optuna.set_constraint(name, value)
    rdb.set_trial_system_attr(by_optuna._trial_id, "constraints", list(CONS.values()))

    commits = _commits(rdb.engine)
    TrialWriter(rdb).attrs(batched._trial_id, user=USER, system=constraint_system_attrs(CONS))
    assert commits[0] == 1

    a, b = rdb.get_trial(by_optuna._trial_id), rdb.get_trial(batched._trial_id)
    assert b.user_attrs == a.user_attrs == USER
    assert b.system_attrs == a.system_attrs
    # Optuna's samplers read the per-name form; its older list form reads as "0", "1".
    assert b.constraints == {**CONS, "0": CONS["rel_l2"], "1": CONS["cosine"]}


def test_params_in_one_transaction_store_what_suggest_stores(rdb) -> None:
    study = optuna.create_study(storage=rdb, directions=["minimize"])
    writer = TrialWriter(rdb)
    for seed in (1, 2):  # names new to the writer, then known to it
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
        by_optuna = study.ask()
        expected = _suggest(by_optuna)
        study.sampler = optuna.samplers.RandomSampler(seed=seed)  # the same draws again
        batched = study.ask()
        commits = _commits(rdb.engine)
        with writer.hold_params(batched) as held:
            got = _suggest(batched)
        assert commits[0] == 0 and len(held) == 3  # nothing written yet
        writer.write_params(batched._trial_id, held)
        assert commits[0] == 1
        assert got == expected
        a, b = rdb.get_trial(by_optuna._trial_id), rdb.get_trial(batched._trial_id)
        assert (b.params, b.distributions) == (a.params, a.distributions)


@pytest.mark.parametrize("first_by", ["optuna", "writer"])
def test_a_param_whose_distribution_changed_is_refused(rdb, first_by: str) -> None:
    study = _study(rdb)
    writer = TrialWriter(rdb)
    first = study.ask()
    hold: AbstractContextManager[list[Any]] = nullcontext([])
    if first_by == "writer":
        hold = writer.hold_params(first)
    with hold as held:
        first.suggest_float("x", 0.0, 1.0)
    writer.write_params(first._trial_id, held)
    trial = study.ask()
    with writer.hold_params(trial) as held:
        trial.suggest_int("y", 0, 3)
        trial.suggest_categorical("x", ["a", "b"])  # "x" is a float in this study
    with pytest.raises(ValueError):
        writer.write_params(trial._trial_id, held)
    assert rdb.get_trial(trial._trial_id).params == {}  # "y" was not written either


def test_a_failing_batch_writes_nothing(rdb) -> None:
    study = _study(rdb)
    trial = study.ask()
    writer = TrialWriter(rdb)
    with pytest.raises(TypeError):  # the second value is not JSON
        writer.attrs(trial._trial_id, user={"ok": 1, "bad": object()})
    assert rdb.get_trial(trial._trial_id).user_attrs == {}

    study.tell(trial, [1.0, 2.0])
    with pytest.raises(RuntimeError, match="finished"):
        writer.attrs(trial._trial_id, user={"late": 1}, system={"late": 2})
    frozen = rdb.get_trial(trial._trial_id)
    assert "late" not in frozen.user_attrs and "late" not in frozen.system_attrs


def test_other_storages_get_one_write_per_item() -> None:
    storage = optuna.storages.InMemoryStorage()
    study = _study(storage)
    trial = study.ask()
    writer = TrialWriter(storage)
    writer.attrs(trial._trial_id, user=USER, system=constraint_system_attrs(CONS))
    with writer.hold_params(trial) as held:
        params = _suggest(trial)
    assert held == []  # written by suggest itself
    writer.write_params(trial._trial_id, held)
    frozen = storage.get_trial(trial._trial_id)
    assert frozen.user_attrs == USER and frozen.constraints["rel_l2"] == CONS["rel_l2"]
    assert frozen.params == {k: v for k, v in params.items() if k != "x_again"}


def test_constraints_are_floats_and_never_nan() -> None:
    attrs = constraint_system_attrs({"rel_l2": 1})
    assert attrs == {"constraints:rel_l2": 1.0, "constraints": [1.0]}
    assert constraint_system_attrs({}) == {}
    with pytest.raises(ValueError, match="rel_l2"):
        constraint_system_attrs({"rel_l2": math.nan})


def test_tell_values_stores_what_study_tell_stores_with_fewer_reads(rdb) -> None:
    study = _study(rdb)
    by_optuna, ours = study.ask(), study.ask()
    statements = [0]
    sa.event.listen(
        rdb.engine,
        "before_cursor_execute",
        lambda *a: statements.__setitem__(0, statements[0] + 1),
    )
    study.tell(by_optuna, [1.0, 2.0])
    by_study_tell, statements[0] = statements[0], 0
    tell_values(study, ours, [1.0, 2.0])
    assert statements[0] < by_study_tell
    a, b = rdb.get_trial(by_optuna._trial_id), rdb.get_trial(ours._trial_id)
    assert (b.state, b.values) == (a.state, a.values) == (TrialState.COMPLETE, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"finished|COMPLETE"):  # as study.tell: told once
        tell_values(study, ours, [3.0, 4.0])
