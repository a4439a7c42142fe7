"""``fpstune study init MODEL_DIR --resolution WxH --frames N``: a study YAML from a checkpoint's
transformer config, as a user runs it (CLI subprocesses on the tiny WanPipeline folder): the
written file validates from wherever it is written, its model section is the adapter's shape,
its defaults are the shipped Wan study's; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from shared_helpers import fpstune

from fpstune.models import adapters
from fpstune.spec.study import load_study

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "studies" / "wan2.1-t2v-1.3b-480p.yaml"
#: Wan2.1-T2V-1.3B's transformer/config.json (diffusers format).
WAN_13B = {
    "_class_name": "WanTransformer3DModel",
    "_diffusers_version": "0.33.0",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}


#: The shipped spaces for small models (schedule-default is made for 30 or 40 layers; the tiny
#: checkpoint has 2).
MINI_SPACES = (
    "--kernel-space", str(ROOT / "search_spaces" / "kernel-mini.yaml"),
    "--schedule-space", str(ROOT / "search_spaces" / "schedule-mini.yaml"),
)  # fmt: skip
#: A size whose grid (3 x 4 x 16) holds every tile of the mini spaces; 192 tokens.
SMALL = (256, 64, 9)


def _config_only(root: Path, config: dict[str, object]) -> Path:
    """A checkpoint folder holding only ``transformer/config.json`` (all `study init` reads)."""
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    return root


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_init_writes_the_adapters_shape_and_the_file_validates_elsewhere(
    pipeline64_dir: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    run = fpstune(
        "study", "init", str(pipeline64_dir), "--resolution", "832x480", "--frames", "81",
        "--steps", "40", *MINI_SPACES, "-o", "deep/er/study.yaml", cwd=work,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = work / "deep" / "er" / "study.yaml"
    assert str(out.relative_to(work)) in run.stdout and "grid 21x30x52" in run.stdout
    assert _files(work) == {"deep", "deep/er", "deep/er/study.yaml"}  # no temp file left

    adapter = adapters.get("wan-diffusers")
    want = adapter.shape(
        adapter.config(pipeline64_dir), name=pipeline64_dir.name, height=480, width=832,
        frames=81, steps=40, cfg=2,
    )  # fmt: skip
    spec = load_study(out)
    assert spec.model.adapter == "wan-diffusers"
    assert spec.model.shape() == want
    assert (want.heads, want.head_dim, want.layers, want.grid) == (2, 64, 2, (21, 30, 52))
    assert spec.name == f"{pipeline64_dir.name}-480p"
    assert spec.calibration.source == "synthetic" and spec.calibration.layers == (0, 1)
    assert spec.calibration.steps == (0, 1, 2, 4, 8, 12, 16, 24, 32, 39)
    # the search spaces are the shipped ones, named relative to the file
    raw = yaml.safe_load(out.read_text())
    assert (out.parent / raw["kernel_space"]).resolve() == ROOT / "search_spaces/kernel-mini.yaml"

    # `study validate`, from another folder and with the file moved next to it: the same study
    for cwd, path in ((tmp_path, out), (out.parent, Path("study.yaml"))):
        check = fpstune("study", "validate", str(path), cwd=cwd)
        assert check.returncode == 0, check.stderr
        assert check.stdout.startswith(f"{path}: ok ({spec.name}: wan-diffusers"), check.stdout


def test_defaults_are_the_shipped_wan_study(tmp_path: Path) -> None:
    """A 1.3B config at 832x480, 81 frames gives `studies/wan2.1-t2v-1.3b-480p.yaml` exactly
    (the model, spaces, objectives, constraint, sampler, budgets, calibration and latency)."""
    ckpt = _config_only(tmp_path / "Wan2.1-T2V-1.3B-Diffusers", WAN_13B)
    run = fpstune(
        "study", "init", str(ckpt), "--resolution", "832x480", "--frames", "81",
        "--name", "wan2.1-t2v-1.3b", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    written = tmp_path / "wan2.1-t2v-1.3b-480p.yaml"  # default -o: STUDY_NAME.yaml
    assert load_study(written).model_dump() == load_study(SHIPPED).model_dump()
    # --no-cfg: one pass; -o an existing file is replaced only with --force
    again = fpstune(
        "study", "init", str(ckpt), "--resolution", "832x480", "--frames", "81", "--no-cfg",
        "-o", str(written), "--force", cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert load_study(written).model.cfg == 1


#: Published transformer configs (diffusers format, the fields `study init` reads) at a native
#: resolution: (config, WxH, frames, grid, text tokens per joint call).
FAMILIES = {
    "hunyuanvideo": (
        {"_class_name": "HunyuanVideoTransformer3DModel", "num_attention_heads": 24,
         "attention_head_dim": 128, "num_layers": 20, "num_single_layers": 40, "patch_size": 2,
         "patch_size_t": 1, "in_channels": 16, "out_channels": 16},
        "1280x720", 129, (33, 45, 80), 256),
    "cogvideox": (
        {"_class_name": "CogVideoXTransformer3DModel", "num_attention_heads": 48,
         "attention_head_dim": 64, "num_layers": 42, "patch_size": 2, "in_channels": 16,
         "out_channels": 16, "max_text_seq_length": 226, "use_rotary_positional_embeddings": True},
        "720x480", 49, (13, 30, 45), 226),
    "ltx-video": (
        {"_class_name": "LTXVideoTransformer3DModel", "num_attention_heads": 32,
         "attention_head_dim": 64, "num_layers": 28, "patch_size": 1, "patch_size_t": 1,
         "in_channels": 128, "out_channels": 128},
        "768x512", 121, (16, 16, 24), 0),
}  # fmt: skip


@pytest.mark.parametrize("adapter", list(FAMILIES))
def test_init_serves_the_joint_attention_families(adapter: str, tmp_path: Path) -> None:
    """The adapter comes from the config's class; the study's model carries the text tokens of
    each joint call into the exported policy (`ModelSpec.shape`), as `fpstune.apply` checks."""
    config, resolution, frames, grid, text = FAMILIES[adapter]
    ckpt = _config_only(tmp_path / adapter, config)
    run = fpstune(
        "study", "init", str(ckpt), "--resolution", resolution, "--frames", str(frames),
        "-o", "s.yaml", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"({adapter})" in run.stdout and "x".join(map(str, grid)) in run.stdout
    spec = load_study(tmp_path / "s.yaml")
    assert (spec.model.adapter, spec.model.grid, spec.model.text) == (adapter, grid, text)
    assert spec.model.shape().text == text


def test_calibration_names_the_captures_cells(pipeline64_dir: Path, tmp_path: Path) -> None:
    width, height, frames = SMALL
    calib = tmp_path / "cap" / "calib.safetensors"
    calib.parent.mkdir()
    cap = fpstune(
        "capture", str(pipeline64_dir), "-o", str(calib), "--prompt", "a cat runs",
        "--height", str(height), "--width", str(width), "--frames", str(frames),
        "--steps", "2", "--layers", "1", "--sample-steps", "0", "--device", "cpu", cwd=tmp_path,
    )  # fmt: skip
    assert cap.returncode == 0, cap.stderr
    size = ["--resolution", f"{width}x{height}", "--frames", str(frames), *MINI_SPACES]
    run = fpstune(
        "study", "init", str(pipeline64_dir), *size, "--steps", "2", "--calibration",
        "cap/calib.safetensors", "-o", "studies/tiny.yaml", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    raw = yaml.safe_load((tmp_path / "studies" / "tiny.yaml").read_text())
    assert raw["calibration"] == {
        "source": os.path.join("..", "cap", "calib.safetensors"),
        "layers": [1],
        "steps": [0],
    }
    spec = load_study(tmp_path / "studies" / "tiny.yaml")
    assert spec.calibration.source == str(calib.resolve())
    check = fpstune("study", "validate", "studies/tiny.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stderr

    # a capture made for another step count is refused before anything is written
    bad = fpstune(
        "study", "init", str(pipeline64_dir), *size, "--steps", "50", "--calibration",
        str(calib), "-o", "other.yaml", cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "--calibration" in bad.stderr and "steps: captured with 2" in bad.stderr
    assert not (tmp_path / "other.yaml").exists()


def _cases(tmp: Path, ckpt: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Bad input: (arguments, what its one line says)."""
    hunyuan = _config_only(
        tmp / "hunyuan", {**WAN_13B, "_class_name": "HunyuanVideoTransformer3DModel"}
    )
    config = hunyuan / "transformer" / "config.json"
    # a class no adapter knows, even once adapters for more diffusers classes are registered
    mine = _config_only(tmp / "mine", {**WAN_13B, "_class_name": "MyVideoTransformer3DModel"})
    (tmp / "empty").mkdir()
    (tmp / "exists.yaml").write_text("name: mine\n")
    size = ["--resolution", "832x480", "--frames", "81"]
    return {
        "unknown class": (
            [str(mine), *size],
            [f"error: {mine / 'transformer' / 'config.json'}: _class_name: "
             "'MyVideoTransformer3DModel': no adapter knows this transformer class",
             f"(registered: {', '.join(adapters.names())})"],
        ),
        "no transformer config": (
            [str(tmp / "empty"), *size],
            [f"error: {tmp / 'empty' / 'transformer' / 'config.json'}: no transformer config"],
        ),
        "adapter that does not know the class": (
            [str(hunyuan), *size, "--adapter", "wan-diffusers"],
            [f"{config}: _class_name:", "adapter wan-diffusers does not know"],
        ),
        "unknown adapter": ([str(ckpt), *size, "--adapter", "nope"], ["--adapter: unknown"]),
        "resolution not divisible": (
            [str(ckpt), "--resolution", "830x480", "--frames", "81"],
            ["error: --resolution: 830x480: width 830 is not a multiple of 16"],
        ),
        "resolution not WxH": (
            [str(ckpt), "--resolution", "480p", "--frames", "81"],
            ["error: --resolution: '480p' is not WIDTHxHEIGHT"],
        ),
        "frames": ([str(ckpt), "--resolution", "832x480", "--frames", "80"], ["--frames: 80"]),
        "missing dir": ([str(tmp / "nope"), *size], [f"{tmp / 'nope'}: no such model directory"]),
        "existing -o": (
            [str(ckpt), *size, "-o", str(tmp / "exists.yaml")],
            [f"error: -o: {tmp / 'exists.yaml'}: exists; give --force"],
        ),
        "shipped schedule space, 2 layers": (
            [str(ckpt), *size],
            ["schedule-default.yaml: layers.groups: 3 groups but the model has 2 layers",
             "give --schedule-space"],
        ),
        "missing space": (
            [str(ckpt), *size, "--kernel-space", "nope.yaml"],
            ["error: --kernel-space: nope.yaml: no such file"],
        ),
        "-o under a file": (
            [str(ckpt), *size, "-o", str(tmp / "exists.yaml" / "s.yaml")],
            ["error: -o:", "is not a folder"],
        ),
        "-o a folder": ([str(ckpt), *size, "-o", str(tmp)], ["error: -o:", "is a folder"]),
    }  # fmt: skip


