"""`TrialWriter`'s contract (fpstune/run/trial_writes.py), on every backend: batched trial writes
store exactly what Optuna's own per-item setters store, in one transaction; attributes are
upserted; a failed batch writes nothing. Moved here from tests/service/test_trial_writes.py."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from fpstune.run.trial_writes import TrialWriter, constraint_system_attrs, tell_values

USER = {"candidate": {"policy": {"entries": [1, 2]}}, "latency_source": "table", "n": 3}
CONS = {"rel_l2": -0.05, "cosine": 0.01}
RDB = optuna.storages.RDBStorage


@pytest.fixture
def rdb(db_url: str) -> Iterator[optuna.storages.RDBStorage]:
    storage = optuna.storages.RDBStorage(db_url)
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


class TestTrialWriterContract:
    """What the controller relies on when it writes a trial through `TrialWriter`."""

    def test_attrs_in_one_transaction_store_what_optunas_setters_store(self, rdb: RDB) -> None:
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

    def test_params_in_one_transaction_store_what_suggest_stores(self, rdb: RDB) -> None:
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
    def test_a_param_whose_distribution_changed_is_refused(self, rdb: RDB, first_by: str) -> None:
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

    def test_a_failing_batch_writes_nothing(self, rdb: RDB) -> None:
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

    def test_tell_values_stores_what_study_tell_stores_with_fewer_reads(self, rdb: RDB) -> None:
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

    def test_an_attribute_written_again_is_replaced(self, rdb: RDB) -> None:
        """Upsert, as Optuna's setters: the last value of a key stays, one row per key."""
        trial = _study(rdb).ask()
        writer = TrialWriter(rdb)
        writer.attrs(trial._trial_id, user={"n": 1, "keep": "a"}, system={"s": [1]})
        writer.attrs(trial._trial_id, user={"n": 2}, system={"s": [2, 3]})
        frozen = rdb.get_trial(trial._trial_id)
        assert frozen.user_attrs == {"n": 2, "keep": "a"} and frozen.system_attrs["s"] == [2, 3]
        with rdb.engine.connect() as c:
            rows = c.execute(sa.text("SELECT COUNT(*) FROM trial_user_attributes")).scalar_one()
        assert rows == 2

    def test_controllers_writing_one_study_at_once(self, rdb: RDB, db_url: str) -> None:
        """A server database takes many controllers (`controller_lock` keeps one per SQLite
        file): writers of their own trials of one study, at once, each store what they wrote."""
        if rdb.engine.name == "sqlite":
            pytest.skip("one controller per SQLite file (fpstune.storage.controller_lock)")
        name = _study(rdb).study_name
        errors: list[BaseException] = []

        def controller(n: int) -> None:
            storage = optuna.storages.RDBStorage(db_url)
            try:
                study = optuna.load_study(
                    study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(n)
                )
                writer = TrialWriter(storage)
                for i in range(5):
                    trial = study.ask()
                    with writer.hold_params(trial) as held:
                        got = _suggest(trial)
                    writer.write_params(trial._trial_id, held)
                    writer.attrs(trial._trial_id, user={"by": n, "i": i, **got})
                    tell_values(study, trial, [float(n), float(i)])
            except BaseException as e:
                errors.append(e)
            finally:
                storage.engine.dispose()

        threads = [threading.Thread(target=controller, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == []
        trials = optuna.load_study(study_name=name, storage=rdb).trials
        assert sorted((t.user_attrs["by"], t.user_attrs["i"]) for t in trials) == [
            (n, i) for n in range(3) for i in range(5)
        ]
        for t in trials:
            assert t.values == [t.user_attrs["by"], t.user_attrs["i"]]
            assert {k: t.user_attrs[k] for k in t.params} == t.params


# -- without a database ------------------------------------------------------------------------


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
