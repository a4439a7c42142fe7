"""README's main job, `fpstune study run studies/mini.yaml`, on a small budget: a real front,
costed at the 720p shape the mini stands in for (`latency.target`), and an exportable pick."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from fpstune.export import export_policy
from fpstune.kernels.policy import Policy, PolicyError
from fpstune.latency import AttentionShape
from fpstune.run.runner import run_study
from fpstune.spec.study import load_study

MINI = Path(__file__).resolve().parents[2] / "studies" / "mini.yaml"

pytestmark = [
    pytest.mark.usefixtures("ray_cluster"),
    pytest.mark.slow,
    # the pick is loaded off its GPU on purpose (the policy names the latency table's GPU)
    pytest.mark.filterwarnings("ignore::fpstune.kernels.policy.PolicyWarning"),
]


def test_the_mini_study_has_a_front_costed_at_its_target_shape(tmp_path: Path) -> None:
    spec = load_study(MINI)
    target = spec.latency.target
    assert target is not None
    url = f"sqlite:///{tmp_path / 'mini.db'}"
    [summary] = run_study(MINI, storage_url=url, workers=1, trials=12, progress=False)
    assert summary.complete == 12

    study = optuna.load_study(study_name="mini:schedule", storage=url)
    at = AttentionShape(batch=1, heads=target.heads, head_dim=target.head_dim, grid=target.grid)
    scale = target.layers * target.steps / (spec.model.layers * spec.model.steps)
    for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        details = t.user_attrs["details"]
        assert t.user_attrs["latency_source"] == "table"
        assert details["latency_target"] == at.to_dict()
        assert all(
            lk["method"].endswith(f"+at-target-x{scale:g}") for lk in details["latency_lookups"]
        )
    # feasible (rel_l2 within the study's bound) and more than the degenerate two points
    front = [t for t in study.best_trials if t.user_attrs["constraints"]["rel_l2"] <= 0]
    assert len(front) == len(study.best_trials) > 2
    latencies = sorted(t.values[0] for t in front)
    assert latencies[0] < latencies[-1]

    # README's sequence: export a pick, then load it as the runtime does
    worst = max(t.values[1] for t in front)
    out = export_policy("mini", storage_url=url, output=tmp_path / "p.yaml", min_quality=worst)
    assert out.latency_source == "table"
    policy = Policy.load(out.output, allow_other_gpu=True)
    assert policy.hardware.gpu == details["latency_fingerprint"]["gpu"]
    if not torch.cuda.is_available():  # stamped with the table's GPU: refused here without it
        with pytest.raises(PolicyError, match="tuned on"):
            Policy.load(out.output)
