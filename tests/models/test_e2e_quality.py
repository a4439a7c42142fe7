"""End-to-end quality on the embedded mini model (CPU, tiny settings) and its baselines."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from fpstune.baselines import NAMES, fixed_baselines, greedy_plan, reference_cells, run_baselines
from fpstune.evaluators import build_evaluator
from fpstune.kernels import AttentionSpec, Mode
from fpstune.kernels.fingerprint import current_fingerprint
from fpstune.kernels.policy import Policy
from fpstune.latency.table import AttentionShape
from fpstune.models import mini
from fpstune.quality.e2e import PSNR_CAP, EndToEndProbe, video_metrics
from fpstune.spec import load_study

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
    ev = build_evaluator(spec, stage="schedule", device="cpu")
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
    result = ev.evaluate({"stage": "schedule", "policy": fp8_all.to_dict()})
    assert {"psnr", "psnr_min", "ssim", "rel_l2", "latency_ms"} <= set(result.values)


def test_baselines_are_stored_marked_and_outside_the_budget(tmp_path: Path) -> None:
    study_file = _tiny_study(tmp_path)
    url = f"sqlite:///{tmp_path / 'b.db'}"
    first = run_baselines(study_file, storage_url=url, device="cpu")
    assert sorted(first) == sorted(NAMES)
    assert first["sta_window"]["latency_ms"] < first["fp8_dense_all"]["latency_ms"]
    assert all(10.0 < v["psnr"] < PSNR_CAP for v in first.values())
    again = run_baselines(study_file, storage_url=url, device="cpu")
    assert again == first  # stored once, not re-run
    study = optuna.load_study(study_name="mini-e2e:schedule", storage=url)
    marked = [t for t in study.trials if "baseline" in t.user_attrs]
    assert len(marked) == 4 == len(study.trials)
    assert all(t.state is optuna.trial.TrialState.COMPLETE for t in marked)
    assert study.metric_names == ["latency_ms", "psnr"]
