"""End-to-end quality on the embedded mini model (CPU, tiny settings) and its baselines."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from shared_helpers import fpstune

from fpstune.baselines import (
    NAMES,
    baseline_params,
    fixed_baselines,
    greedy_plan,
    reference_cells,
    run_baselines,
)
from fpstune.kernels import AttentionSpec, Mode, default_tile
from fpstune.kernels.fingerprint import current_fingerprint
from fpstune.kernels.policy import Policy, Provenance
from fpstune.latency.shape import AttentionShape
from fpstune.models import mini
from fpstune.quality.e2e import PSNR_CAP, EndToEndProbe, video_metrics
from fpstune.spec import load_study
from fpstune.spec.space import FloatParam
from fpstune.stages.candidates import ScheduleCandidate
from fpstune.stages.evaluators import build_schedule_evaluator
from fpstune.stages.schedule_space import schedule_from_params

ROOT = Path(__file__).resolve().parents[2]


def _tiny_study(tmp_path: Path, trials: int = 2) -> Path:
    data = yaml.safe_load((ROOT / "studies" / "mini-e2e.yaml").read_text())
    data["model"]["steps"] = 2
    data["end_to_end"]["seeds"] = [5]
    data["trials"]["schedule"] = trials
    data["calibration"]["max_tokens"] = 64
    for key in ("kernel_space", "schedule_space"):
        data[key] = str(ROOT / "studies" / data[key])
    path = tmp_path / "tiny-e2e.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def probe() -> EndToEndProbe:
    model = mini.build_mini()
    return EndToEndProbe(model, mini.conditions([5]), mini.sampling(steps=2), key=None)


def _policy(spec: AttentionSpec, steps: int = 2) -> Policy:
    shape = mini.GRID
    model = load_study(ROOT / "studies" / "mini-e2e.yaml").model.shape()
    model = model.model_copy(update={"steps": steps, "grid": shape})
    return Policy(model=model, hardware=current_fingerprint(torch.device("cpu")), default=spec)


def test_reference_is_bit_stable_and_scores_itself_perfect(probe: EndToEndProbe) -> None:
    again = EndToEndProbe(mini.build_mini(), probe.conditions, probe.sampling, key=None)
    assert torch.equal(again.reference, probe.reference)
    r = probe.measure(_policy(AttentionSpec(mode=Mode.BF16_DENSE)))
    assert r.values == {"psnr": PSNR_CAP, "psnr_min": PSNR_CAP, "ssim": pytest.approx(1.0)}


def test_fp8_and_sparse_cost_quality_and_every_cell_is_tracked(probe: EndToEndProbe) -> None:
    dense = probe.measure(_policy(AttentionSpec(mode=Mode.FP8_DENSE)))
    sparse = probe.measure(
        _policy(
            AttentionSpec.from_dict(
                {"mode": "fp8_sparse", "sparsity": 0.9, "pattern": {"kind": "window"}}
            )
        )
    )
    assert 15.0 < dense.values["psnr"] < PSNR_CAP
    assert sparse.values["psnr"] < dense.values["psnr"] - 3.0  # 90 % of the tiles dropped
    cells = {tuple(c) for c, _ in dense.attrs["cell_rel_l2"]}
    assert cells == {(layer, step) for layer in range(4) for step in range(2)}
    assert all(0 < e < 0.2 for _, e in dense.attrs["cell_rel_l2"])


def test_video_metrics_against_a_known_noise_level() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 5, 24, 32, generator=g) * 1.6 - 0.8
    noise = torch.randn(ref.shape, generator=g) * 0.02
    m = video_metrics(ref + noise, ref)
    expect = 10 * math.log10(2.0**2 / 0.02**2)  # PSNR of N(0, 0.02) noise at range 2
    assert m["psnr"] == pytest.approx([expect, expect], abs=0.3)
    assert 0.9 < m["ssim"] < 1.0


def test_reference_cells_and_greedy_plan(probe: EndToEndProbe) -> None:
    cells = reference_cells(probe)
    assert sorted(cells) == [(layer, step) for layer in range(4) for step in range(2)]
    assert all(t.shape == (2, 4, 960, 64) for t in cells[(0, 0)])  # CFG-batched
    model = _policy(AttentionSpec(mode=Mode.BF16_DENSE)).model
    hw = current_fingerprint(torch.device("cpu"))
    strict, _ = greedy_plan(model, hw, cells, grid=mini.GRID, threshold=0.0)
    assert all(s.mode is Mode.BF16_DENSE for row in strict.spec_table() for s in row)
    loose, notes = greedy_plan(model, hw, cells, grid=mini.GRID, threshold=10.0)
    assert all(s.sparsity == 0.9 for row in loose.spec_table() for s in row)
    assert len(notes["cells"]) == 8


def test_target_shape_latency_costs_the_720p_generation(tmp_path: Path) -> None:
    spec = load_study(_tiny_study(tmp_path))
    ev = build_schedule_evaluator(spec, device="cpu")
    fp8_all = fixed_baselines(spec.model.shape(), current_fingerprint())["fp8_dense_all"]
    composed = ev.latency.cost(
        AttentionSpec(mode=Mode.BF16_DENSE), AttentionShape.of_model(spec.model)
    )
    target = spec.latency.target
    assert target is not None
    scale = target.layers * target.steps / (spec.model.layers * spec.model.steps)
    inner = ev.latency.inner.cost(  # type: ignore[attr-defined]
        AttentionSpec(mode=Mode.BF16_DENSE),
        AttentionShape(batch=1, heads=12, head_dim=128, grid=(21, 45, 80)),
    )
    assert composed.median_ms == pytest.approx(inner.median_ms * scale)
    assert inner.median_ms > 20.0  # a 720p SDPA call on the H100, not a 960-token one
    result = ev.evaluate(ScheduleCandidate(fp8_all))
    assert {"psnr", "psnr_min", "ssim", "rel_l2", "latency_ms"} <= set(result.values)


def _cells(policy: Policy, tile: tuple[int, int, int]) -> list[list[AttentionSpec]]:
    """Every cell's spec, with an unset tile read as ``tile`` (what the runtime runs)."""
    return [
        [
            s if s.mode is Mode.BF16_DENSE or s.tile else s.model_copy(update={"tile": tile})
            for s in row
        ]
        for row in policy.spec_table()
    ]


