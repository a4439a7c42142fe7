"""End-to-end quality of a diffusers Wan checkpoint from a capture's replay record: a study with
``end_to_end`` on the tiny checkpoint, costed at the 1.3B-720p shape, run and exported with
``--verify-e2e`` as a user runs them (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from shared_helpers import fpstune
from wan_helpers import CONFIG, LATENT

from fpstune.cli import main
from fpstune.kernels import AttentionSpec, Mode
from fpstune.models import adapters
from fpstune.models.capture import initial_latents, record_path
from fpstune.models.loop import Conditions, Sampling
from fpstune.models.prompts import load_prompt_embeds
from fpstune.quality.e2e import PSNR_CAP, latent_psnr
from fpstune.spec import BadInput, load_study

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1)
STEPS = 2
TARGET = {"heads": 12, "head_dim": 128, "grid": [21, 45, 80], "layers": 30, "steps": 50}


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory, prompt_file: Path) -> tuple[Path, Path]:
    """(checkpoint, calibration): the tiny Wan at head_dim 64 (a head_dim the kernels take),
    captured over 2 steps, seeds 0 and 1, with its replay record."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan64")
    ckpt = root / "tiny-wan"
    torch.manual_seed(0)
    WanTransformer3DModel(**{**CONFIG, "attention_head_dim": 64, "ffn_dim": 64}).save_pretrained(
        ckpt / "transformer"
    )
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    ).save_config(ckpt / "scheduler")
    adapter = adapters.get("wan-diffusers")
    transformer, scheduler = adapter.load(ckpt)
    pos, neg = load_prompt_embeds(
        prompt_file, text_dim=int(CONFIG["text_dim"]), videos=len(SEEDS), guided=True
    )
    conditions = Conditions(initial_latents(SEEDS, LATENT), pos, neg)
    out = root / "calib.safetensors"
    adapter.capture(
        transformer, Sampling(scheduler, STEPS, 5.0), conditions, out=out, name="tiny-wan",
        seeds=SEEDS,
    )  # fmt: skip
    return ckpt, out


def _study(tmp_path: Path, ckpt: Path, calibration: str, **extra: object) -> Path:
    data = {
        "name": "tiny-wan-e2e",
        "model": {
            "name": "tiny-wan", "adapter": "wan-diffusers", "heads": 2, "head_dim": 64,
            "layers": 2, "grid": [3, 3, 4], "steps": STEPS, "cfg": 2,
        },
        "kernel_space": str(ROOT / "search_spaces" / "kernel-mini.yaml"),
        "schedule_space": {
            "kind": "schedule",
            "phases": {
                "bf16_until": {"low": 0.0, "high": 0.5, "step": 0.5},
                "fp8_dense_until": {"low": 0.5, "high": 1.0, "step": 0.5},
            },
            "sparse": {
                "splits": 1, "sparsity": {"low": 0.5, "high": 0.5}, "pattern": ["window"],
                "tile": [[1, 3, 4]],
            },
        },
        "objectives": [
            {"name": "latency_ms", "direction": "minimize"},
            {"name": "psnr", "direction": "maximize"},
        ],
        "constraints": [{"name": "psnr", "min": 10.0}],
        "sampler": {"name": "random", "seed": 0},
        "trials": {"kernel": 0, "schedule": 3},
        "calibration": {"source": calibration},
        "end_to_end": {"seeds": list(SEEDS), "weights": str(ckpt)},
        "latency": {"warmup": 1, "reps": 20, "target": TARGET},
        **extra,
    }  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_latent_psnr_uses_the_references_range() -> None:
    ref = torch.zeros(2, 4, 3)
    ref[:, 0, 0] = 4.0  # range 4
    out = ref.clone()
    out[0] += 0.04  # mse 0.0016 -> 10 log10(16 / 0.0016) = 40 dB
    assert latent_psnr(out, ref) == [pytest.approx(40.0, abs=1e-3), PSNR_CAP]


