"""The trial budget, enforced by the storage rather than by each controller.

Several controllers may share one PostgreSQL study; each counting on its own overshoots (two
controllers with ``--trials 20`` ended at 25/20). So a trial is asked only inside a *claim*: a
transaction that holds the study's budget lock, counts the trials that hold a slot (COMPLETE
search trials and RUNNING ones) and lets the ask through only below the budget. The ask commits
(its trial is RUNNING) before the lock goes, so the next claimant counts it.

- PostgreSQL: a transaction-scoped advisory lock keyed by the study (``pg_advisory_xact_lock``),
  taken on a connection of its own: Optuna's ask locks the study's row, which this must not.
- SQLite: a file has one controller (`fpstune.storage.controller_lock`), so the count alone is
  enough; a lock here would block the ask's own writes.

Re-queued (WAITING) trials are taken first by the ask, through the same claim: they count once
they run, like any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from optuna.storages._rdb import models  # Optuna's RDB tables (no public API for a count)
from optuna.trial import TrialState

#: The first key of the advisory lock: fpstune's budget locks (the second is the study id).
LOCK_CLASS = 0x0F75


def slots_taken(conn: sa.Connection, study_id: int) -> int:
    """Trials of the study holding a slot: COMPLETE search trials (not baselines) and RUNNING."""
    trials = models.TrialModel.__table__
    attrs = models.TrialUserAttributeModel.__table__
    baseline = (
        sa.select(attrs.c.trial_user_attribute_id)
        .where(attrs.c.trial_id == trials.c.trial_id, attrs.c.key == "baseline")
        .exists()
    )
    query = (
        sa.select(sa.func.count())
        .select_from(trials)
        .where(
            trials.c.study_id == study_id,
            sa.or_(
                trials.c.state == TrialState.RUNNING,
                sa.and_(trials.c.state == TrialState.COMPLETE, ~baseline),
            ),
        )
    )
    return int(conn.execute(query).scalar_one())


@contextlib.contextmanager
def claim_slot(engine: sa.Engine, study_id: int, budget: int) -> Iterator[bool]:
    """Yields whether one more trial fits in the budget; ask it inside the block (the lock is
    held until the block ends)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(LOCK_CLASS, study_id)))
        yield slots_taken(conn, study_id) < budget