def test_baseline_params_rebuild_the_hand_set_schedules_exactly() -> None:
    """The mini-e2e space holds the three hand-set schedules: their parameters rebuild each one
    cell by cell; a space without the default tile, or whose grid misses a phase boundary,
    leaves the baselines it cannot express out."""
    spec = load_study(ROOT / "studies" / "mini-e2e.yaml")
    model, space, hw = spec.model.shape(), spec.schedule_space, current_fingerprint()
    tile = default_tile(model.grid)
    params = baseline_params(space, model)
    fixed = fixed_baselines(model, hw)
    assert sorted(params) == sorted(fixed)
    for name, p in params.items():
        made = Provenance(study="t", created=datetime.now(UTC), fpstune_version="0")
        rebuilt = schedule_from_params(p, space, model, hardware=hw, provenance=made)
        assert _cells(rebuilt, tile) == _cells(fixed[name], tile), name
    others = tuple(t for t in space.sparse.tile if t != tile)
    no_tile = space.model_copy(update={"sparse": space.sparse.model_copy(update={"tile": others})})
    assert baseline_params(no_tile, model) == {}
    # STA's BF16 phase is ceil(0.25 * 10) = 3 steps: a bf16_until grid ending at 0.2 misses it.
    phases = space.phases.model_copy(update={"bf16_until": FloatParam(low=0.0, high=0.2, step=0.1)})
    short = space.model_copy(update={"phases": phases})
    assert sorted(baseline_params(short, model)) == ["fp8_dense_all", "fpsattention_3phase"]


def test_the_search_starts_from_the_baselines_and_they_are_stored_marked(tmp_path: Path) -> None:
    """``sampler.start_from_baselines``: the run's first trials are the baselines' schedules (a
    real Ray worker), scored as `fpstune baselines` then scores the same schedules in-process;
    the baselines are stored once, marked, outside the search budget."""
    study_file = _tiny_study(tmp_path, trials=4)
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = load_study(study_file)
    expected = baseline_params(spec.schedule_space, spec.model.shape())
    assert len(expected) == 3  # at 2 steps too
    run = fpstune("study", "run", str(study_file), "--storage", url, "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    study = optuna.load_study(study_name="mini-e2e:schedule", storage=url)
    searched = study.trials
    assert len(searched) == 4
    assert [t.params for t in searched[:3]] == list(expected.values())
    assert [t.user_attrs["queued_as"] for t in searched[:3]] == [f"baseline {n}" for n in expected]
    assert "queued_as" not in searched[3].user_attrs  # the sampler's own pick

    stored = run_baselines(study_file, storage_url=url, device="cpu")
    assert sorted(stored) == sorted(NAMES)
    assert stored["sta_window"]["latency_ms"] < stored["fp8_dense_all"]["latency_ms"]
    assert all(10.0 < v["psnr"] < PSNR_CAP for v in stored.values())
    for t, name in zip(searched, expected, strict=False):
        assert t.values[0] == pytest.approx(stored[name]["latency_ms"], rel=1e-9), name
        assert t.values[1] == pytest.approx(stored[name]["psnr"], abs=0.05), name
    again = run_baselines(study_file, storage_url=url, device="cpu")
    assert again == stored  # stored once, not re-run
    marked = [t for t in study.get_trials() if "baseline" in t.user_attrs]
    assert len(marked) == 4 and len(study.get_trials()) == 8
    assert all(t.state is optuna.trial.TrialState.COMPLETE for t in marked)
    assert study.metric_names == ["latency_ms", "psnr"]