def test_bad_input_is_one_line_exit_2_and_nothing_written(
    pipeline64_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fpstune.cli.commands import main

    inputs, work = tmp_path / "inputs", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    cases = _cases(inputs, pipeline64_dir)
    before = _files(inputs)
    monkeypatch.chdir(work)
    for case, (args, says) in cases.items():
        monkeypatch.setattr(sys, "argv", ["fpstune", "study", "init", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2, (case, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (case, err)
        assert all(s in lines[0] for s in says), (case, lines[0])
        assert not list(work.iterdir()) and _files(inputs) == before, case
    assert (inputs / "exists.yaml").read_text() == "name: mine\n"

    # and as a user meets it: a subprocess, one line, exit 2
    args, says = cases["unknown class"]
    run = fpstune("study", "init", *args, cwd=work)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith(says[0]), run.stderr
    assert not list(work.iterdir())


def test_the_shipped_spaces_are_package_data() -> None:
    """`study init`'s default spaces come from the installed package ``fpstune.search_spaces``
    (this checkout's folder under an editable install; site-packages under a wheel)."""
    import tomllib

    from fpstune.cli.study_init import SPACES

    root = Path(__file__).resolve().parents[2]
    assert root / "search_spaces" == SPACES
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["fpstune.search_spaces"] == "search_spaces"
    assert setuptools["package-data"]["fpstune.search_spaces"] == ["*.yaml"]
