"""The report's info objects against hand-made studies: front membership, knee points,
hypervolume (hand-computed), and the per-trial schedule and latency facts."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from dashboard_helpers import MINI, hand_made, mini_study

from fpstune.dashboard.info import front_info, hypervolume_info, knee_points
from fpstune.dashboard.tables import _row_label, latency_table_info, table_rows
from fpstune.dashboard.trials import latency_breakdown, schedule_info, trial_policy
from fpstune.export import pick_trial
from fpstune.kernels import AttentionSpec, HardwareFingerprint
from fpstune.latency.shape import AttentionShape
from fpstune.pinning import pin_kernels
from fpstune.spec.study import load_study
from fpstune.trial_attrs import study_spec

# (latency_ms, rel_l2): 0 A, 1 B, 2 C, 3 D (dominated by B), 4 E (dominates all, infeasible),
# 5 F (baseline, on the front), then one FAIL trial.
POINTS = [(1.0, 0.5), (2.0, 0.2), (3.0, 0.1), (2.5, 0.3), (0.5, 0.05), (4.0, 0.05)]


@pytest.fixture
def study() -> optuna.Study:
    return hand_made(POINTS, infeasible=[4], baselines={5: "sta_window"}, failed=1)


def test_front_holds_feasible_non_dominated_complete_trials(study: optuna.Study) -> None:
    info = front_info(study)
    assert [p.number for p in info.points] == [0, 1, 2, 3, 4, 5]  # the FAIL trial is not a point
    assert [p.number for p in info.front] == [0, 1, 2, 5]  # sorted by latency
    assert [p.feasible for p in info.points] == [True, True, True, True, False, True]
    assert [p.baseline for p in info.baselines] == ["sta_window"]
    assert info.metric_names == ("latency_ms", "rel_l2")


def test_knee_points_by_distance_to_the_ideal_point(study: optuna.Study) -> None:
    # distance after scaling over the front:
    # A (0, 1) -> 1, B (1/3, 1/3) -> 2/9, C (2/3, 1/9) -> 0.457, F (1, 0) -> 1
    assert front_info(study).knees == (1, 2, 0)
    assert front_info(study, knees=1).knees == (1,)
    assert knee_points([], study.directions) == ()


@pytest.mark.parametrize("seed", range(8))
def test_first_knee_is_what_export_picks(seed: int) -> None:
    rng = random.Random(seed)
    points = [(rng.uniform(1, 100), rng.uniform(0.01, 0.3)) for _ in range(rng.randint(1, 30))]
    infeasible = [i for i in range(len(points)) if rng.random() < 0.3]
    if len(infeasible) == len(points):
        infeasible = infeasible[1:]
    study = hand_made(points, infeasible=infeasible)
    assert front_info(study).knees[0] == pick_trial(study).number


def test_hypervolume_history_by_hand(study: optuna.Study) -> None:
    hv = hypervolume_info(front_info(study))
    # worst feasible (4, 0.5), best (1, 0.05): reference 10 % of the range beyond the worst
    assert hv.reference_point == pytest.approx((4.3, 0.545))
    assert hv.trial_numbers == (0, 1, 2, 3, 4, 5)
    # A alone 3.3 x 0.045; + B; + C; D dominated; E infeasible; + F (the baseline)
    expected = (0.1485, 0.8385, 0.9685, 0.9685, 0.9685, 0.9835)
    assert hv.values == pytest.approx(expected)
    assert hv.baselines == pytest.approx(0.3 * 0.495)


def test_hypervolume_with_a_maximised_objective_and_a_given_reference() -> None:
    study = hand_made([(1.0, 30.0), (2.0, 35.0), (2.5, 10.0)], directions=("minimize", "maximize"))
    hv = hypervolume_info(front_info(study), reference_point=(3.0, 20.0))
    # (3-1)(30-20) + (3-2)(35-30); the third point is worse than the reference: adds nothing
    assert hv.values == pytest.approx((20.0, 25.0, 25.0))
    assert hv.reference_point == pytest.approx((3.0, 20.0))
    assert hv.baselines is None


def test_a_study_with_only_infeasible_trials_has_no_front() -> None:
    info = front_info(hand_made([(1.0, 0.5), (2.0, 0.1)], infeasible=[0, 1]))
    assert info.front == () and info.knees == ()
    assert hypervolume_info(info).values == (0.0, 0.0)


def test_schedule_and_latency_of_a_stored_trial(tmp_path: Path) -> None:
    study = mini_study(f"sqlite:///{tmp_path / 's.db'}", trials=3)
    spec = study_spec(study.user_attrs)
    assert spec is not None and spec.name == "mini"
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        policy = trial_policy(t, spec)
        assert policy is not None
        info = schedule_info(policy, trial=t.number)
        assert (info.steps, info.layers) == (spec.model.steps, spec.model.layers)
        for step in range(info.steps):
            for layer in range(info.layers):
                cell = policy.spec(layer=layer, step=step)
                assert info.modes[step][layer] == cell.mode
                assert info.sparsity[step][layer] == cell.sparsity
        b = latency_breakdown(t)
        assert b is not None and b.source == "table" and b.row_source == "measured"
        assert b.total_ms == pytest.approx(t.values[0])  # the split adds up to the objective
        assert sum(b.by_mode().values()) == pytest.approx(t.values[0])
        assert b.fingerprint is not None and b.fingerprint.gpu.startswith("NVIDIA")


def test_a_trial_without_a_stored_policy_is_rebuilt_from_its_params(tmp_path: Path) -> None:
    study = mini_study(f"sqlite:///{tmp_path / 's.db'}", trials=2)
    spec = load_study(MINI)
    t = study.trials[0]
    bare = optuna.trial.create_trial(
        values=t.values, params=t.params, distributions=t.distributions
    )
    stored, rebuilt = trial_policy(t, spec), trial_policy(bare, spec)
    assert stored is not None and rebuilt is not None
    assert rebuilt.spec_table() == stored.spec_table()
    assert trial_policy(bare, None) is None and latency_breakdown(bare) is None
    # `fpstune baselines` stores its hand-set policy as the ``policy`` attribute
    baseline = optuna.trial.create_trial(
        values=t.values, user_attrs={"baseline": "x", "policy": stored.to_dict()}
    )
    from_attr = trial_policy(baseline, None)
    assert from_attr is not None and from_attr.spec_table() == stored.spec_table()


def test_latency_table_keeps_the_study_shape_and_gpu_only(tmp_path: Path) -> None:
    study = mini_study(f"sqlite:///{tmp_path / 's.db'}", trials=1)
    t = study.trials[0]
    fp = HardwareFingerprint.model_validate(t.user_attrs["details"]["latency_fingerprint"])
    rows, origin = table_rows(f"sqlite:///{tmp_path / 's.db'}", fp)
    assert origin.endswith(".json")  # no kernel stage in this storage: the shipped table
    spec = load_study(MINI)
    shape = AttentionShape.of_model(spec.model, batch=1)
    info = latency_table_info(rows, shape=shape, fingerprint=fp, origin=origin)
    assert info is not None
    mine = [r for r in rows if r.shape == shape]
    assert len(mine) < len(rows)  # the table has other shapes (Wan 720p); they are left out
    for label, ms in zip(info.rows, info.ms, strict=True):
        for s, v in zip(info.sparsities, ms, strict=True):
            cell = [
                r.median_ms for r in mine if _row_label(r) == label and abs(r.sparsity - s) < 1e-9
            ]
            assert v == (min(cell) if cell else None)
    other = fp.model_copy(update={"gpu": "NVIDIA A100-SXM4-80GB"})
    assert latency_table_info(rows, shape=shape, fingerprint=other, origin=origin) is None


def test_kernel_pinning_uses_the_rows_the_latency_came_from(tmp_path: Path) -> None:
    study = mini_study(f"sqlite:///{tmp_path / 's.db'}", trials=4)
    pinned_any = False
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        policy = trial_policy(t, None)
        assert policy is not None
        lookups = t.user_attrs["details"]["latency_lookups"]
        used = [AttentionSpec.from_dict(lk["used"]) for lk in lookups]
        pinned = pin_kernels(policy, lookups)
        assert pin_kernels(policy, []) == policy  # nothing looked up: unchanged
        for spec in {s for row in pinned.spec_table() for s in row}:
            if spec.kernel is not None:
                pinned_any = True
                assert any(u.kernel == spec.kernel and u.tile == spec.tile for u in used)
    assert pinned_any


def test_the_dashboard_never_imports_the_worker_side(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    mini_study(url, trials=2)
    code = f"""
import os, sys
import optuna
from optuna.artifacts import FileSystemArtifactStore
from fpstune.dashboard.annotate import annotate_storage
from fpstune.dashboard.report import render_html, report_info
store = {str(tmp_path / "a")!r}
os.makedirs(store)
r = annotate_storage(optuna.storages.RDBStorage({url!r}),
                     artifact_store=FileSystemArtifactStore(store), storage_label="x")
assert r.artifacts > 0, r
render_html(report_info("mini", storage_url={url!r}))
heavy = ("ray", "fpstune.run.worker", "fpstune.run.controller", "fpstune.stages.evaluators",
         "fpstune.export")
print(sorted(m for m in heavy if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
