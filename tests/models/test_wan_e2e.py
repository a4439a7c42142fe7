"""End-to-end quality of a diffusers Wan checkpoint from a capture's replay record: a study with
``end_to_end`` on the tiny checkpoint, costed at the 1.3B-720p shape, run and exported with
``--verify-e2e`` as a user runs them (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from shared_helpers import fpstune
from wan_helpers import FRAMES, HEIGHT, WIDTH

from fpstune.cli.commands import main
from fpstune.kernels import AttentionSpec, Mode
from fpstune.kernels.policy import Policy
from fpstune.models import adapters
from fpstune.models.capture import record_path
from fpstune.quality.e2e import PSNR_CAP, latent_psnr
from fpstune.spec import BadInput, load_study

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1)
STEPS = 2
PROMPT = ("--prompt", "a cat runs", "--negative-prompt", "blurry")
TARGET = {"heads": 12, "head_dim": 128, "grid": [21, 45, 80], "layers": 30, "steps": 50}


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory, pipeline64_dir: Path) -> tuple[Path, Path]:
    """(checkpoint, calibration): a complete tiny WanPipeline folder (head_dim 64, VAE, UMT5)
    captured by ``fpstune capture`` from prompt text over 2 steps, seeds 0 and 1."""
    out = tmp_path_factory.mktemp("capture") / "calib.safetensors"
    run = fpstune(
        "capture", str(pipeline64_dir), "-o", str(out), *PROMPT, "--height", str(HEIGHT),
        "--width", str(WIDTH), "--frames", str(FRAMES), "--steps", str(STEPS),
        "--seeds", ",".join(map(str, SEEDS)), "--device", "cpu", cwd=out.parent,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert record_path(out).is_file()
    return pipeline64_dir, out


#: A user's script: generate with and without `fpstune.apply`, then after `fpstune.remove`.
APPLY = f"""
import json, sys, torch, fpstune
from diffusers import WanPipeline
pipe = WanPipeline.from_pretrained(sys.argv[1], local_files_only=True)
def generate():
    return pipe("a cat runs", negative_prompt="blurry", height={HEIGHT}, width={WIDTH},
                num_frames={FRAMES}, num_inference_steps={STEPS}, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="latent").frames
bf16 = generate()
fpstune.apply(pipe, sys.argv[2], allow_other_gpu=True)  # latencies: the H100 table
tuned = generate()
calls = pipe.transformer._fpstune.router.calls
fpstune.remove(pipe)
again = generate()
print(json.dumps({{"calls": sorted([list(k) + [n] for k, n in calls.items()]),
                  "differs": not torch.equal(tuned, bf16),
                  "removed_is_bf16": torch.equal(again, bf16)}}))
"""


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
            {"name": "frame_psnr", "direction": "maximize"},
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
    # latents' psnr; the checkpoint has a VAE, so its decoded frames' psnr and ssim too
    assert probe.names == ("psnr", "psnr_min", "frame_psnr", "ssim")
    assert probe.reference_frames.shape == (1, 3, FRAMES, HEIGHT, WIDTH)
    from fpstune.kernels.fingerprint import current_fingerprint
    from fpstune.kernels.policy import Policy

    model = study.model.shape()
    hw = current_fingerprint(torch.device("cpu"))
    dense = probe.measure(
        Policy(model=model, hardware=hw, default=AttentionSpec(mode=Mode.BF16_DENSE))
    )
    exact = {"psnr": PSNR_CAP, "psnr_min": PSNR_CAP, "frame_psnr": PSNR_CAP}
    assert dense.values == {**exact, "ssim": pytest.approx(1.0, abs=1e-6)}
    fp8 = AttentionSpec(mode=Mode.FP8_DENSE)
    lossy = probe.measure(Policy(model=model, hardware=hw, default=fp8)).values
    assert 20.0 < lossy["psnr"] < PSNR_CAP
    assert 20.0 < lossy["frame_psnr"] < PSNR_CAP and 0.5 < lossy["ssim"] < 1.0


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
    assert "end-to-end psnr verified" in ok.stdout  # the study's bar: its psnr constraint
    provenance = yaml.safe_load(out.read_text())["provenance"]
    verified = provenance["remeasured"]["e2e_psnr_verified"]
    assert 10.0 < verified <= PSNR_CAP
    assert "verified on 1 seed [0]" in provenance["notes"]

    # the exported policy in the user's own pipeline, in a fresh process
    applied = subprocess.run(
        [sys.executable, "-c", APPLY, str(ckpt), str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    result = json.loads(applied.stdout.splitlines()[-1])
    policy = Policy.load(out, allow_other_gpu=True)
    lossy = any(
        policy.spec(layer=layer, step=step).mode != Mode.BF16_DENSE
        for layer in range(2) for step in range(STEPS)
    )  # fmt: skip
    # every (layer, step) routed, twice: the pipeline's two CFG passes
    assert result["calls"] == [[layer, step, 2] for layer in range(2) for step in range(STEPS)]
    assert result["differs"] == lossy and lossy  # the pick runs FP8 somewhere, and it shows
    assert result["removed_is_bf16"]

    high = tmp_path / "high.yaml"
    bar = ["--trial", "0", "--min-quality", "200"]  # on the frame_psnr objective
    refused = fpstune(*args[:4], "-o", str(high), "--verify-e2e", "1", *bar, cwd=tmp_path, env=env)
    assert refused.returncode == 2
    line = refused.stderr.strip()
    assert "\n" not in line and not high.exists()
    assert line.startswith("error: --verify-e2e: trial 0: end-to-end frame_psnr ")
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
