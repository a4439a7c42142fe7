"""Latency for any GPU and shape: a schedule study without kernel latencies for its shape is
refused before anything starts, a ``latency.target`` proxy on a GPU fpstune ships no table for
borrows another GPU's table, and latencies from another GPU say so in status, report and policy."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from fpstune.catalog import study_status
from fpstune.errors import BadInput
from fpstune.export import export_policy
from fpstune.kernels import AttentionSpec, Mode
from fpstune.kernels.fingerprint import HardwareFingerprint
from fpstune.kernels.policy import Policy
from fpstune.latency.shape import AttentionShape
from fpstune.latency.shipped import packaged_table, shipped_tables
from fpstune.run import preflight as latency_check
from fpstune.run.preflight import check_schedule_latency, kernel_trial_seconds
from fpstune.run.trial_writes import user_attrs_of
from fpstune.spec.study import load_study
from fpstune.stages import evaluators
from fpstune.stages.evaluators import build_schedule_evaluator, schedule_latency
from fpstune.stages.schedule import ScheduleStage
from fpstune.trial_attrs import metric_names

ROOT = Path(__file__).resolve().parents[2]
STUDIES = ROOT / "studies"
H100 = "NVIDIA H100 80GB HBM3"
H200 = HardwareFingerprint(
    gpu="NVIDIA H200", sm_count=132, capability=(9, 0), torch="2.11.0", fpstune="0.1.0"
)


def _on_gpu(monkeypatch: pytest.MonkeyPatch, fp: HardwareFingerprint) -> torch.device:
    """Pretend this machine's CUDA device has fingerprint ``fp`` (nothing touches CUDA)."""
    for module in (evaluators, latency_check):
        monkeypatch.setattr(module, "current_fingerprint", lambda device=None: fp)
    return torch.device("cuda")


def test_a_shape_without_rows_is_one_line_exit_2_before_ray_or_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fpstune.cli import commands as cli
    from fpstune.run import controller

    def no_ray(*args: Any) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(controller, "ensure_ray", no_ray)  # the runner imports it when it runs
    study = STUDIES / "wan2.1-t2v-14b-480p.yaml"
    db = tmp_path / "store.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        ["fpstune", "study", "run", str(study), "--storage", f"sqlite:///{db}", "--no-progress"],
    )
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.count("\n") == 1, err
    line = err.removeprefix("error: ")
    assert line.startswith(f"{study}: latency: no kernel latencies for 40x32760x128 ")
    assert f"fpstune study run {study} --stage kernel --storage sqlite:///{db}" in line
    assert "(440 kernel trials, about " in line and " min at ~" in line
    assert "s per trial by the kernel stage's own timing" in line
    assert not list(tmp_path.iterdir())  # no database file, journal or lock


def test_the_refusal_names_this_gpu_and_a_gpu_with_the_shipped_rows_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = STUDIES / "wan2.1-t2v-1.3b-720p.yaml"
    spec, url = load_study(study), f"sqlite:///{tmp_path}/s.db"
    refused = r"latency: no kernel latencies for 12x75600x128 on NVIDIA H200; measure them first: "
    with pytest.raises(BadInput, match=refused + "fpstune study run"):
        check_schedule_latency(spec, study, url, device=_on_gpu(monkeypatch, H200))
    h100 = packaged_table(H100).fingerprints()[0]
    check_schedule_latency(spec, study, url, device=_on_gpu(monkeypatch, h100))
    assert not list(tmp_path.iterdir())


