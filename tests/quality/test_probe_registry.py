"""The probe registry: a toy probe plugs in without editing fpstune, by a call or an entry point;
a study may name its metric only once it is registered, and a schedule evaluation reports it."""

from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from shared_helpers import H100, install_plugin

from fpstune.kernels import AttentionSpec, KernelConfig, Mode
from fpstune.kernels.policy import Policy, Provenance
from fpstune.latency import AttentionShape, LatencyTable, Timing
from fpstune.quality import QualityResult, registry
from fpstune.quality.registry import ProbeKind, register_probe
from fpstune.spec import BadInput, StudySpec, load_study
from fpstune.stages.candidates import ScheduleCandidate
from fpstune.stages.evaluators import ScheduleEvaluator, build_schedule_evaluator

ROOT = Path(__file__).resolve().parents[2]
K32 = KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
BF16 = AttentionSpec(mode=Mode.BF16_DENSE)
FP8 = AttentionSpec(mode=Mode.FP8_DENSE, tile=(1, 4, 8))


class ToyProbe:
    """Scores a policy 1.0 when its default is BF16-dense, else 0.25."""

    names = ("toy_score",)

    def __init__(self, model: str) -> None:
        self.model = model

    def measure(self, policy: Any) -> QualityResult:
        score = 1.0 if policy.default.mode is Mode.BF16_DENSE else 0.25
        return QualityResult(values={"toy_score": score}, attrs={"toy_model": self.model})


BUILT: list[str] = []


def build_toy(spec: StudySpec, device: torch.device) -> ToyProbe:
    BUILT.append(spec.name)
    return ToyProbe(spec.model.name)


