"""Evaluators: the schedule stage on the synthetic mini set (CPU), the kernel stage's refusals."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from shared_helpers import H100

from fpstune.kernels import AttentionSpec, KernelConfig, Mode, attention
from fpstune.kernels.policy import ModelShape, Policy, PolicyEntry, Provenance
from fpstune.latency import AttentionShape, LatencyTable, TableLatency, Timing, compose
from fpstune.quality import AttentionProbe, CalibrationSet, synthetic_calibration
from fpstune.stages.candidates import KernelCandidate, ScheduleCandidate
from fpstune.stages.evaluation import CandidateError
from fpstune.stages.evaluators import KernelEvaluator, ScheduleEvaluator, build_schedule_evaluator
from fpstune.stages.kernel import KernelStage
from fpstune.stages.kernel_space import kernel_buckets

MINI = ModelShape(name="mini", heads=4, head_dim=64, layers=4, grid=(5, 12, 16), steps=10, cfg=2)
SHAPE = AttentionShape.of_model(MINI)
TILE = (1, 4, 8)
K32 = KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)
FP8 = AttentionSpec(mode=Mode.FP8_DENSE, tile=TILE)
SPARSE = AttentionSpec.from_dict(
    {"mode": "fp8_sparse", "sparsity": 0.75, "tile": list(TILE), "pattern": {"kind": "window"}}
)
REPO = Path(__file__).resolve().parents[1]


def timing(ms: float) -> Timing:
    return Timing(median_ms=ms, iqr_ms=0.01, reps=20, warmup=5, method="cuda-events+flush-l2")


@pytest.fixture(scope="module")
def table() -> LatencyTable:
    t = LatencyTable.in_memory()
    t.record(fingerprint=H100, shape=SHAPE, spec=BF16, timing=timing(2.0))
    t.record(
        fingerprint=H100,
        shape=SHAPE,
        spec=FP8.model_copy(update={"kernel": K32}),
        timing=timing(1.2),
    )
    for s, ms in ((0.5, 0.9), (0.75, 0.6), (0.9, 0.4)):
        spec = SPARSE.model_copy(update={"sparsity": s, "kernel": K32})
        t.record(fingerprint=H100, shape=SHAPE, spec=spec, timing=timing(ms))
    return t


@pytest.fixture(scope="module")
def calibration() -> CalibrationSet:
    # the mini model's shape, two layers x two steps, on a grid capped for CPU speed
    return synthetic_calibration(MINI, seed=0, layers=[0, 3], steps=[0, 9], max_tokens=384)


@pytest.fixture(scope="module")
def evaluator(table: LatencyTable, calibration: CalibrationSet) -> ScheduleEvaluator:
    return ScheduleEvaluator(
        MINI,
        calibration,
        latency=TableLatency(table, fingerprint=H100),
        constraints=[{"name": "rel_l2", "max": 0.05}, {"name": "cosine", "min": 0.99}],
        device="cpu",
    )


def make_policy(default: AttentionSpec, entries: tuple[PolicyEntry, ...] = ()) -> Policy:
    return Policy(
        model=MINI,
        hardware=H100,
        provenance=Provenance(
            study="test", created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), fpstune_version="0.1.0"
        ),
        default=default,
        entries=entries,
    )


def candidate(policy: Policy) -> ScheduleCandidate:
    return ScheduleCandidate(policy)


def test_quality_orders_bf16_fp8_sparse(evaluator: ScheduleEvaluator) -> None:
    dense = evaluator.evaluate(candidate(make_policy(BF16)))
    fp8 = evaluator.evaluate(candidate(make_policy(FP8)))
    sparse = evaluator.evaluate(candidate(make_policy(SPARSE)))

    assert dense.values["rel_l2"] == pytest.approx(0.0, abs=1e-12)
    assert dense.values["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < fp8.values["rel_l2"] < 0.1
    assert fp8.values["rel_l2"] < sparse.values["rel_l2"]
    assert sparse.values["cosine"] < fp8.values["cosine"] < 1.0
    for ev in (dense, fp8, sparse):
        assert ev.values["rel_l2"] <= ev.values["rel_l2_max"]

    cells = MINI.steps * MINI.layers * MINI.cfg
    assert dense.values["latency_ms"] == pytest.approx(2.0 * cells)
    assert fp8.values["latency_ms"] == pytest.approx(1.2 * cells)
    assert sparse.values["latency_ms"] == pytest.approx(0.6 * cells)

    assert dense.constraints["rel_l2"] == pytest.approx(-0.05)
    assert dense.constraints["cosine"] == pytest.approx(0.99 - 1.0)
    assert sparse.constraints["rel_l2"] == pytest.approx(sparse.values["rel_l2"] - 0.05)
    assert sparse.constraints["rel_l2"] > 0


def test_attrs_are_json_and_keyed_by_cell(evaluator: ScheduleEvaluator) -> None:
    mixed = make_policy(
        BF16,
        (
            PolicyEntry(steps=(5, 10), layers=(0, 4), spec=FP8),
            PolicyEntry(steps=(0, 5), layers=(3, 4), spec=SPARSE),
        ),
    )
    ev = evaluator.evaluate(candidate(mixed))
    attrs = json.loads(json.dumps(ev.attrs))
    assert attrs == ev.attrs
    assert attrs["latency_source"] == "table"
    assert attrs["latency_fingerprint"]["gpu"] == H100.gpu
    cell_rel = {tuple(cell): v for cell, v in attrs["cell_rel_l2"]}
    assert set(cell_rel) == {(0, 0), (0, 9), (3, 0), (3, 9)}
    assert cell_rel[(0, 0)] == 0.0  # bf16_dense cell
    assert cell_rel[(3, 0)] > cell_rel[(0, 9)] > 0.0  # sparse cell > fp8 cell
    assert ev.values["rel_l2"] == pytest.approx(sum(cell_rel.values()) / 4, rel=1e-5)
    assert ev.values["rel_l2_max"] == pytest.approx(cell_rel[(3, 0)], rel=1e-5)
    assert set(attrs["latency_by_mode_ms"]) == {"bf16_dense", "fp8_dense", "fp8_sparse"}
    assert attrs["metrics"]["latency_ms"] == ev.values["latency_ms"]
    assert attrs["calibration"]["grid"] != list(MINI.grid)  # the capped proxy says so


def test_latency_matches_compose(evaluator: ScheduleEvaluator, table: LatencyTable) -> None:
    policy = make_policy(
        FP8,
        (
            PolicyEntry(
                steps=(4, 10), layers=(1, 3), spec=SPARSE.model_copy(update={"sparsity": 0.8})
            ),
        ),
    )
    ev = evaluator.evaluate(candidate(policy))
    assert ev.values["latency_ms"] == pytest.approx(
        compose(policy, table, fingerprint=H100).total_ms
    )


def test_nan_output_is_a_candidate_error_and_the_evaluator_stays_usable(
    table: LatencyTable, calibration: CalibrationSet
) -> None:
    def nan_for_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Any:
        out = attention(q, k, v, **kw)
        return out * float("nan") if kw["spec"].mode.sparse else out

    probe = AttentionProbe(calibration, attention_fn=nan_for_sparse)
    ev = ScheduleEvaluator(
        MINI, None, latency=TableLatency(table, fingerprint=H100), probes=[probe]
    )
    with pytest.raises(CandidateError, match=r"layer 0, step 0 \(fp8_sparse.*\): .*NaN"):
        ev.evaluate(candidate(make_policy(SPARSE)))
    ok = ev.evaluate(candidate(make_policy(BF16)))
    assert ok.values["rel_l2"] == 0.0


def test_bad_candidates_are_candidate_errors(evaluator: ScheduleEvaluator) -> None:
    # stored candidates (what export re-evaluates) are checked as they are read
    with pytest.raises(CandidateError, match="schedule candidate"):
        ScheduleCandidate.from_attr({"stage": "kernel", "spec": {"mode": "fp8_dense"}})
    broken = candidate(make_policy(BF16)).to_attr()
    broken["policy"]["default"] = {"mode": "fp9"}
    with pytest.raises(CandidateError, match=r"default\.mode"):
        ScheduleCandidate.from_attr(broken)
    other = make_policy(BF16).replace(model=MINI.model_copy(update={"steps": 20}))
    with pytest.raises(CandidateError, match=r"model\.steps is 20.* has 10"):
        evaluator.evaluate(candidate(other))
    below = SPARSE.model_copy(update={"sparsity": 0.3})
    with pytest.raises(CandidateError, match="no sparsity bucket at or below"):
        evaluator.evaluate(candidate(make_policy(below)))
    assert evaluator.evaluate(candidate(make_policy(BF16))).values["rel_l2"] == 0.0


def test_set_up_mistakes_are_value_errors(table: LatencyTable, calibration: CalibrationSet) -> None:
    lat = TableLatency(table, fingerprint=H100)
    with pytest.raises(ValueError, match="constraint on 'psnr'"):
        ScheduleEvaluator(MINI, calibration, latency=lat, constraints=[{"name": "psnr", "max": 1}])
    with pytest.raises(ValueError, match="exactly one of max or min"):
        ScheduleEvaluator(MINI, calibration, latency=lat, constraints=[{"name": "rel_l2"}])
    big = MINI.model_copy(update={"grid": (21, 30, 52)})
    with pytest.raises(ValueError, match="grid"):
        ScheduleEvaluator(big, calibration, latency=lat)
    empty = TableLatency(LatencyTable.in_memory(), fingerprint=H100)
    with pytest.raises(ValueError, match="latency table cannot serve this model"):
        ScheduleEvaluator(MINI, calibration, latency=empty)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        ScheduleEvaluator(MINI, calibration, latency="measure", device="cpu")


# -- kernel stage ---------------------------------------------------------------------------------

TINY = AttentionShape(batch=1, heads=2, head_dim=64, grid=(2, 4, 8))


def test_kernel_stage_refuses_a_cpu() -> None:
    with pytest.raises(ValueError, match=r"kernel stage .* needs a CUDA device"):
        KernelEvaluator(TINY, device="cpu")


def test_kernel_evaluator_flow_on_the_cpu_test_path() -> None:
    ev = KernelEvaluator(TINY, device="cpu", warmup=1, reps=20, allow_cpu=True)
    spec = {"mode": "fp8_dense", "tile": [1, 4, 8], "kernel": K32.model_dump()}
    result = ev.evaluate(KernelCandidate.from_attr({"stage": "kernel", "spec": spec}))
    attrs = json.loads(json.dumps(result.attrs))
    assert result.values["latency_ms"] == attrs["median_ms"] > 0
    assert attrs["method"] == "cpu-wallclock" and attrs["fingerprint"]["gpu"] == "cpu"
    assert attrs["reps"] == 20 and attrs["iqr_ms"] >= 0 and attrs["latency_source"] == "measured"
    row = LatencyTable.in_memory().record_evaluation(attrs, study="s:kernel:fp8_dense", trial=0)
    assert row.shape == TINY and row.kernel == K32 and row.fingerprint.is_cpu

    infeasible = {**spec, "kernel": {**K32.model_dump(), "block_m": 48}}
    with pytest.raises(CandidateError, match="infeasible: block_m=48"):
        ev.evaluate(KernelCandidate(AttentionSpec.from_dict(infeasible)))
    with pytest.raises(CandidateError, match="spec: "):
        KernelCandidate.from_attr(
            {"stage": "kernel", "spec": {"mode": "fp8_dense", "sparsity": 0.5}}
        )
    with pytest.raises(CandidateError, match="kernel candidate"):
        KernelCandidate.from_attr({"stage": "schedule", "policy": {}})


def test_kernel_evaluator_times_a_joint_text_video_call() -> None:
    """A joint model's kernel stage times the call with its text tokens in it (HunyuanVideo,
    CogVideoX): inputs of T*H*W + text tokens, ``attention(..., text=)``; the row keeps the text."""
    joint = dataclasses.replace(TINY, text=13)
    ev = KernelEvaluator(joint, device="cpu", warmup=1, reps=20, allow_cpu=True)
    spec = {"mode": "fp8_dense", "tile": [1, 4, 8], "kernel": K32.model_dump()}
    result = ev.evaluate(KernelCandidate.from_attr({"stage": "kernel", "spec": spec}))
    attrs = json.loads(json.dumps(result.attrs))
    row = LatencyTable.in_memory().record_evaluation(attrs, study="s:kernel:fp8_dense", trial=0)
    assert row.shape == joint and row.shape.tokens == 64 + 13
    from fpstune.spec.study import load_study

    hunyuan = load_study(REPO / "studies" / "hunyuanvideo-t2v-13b-720p.yaml").model
    assert AttentionShape.of_model(hunyuan).text == 256


# -- from the study file --------------------------------------------------------------------------


def test_build_evaluator_from_the_mini_study(table: LatencyTable) -> None:
    from fpstune.spec.study import load_study

    spec = load_study(REPO / "studies" / "mini.yaml")
    cal = spec.calibration.model_copy(update={"layers": (0, 3), "steps": (0, 9), "max_tokens": 256})
    # costed at the mini's own shape, where the fixture table has rows (not at latency.target)
    lat = spec.latency.model_copy(update={"target": None})
    spec = spec.model_copy(update={"calibration": cal, "latency": lat})
    ev = build_schedule_evaluator(spec, device="cpu", latency_table=table)
    out = ev.evaluate(candidate(make_policy(FP8)))
    assert set(out.constraints) == {c.name for c in spec.constraints}
    assert {o.name for o in spec.objectives} <= set(out.values)
    assert out.attrs["latency_fingerprint"]["gpu"] == H100.gpu
    kernel = KernelStage(spec, kernel_buckets(spec.kernel_space)[0])
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kernel.evaluator(torch.device("cpu"), "sqlite://")


def test_stages_and_candidates_cross_ray_and_store_as_before() -> None:
    """What Ray pickles (a stage, a candidate, a result) round-trips; candidates are stored in
    the dict form earlier versions wrote (studies they made still read), stage names too."""
    import pickle

    from fpstune.spec.study import load_study
    from fpstune.stages.evaluation import CandidateFailure
    from fpstune.stages.schedule import ScheduleStage

    spec = load_study(REPO / "studies" / "mini.yaml")
    kernel = KernelStage(spec, kernel_buckets(spec.kernel_space)[1])
    for stage in (ScheduleStage(spec), kernel):
        again = pickle.loads(pickle.dumps(stage))
        assert again.study_name == stage.study_name and again.spec == spec
    assert ScheduleStage(spec).study_attrs()["fpstune_stage"] == "schedule"
    assert kernel.study_attrs()["fpstune_bucket"] == kernel.bucket.key
    policy = make_policy(FP8)
    stored = ScheduleCandidate(policy).to_attr()
    assert stored == {"stage": "schedule", "policy": policy.to_dict()}
    assert ScheduleCandidate.from_attr(stored) == ScheduleCandidate(policy)
    assert KernelCandidate(FP8).to_attr() == {"stage": "kernel", "spec": FP8.to_dict()}
    for value in (ScheduleCandidate(policy), KernelCandidate(FP8), CandidateFailure("why")):
        assert pickle.loads(pickle.dumps(value)) == value