def test_study_refuses_end_to_end_without_a_replay_record(
    captured: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, calibration = captured
    path = _study(tmp_path, ckpt, "synthetic")
    with pytest.raises(BadInput) as e:
        load_study(path)
    assert str(e.value) == (
        f"{path}: end_to_end: needs a captured calibration.source with its replay record "
        "(fpstune capture); calibration.source is synthetic"
    )
    path = _study(
        tmp_path, ckpt, str(calibration), end_to_end={"seeds": [0], "weights": str(calibration)}
    )
    with pytest.raises(BadInput, match=r"end_to_end\.weights: adapter wan-diffusers needs the"):
        load_study(path)
    path = _study(
        tmp_path, ckpt, str(calibration), end_to_end={"seeds": [0, 7], "weights": str(ckpt)}
    )
    with pytest.raises(BadInput, match=r"end_to_end\.seeds: seed 7 is not in the replay record"):
        load_study(path)


def test_probe_replays_the_record_and_scores_latents(captured: tuple[Path, Path]) -> None:
    ckpt, calibration = captured
    study = load_study(_study(Path(calibration).parent, ckpt, str(calibration)))
    assert study.end_to_end is not None
    probe = adapters.get("wan-diffusers").end_to_end_probe(
        seeds=(1,), steps=STEPS, guidance=5.0, device="cpu", weights=str(ckpt),
        record=str(record_path(calibration)),
    )  # fmt: skip
    assert probe.names == ("psnr", "psnr_min")  # no SSIM of latents
    from fpstune.kernels.fingerprint import current_fingerprint
    from fpstune.kernels.policy import Policy

    model = study.model.shape()
    hw = current_fingerprint(torch.device("cpu"))
    dense = probe.measure(
        Policy(model=model, hardware=hw, default=AttentionSpec(mode=Mode.BF16_DENSE))
    )
    assert dense.values == {"psnr": PSNR_CAP, "psnr_min": PSNR_CAP}
    fp8 = AttentionSpec(mode=Mode.FP8_DENSE)
    lossy = probe.measure(Policy(model=model, hardware=hw, default=fp8))
    assert 20.0 < lossy.values["psnr"] < PSNR_CAP


def test_study_run_and_export_verify_e2e(captured: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, calibration = captured
    study = _study(tmp_path, ckpt, str(calibration))
    url = f"sqlite:///{tmp_path / 's.db'}"
    env = {"FPSTUNE_CACHE": str(tmp_path / "cache")}
    run = fpstune(
        "study", "run", str(study), "--storage", url, "--trials", "3", "--no-progress",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    trials = optuna.load_study(study_name="tiny-wan-e2e:schedule", storage=url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    # costed at the 1.3B-720p target from the shipped H100 table: seconds, not the tiny's µs
    assert all(t.values[0] > 1000.0 for t in trials)

    out = tmp_path / "policy.yaml"
    args = ["export", str(study), "--storage", url, "-o", str(out), "--verify-e2e", "1"]
    ok = fpstune(*args, cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "end-to-end psnr verified" in ok.stdout
    provenance = yaml.safe_load(out.read_text())["provenance"]
    verified = provenance["remeasured"]["e2e_psnr_verified"]
    assert 10.0 < verified <= PSNR_CAP
    assert "verified on 1 seed [0]" in provenance["notes"]

    high = tmp_path / "high.yaml"
    bar = ["--trial", "0", "--min-quality", "200"]
    refused = fpstune(*args[:4], "-o", str(high), "--verify-e2e", "1", *bar, cwd=tmp_path, env=env)
    assert refused.returncode == 2
    line = refused.stderr.strip()
    assert "\n" not in line and not high.exists()
    assert line.startswith("error: --verify-e2e: trial 0: end-to-end psnr ")
    assert "misses the bar 200 dB by " in line and line.endswith("no policy written")


def test_verify_e2e_needs_an_end_to_end_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = load_study(ROOT / "studies" / "mini.yaml")  # no end_to_end
    url = f"sqlite:///{tmp_path / 's.db'}"
    stored = optuna.create_study(
        study_name=spec.study_name("schedule"), storage=url, directions=["minimize"] * 2
    )
    stored.set_user_attr("fpstune_study", spec.model_dump(mode="json"))
    out = tmp_path / "p.yaml"
    argv = ["fpstune", "export", spec.name, "--storage", url, "-o", str(out), "--verify-e2e", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert err == f"error: --verify-e2e: study {spec.name} has no end_to_end section"
