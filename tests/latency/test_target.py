"""`latency.target`: a proxy's schedule costed at the shape it stands in for, and saying so."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from fpstune.kernels import AttentionSpec, Mode
from fpstune.kernels.policy import Policy, Provenance
from fpstune.latency import AttentionShape, TableLatency, compose_with, packaged_table
from fpstune.latency.target import TargetShapeLatency
from fpstune.spec.study import load_study

MINI = load_study(Path(__file__).resolve().parents[2] / "studies" / "mini.yaml")
H100 = "NVIDIA H100 80GB HBM3"


def test_the_mini_study_costs_its_cells_at_720p_and_its_trials_say_so() -> None:
    model, target = MINI.model, MINI.latency.target
    assert target is not None  # README's main job: a front at 960 tokens is degenerate
    table = packaged_table(H100)
    inner = TableLatency(table, fingerprint=table.fingerprints()[0])
    per_call = TargetShapeLatency.for_model(inner, model, target)
    policy = Policy(
        model=model.shape(),
        hardware=inner.fingerprint,
        provenance=Provenance(
            study="t", created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), fpstune_version="0.1.0"
        ),
        default=AttentionSpec(mode=Mode.FP8_DENSE, tile=(1, 4, 8)),
    )
    at = AttentionShape(batch=1, heads=12, head_dim=128, grid=(21, 45, 80))
    row = inner.cost(AttentionSpec(mode=Mode.FP8_DENSE), at).median_ms
    got = compose_with(policy, per_call)
    cells = model.steps * model.layers * model.cfg
    assert got.total_ms == pytest.approx(row * 37.5 * cells)  # (30 x 50) / (4 x 10)
    attrs = json.loads(json.dumps(got.attrs()))
    assert attrs["latency_target"] == at.to_dict()
    assert [lk["method"].endswith("+at-target-x37.5") for lk in attrs["latency_lookups"]] == [True]
    # costed at its own shape, a trial names no target
    assert "latency_target" not in compose_with(policy, inner).attrs()
