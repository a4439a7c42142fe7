"""The repository root as the working directory: its ``kernels/`` folder (installed as
``fpstune.kernels``) must not hide Hugging Face's ``kernels`` package, which transformers 5 and
diffusers import. CI runs the suite from the root; these tests say so in one place."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from shared_helpers import fpstune

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_hugging_face_kernels_and_diffusers_wan_import_from_the_repo_root() -> None:
    if importlib.util.find_spec("kernels") is None:
        pytest.fail("Hugging Face's kernels package is not installed (the [test] extra has it)")
    out = _python(
        "import kernels, fpstune.kernels as fk\n"
        "from diffusers import WanTransformer3DModel\n"
        "print(kernels.__file__); print(fk.__file__); print(kernels.get_kernel.__module__)"
    )
    assert out.returncode == 0, out.stderr
    upstream, ours, get_kernel = out.stdout.split()
    assert not Path(upstream).resolve().is_relative_to(ROOT), upstream
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert get_kernel.startswith("kernels.")


def test_without_the_upstream_package_the_name_is_simply_missing() -> None:
    # -S: no site-packages, so no Hugging Face kernels; the repo root is still sys.path[0].
    out = _python("import kernels", "-S")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == "ModuleNotFoundError: No module named 'kernels'"


def test_a_mini_e2e_trial_runs_from_the_repo_root(tmp_path: Path) -> None:
    """The Ray worker imports diffusers' Wan model with the repo root as its working directory."""
    data = yaml.safe_load((ROOT / "studies" / "mini-e2e.yaml").read_text())
    data["model"]["steps"] = 2
    data["end_to_end"]["seeds"] = [5]
    data["trials"]["schedule"] = 1
    data["calibration"]["max_tokens"] = 64
    data["sampler"]["start_from_baselines"] = False
    for key in ("kernel_space", "schedule_space"):
        data[key] = str(ROOT / "studies" / data[key])
    study_file = tmp_path / "tiny-e2e.yaml"
    study_file.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{tmp_path / 's.db'}"
    run = fpstune("study", "run", str(study_file), "--storage", url, "--no-progress", cwd=ROOT)
    assert run.returncode == 0, run.stderr
    (trial,) = optuna.load_study(study_name="mini-e2e:schedule", storage=url).trials
    assert trial.state is optuna.trial.TrialState.COMPLETE
    assert trial.values[1] > 10.0  # PSNR of a real generation, not a failed one