def test_a_target_proxy_on_a_gpu_without_a_table_borrows_another_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decision: a ``latency.target`` study (mini, mini-e2e) on a GPU fpstune ships no table for
    composes from the one it ships (the H100's), under that table's fingerprint, and every trial
    says so (`latency_provenance`); a study of a real model is refused instead (measure first)."""
    assert shipped_tables() == ["nvidia-h100-80gb-hbm3"]
    device = _on_gpu(monkeypatch, H200)
    for name in ("mini.yaml", "mini-e2e.yaml"):
        spec = load_study(STUDIES / name)
        source = schedule_latency(spec, device=device)
        assert source.fingerprint.gpu == H100
        mini = AttentionShape.of_model(spec.model)
        assert source.cost(AttentionSpec(mode=Mode.BF16_DENSE), mini).median_ms > 0
        check_schedule_latency(spec, STUDIES / name, f"sqlite:///{tmp_path}/s.db", device=device)
    # a target no table holds is refused, naming latency.target
    spec = load_study(STUDIES / "mini.yaml")
    target = spec.latency.target.model_copy(update={"grid": (21, 30, 52)})  # type: ignore[union-attr]
    spec = spec.model_copy(update={"latency": spec.latency.model_copy(update={"target": target})})
    refused = r"mini.yaml: latency.target: no kernel latencies for 12x32760x128 on NVIDIA H200"
    with pytest.raises(BadInput, match=refused):
        check_schedule_latency(spec, STUDIES / "mini.yaml", "sqlite://", device=device)


def test_the_per_trial_estimate_comes_from_the_tables_own_timing() -> None:
    rows = packaged_table(H100).rows()
    at_720p = AttentionShape(batch=1, heads=12, head_dim=128, grid=(21, 45, 80))
    seconds, basis = kernel_trial_seconds(rows, at_720p, warmup=10, reps=50)  # type: ignore[misc]
    # the 720p kernel stage took 0.5-5.8 s a trial (created stamps), ~2 s typical
    assert 1.0 < seconds < 4.0, seconds
    assert "scaled from 12x75600x128 on NVIDIA H100 80GB HBM3" in basis
    bigger = AttentionShape(batch=1, heads=40, head_dim=128, grid=(21, 45, 80))
    assert kernel_trial_seconds(rows, bigger, warmup=10, reps=50)[0] > 3 * seconds  # type: ignore[index]
    assert kernel_trial_seconds([], at_720p, warmup=10, reps=50) is None


def test_latencies_from_another_gpu_say_so_in_status_report_and_policy(tmp_path: Path) -> None:
    from fpstune.dashboard.report import render_html, report_info

    spec = load_study(STUDIES / "mini.yaml")
    cal = spec.calibration.model_copy(update={"layers": (0,), "steps": (0,), "max_tokens": 64})
    spec = spec.model_copy(update={"calibration": cal})
    source, url = ScheduleStage(spec), f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(
        study_name=source.study_name,
        storage=url,
        directions=source.directions,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    study.set_metric_names(source.metric_names)
    for key, value in source.study_attrs().items():
        study.set_user_attr(key, value)
    evaluator = build_schedule_evaluator(spec, device="cpu")
    for _ in range(3):
        trial = study.ask()
        candidate = source.suggest(trial)
        ev = evaluator.evaluate(candidate)
        for key, value in {"candidate": candidate.to_attr(), **user_attrs_of(ev.attrs)}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, [ev.values[n] for n in metric_names(study)])
    said = f"from table measured on {H100} (not this machine: cpu)"

    assert study_status("mini", storage_url=url)["latencies"] == said
    info = report_info("mini", storage_url=url)
    assert info.latency_provenance == said
    assert said in render_html(info)
    out = tmp_path / "policy.yaml"
    export_policy("mini", storage_url=url, output=out)
    policy = Policy.load(out, hardware=None)
    assert policy.hardware.gpu == H100
    assert policy.provenance is not None and policy.provenance.notes is not None
    assert f"latencies {said}" in policy.provenance.notes


def test_rows_in_the_storage_serve_the_shape_and_two_gpus_there_are_said_as_such(
    tmp_path: Path,
) -> None:
    from fpstune.latency.measure import Timing
    from fpstune.latency.table import LatencyTable

    study = STUDIES / "wan2.1-t2v-14b-480p.yaml"
    spec, url = load_study(study), f"sqlite:///{tmp_path}/s.db"
    shape = AttentionShape.of_model(spec.model, batch=spec.model.batch)
    table = LatencyTable.from_url(url)
    timing = Timing(median_ms=20.0, iqr_ms=0.1, reps=50, warmup=10, method="cuda-events")
    bf16 = AttentionSpec(mode=Mode.BF16_DENSE)
    table.record(fingerprint=H200, shape=shape, spec=bf16, timing=timing)
    check_schedule_latency(spec, study, url, device=torch.device("cpu"))
    other = H200.model_copy(update={"gpu": "NVIDIA B200"})
    table.record(fingerprint=other, shape=shape, spec=bf16, timing=timing)
    table.engine.dispose()
    with pytest.raises(BadInput, match=r"latency: composing latency needs one GPU fingerprint"):
        check_schedule_latency(spec, study, url, device=torch.device("cpu"))