TOY = ProbeKind(name="toy", metrics={"toy_score": "maximize"}, build=build_toy)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private copy of the registry, entry points not yet read: what a test registers is gone
    after it."""
    monkeypatch.setattr(registry, "_kinds", dict(registry._kinds))
    monkeypatch.setattr(registry, "_broken", {})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    BUILT.clear()
    yield


def _study(tmp_path: Path, **changes: Any) -> Path:
    data = yaml.safe_load((ROOT / "studies" / "mini.yaml").read_text())
    for key in ("kernel_space", "schedule_space"):
        data[key] = str((ROOT / "studies" / data[key]).resolve())
    data.update(changes)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


TOY_STUDY = {
    "objectives": [{"name": "latency_ms"}, {"name": "toy_score"}],
    "constraints": [{"name": "toy_score", "min": 0.5}, {"name": "rel_l2", "max": 0.1}],
}


def test_a_study_names_a_toy_metric_only_once_it_is_registered(
    probes: None, tmp_path: Path
) -> None:
    path = _study(tmp_path, **TOY_STUDY)
    with pytest.raises(BadInput) as e:
        load_study(path)
    assert str(e.value) == (
        f"{path}: objectives.1.name: no probe produces 'toy_score' (the latency source produces "
        "latency_ms; probes: attention: rel_l2, cosine; end_to_end: psnr, psnr_min, frame_psnr, "
        "ssim)"
    )

    assert register_probe(TOY) is TOY
    spec = load_study(path)
    assert spec.metric_names == ["latency_ms", "toy_score"]
    assert spec.directions == ["minimize", "maximize"]  # the probe's natural direction
    assert spec.constraint_values({"toy_score": 0.25, "rel_l2": 0.05}) == pytest.approx(
        {"toy_score": 0.25, "rel_l2": -0.05}
    )
    wrong = _study(tmp_path, objectives=[{"name": "toy_score", "direction": "minimize"}])
    with pytest.raises(BadInput, match=r"toy_score is better when higher: direction must be max"):
        load_study(wrong)


@pytest.mark.parametrize("metric", ["rel_l1", "lpips"])
def test_removed_metrics_stay_refused(probes: None, tmp_path: Path, metric: str) -> None:
    path = _study(tmp_path, objectives=[{"name": "latency_ms"}, {"name": metric}])
    with pytest.raises(BadInput, match=rf"objectives\.1\.name: no probe produces '{metric}'"):
        load_study(path)


def test_a_schedule_evaluation_reports_the_toy_probe(probes: None, tmp_path: Path) -> None:
    register_probe(TOY)
    spec = load_study(_study(tmp_path, **TOY_STUDY))
    # costed at the mini's own shape from a small table; a capped calibration set for CPU speed
    cal = spec.calibration.model_copy(update={"layers": (0, 3), "steps": (0, 9), "max_tokens": 256})
    lat = spec.latency.model_copy(update={"target": None})
    spec = spec.model_copy(update={"calibration": cal, "latency": lat})
    ev = build_schedule_evaluator(spec, device="cpu", latency_table=_table(spec))
    assert isinstance(ev, ScheduleEvaluator) and [spec.name] == BUILT
    assert ev.names == ("latency_ms", "rel_l2", "rel_l2_max", "cosine", "cosine_min", "toy_score")

    dense = ev.evaluate(_candidate(spec, BF16))
    fp8 = ev.evaluate(_candidate(spec, FP8))
    assert dense.values["toy_score"] == 1.0 and fp8.values["toy_score"] == 0.25
    assert fp8.constraints == pytest.approx(
        {"toy_score": 0.5 - 0.25, "rel_l2": fp8.values["rel_l2"] - 0.1}
    )
    assert dense.constraints["toy_score"] == -0.5
    assert fp8.attrs["toy_model"] == "mini" and fp8.attrs["metrics"]["toy_score"] == 0.25
    assert 0.0 < fp8.values["rel_l2"] < 0.1  # the attention probe still runs beside it

    # a study that names none of the toy's metrics does not build it
    plain = spec.model_copy(update={"objectives": spec.objectives[:1], "constraints": ()})
    ev = build_schedule_evaluator(plain, device="cpu", latency_table=_table(spec))
    assert [spec.name] == BUILT and "toy_score" not in ev.names


def test_register_refuses_a_metric_that_is_taken(probes: None) -> None:
    with pytest.raises(ValueError, match=r"^probe fake: psnr is already produced by probe end_"):
        register_probe(ProbeKind(name="fake", metrics={"psnr": "maximize"}, build=build_toy))
    with pytest.raises(ValueError, match=r"latency_ms is already produced by the latency source"):
        register_probe(ProbeKind(name="fake", metrics={"latency_ms": "minimize"}, build=build_toy))
    register_probe(TOY)
    with pytest.raises(ValueError, match=r"^probe 'toy' is already registered$"):
        register_probe(ProbeKind(name="toy", metrics={"toy_other": "minimize"}, build=build_toy))
    with pytest.raises(ValueError, match=r"toy_score must minimize or maximize"):
        ProbeKind(name="bad", metrics={"toy_score": "up"}, build=build_toy)  # type: ignore[dict-item]
    assert [k.name for k in registry.probe_kinds()] == ["attention", "end_to_end", "toy"]


def test_violation_is_value_minus_max_or_min_minus_value() -> None:
    assert registry.violation(3.0, max=1.0) == 2.0
    assert registry.violation(3.0, min=5.0) == 2.0
    assert registry.violation(3.0, min=1.0) == -2.0
    for bounds in ({}, {"max": 1.0, "min": 0.0}):
        with pytest.raises(ValueError, match="exactly one of max or min"):
            registry.violation(3.0, **bounds)


# -- a plug-in through the entry point group ------------------------------------------------------

PLUGIN = """
    from fpstune.quality import QualityResult
    from fpstune.quality.registry import ProbeKind

    class Blur:
        names = ("blur",)

        def measure(self, policy):
            return QualityResult(values={"blur": 0.0})

    def kind():
        return ProbeKind(name="blur", metrics={"blur": "minimize"}, build=lambda s, d: Blur())
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probes: None) -> Any:
    """A distribution on sys.path (``toy-probe``) whose entry points name a toy probe and a
    broken one; nothing in fpstune is edited."""
    install_plugin(
        tmp_path / "site",
        monkeypatch,
        group=registry.ENTRY_POINT_GROUP,
        entry_points={"blur": "toy_fpstune_probe:kind", "broken": "toy_fpstune_probe:missing"},
        modules={"toy_fpstune_probe": PLUGIN},
    )
    return importlib.import_module("toy_fpstune_probe")


def test_an_entry_point_plugs_in_a_probe(plugin: Any, tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match=r"probe entry point 'broken' .* skipped"):
        assert registry.direction("blur") == "minimize"
    assert [k.name for k in registry.probe_kinds()] == ["attention", "end_to_end", "blur"]
    with pytest.raises(registry.UnknownMetric, match=r"blur: blur\); entry point 'broken' fail"):
        registry.direction("sharpness")
    spec = load_study(_study(tmp_path, constraints=[{"name": "blur", "max": 0.1}]))
    assert spec.constraint_values({"blur": 0.0}) == {"blur": -0.1}


# -- helpers --------------------------------------------------------------------------------------


def _table(spec: StudySpec) -> LatencyTable:
    shape = AttentionShape.of_model(spec.model, batch=spec.model.batch)
    table = LatencyTable.in_memory()
    for s, ms in ((BF16, 2.0), (FP8.model_copy(update={"kernel": K32}), 1.2)):
        timing = Timing(median_ms=ms, iqr_ms=0.01, reps=20, warmup=5, method="cuda-events+flush-l2")
        table.record(fingerprint=H100, shape=shape, spec=s, timing=timing)
    return table


def _candidate(spec: StudySpec, default: AttentionSpec) -> ScheduleCandidate:
    provenance = Provenance(
        study="toy", created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), fpstune_version="0.1.0"
    )
    model = spec.model.shape()
    return ScheduleCandidate(
        Policy(model=model, hardware=H100, provenance=provenance, default=default)
    )
