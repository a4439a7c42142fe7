"""Hostile safetensors files through the real CLI (issue 24, item 8): float8 tensors, a header
declaring 100 GB (a sparse file), pickles and junk, as the calibration set or as the mini
model's ``end_to_end.weights``: one line naming the file and the field (and the tensor),
exit 2, within seconds, no database created."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from reliability_helpers import CHEAP, ROOT, fpstune, run_main
from safetensors.torch import save_file

from fpstune.quality.calibration import META_KEY, synthetic_calibration
from fpstune.spec.study import load_study

SERVICE = ROOT / "tests" / "service" / "data"
MINI = ROOT / "studies" / "mini-e2e.yaml"
PICKLE = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s."


def _float8(path: Path) -> None:
    spec = load_study(CHEAP)
    cal = synthetic_calibration(spec.model, seed=0)
    tensors = dict(cal.tensors)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, str(path), metadata={META_KEY: cal.meta.to_json()})


def _sparse_100g(path: Path) -> None:
    """A valid-looking header declaring one 100 GB float32 tensor, the data a hole."""
    n = 100 * 1024**3
    header = json.dumps({"x": {"dtype": "F32", "shape": [n // 4], "data_offsets": [0, n]}})
    raw = header.encode() + b" " * (-len(header) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + n)


def _junk(content: bytes) -> Any:
    return lambda path: path.write_bytes(content)


MAKERS = {
    "float8": (_float8, "F8_E4M3"),
    "sparse-100g": (_sparse_100g, "sparse"),
    "pickle": (_junk(PICKLE), "not a safetensors file"),
    "zero-header": (_junk(b"\x00" * 8), "not a safetensors file"),
}


def _calibration_study(tmp: Path) -> None:
    study = yaml.safe_load(CHEAP.read_text())
    study["kernel_space"] = str(SERVICE / "kernel-tiny.yaml")
    study["schedule_space"] = str(SERVICE / "schedule-tiny.yaml")
    study["calibration"]["source"] = "bad.safetensors"
    (tmp / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))


def _weights_study(tmp: Path) -> None:
    study = yaml.safe_load(MINI.read_text())
    study["kernel_space"] = str(ROOT / "search_spaces" / "kernel-mini.yaml")
    study["schedule_space"] = str(ROOT / "search_spaces" / "schedule-mini-e2e.yaml")
    study["end_to_end"]["weights"] = "bad.safetensors"
    (tmp / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))


FIELDS = {"calibration": ("calibration.source", _calibration_study),
          "weights": ("end_to_end.weights", _weights_study)}  # fmt: skip
RUN = ["study", "run", "study.yaml", "--storage", "sqlite:///store.db", "--no-progress"]


def _check(code: int, err: str, field: str, says: str, tmp: Path, took: float) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "study.yaml" in lines[0] and field in lines[0] and says in lines[0], lines[0]
    assert "bad.safetensors" in lines[0], lines[0]
    assert not (tmp / "store.db").exists()
    assert took < 30


@pytest.mark.parametrize("what", sorted(FIELDS))
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_bad_safetensors_is_one_line_exit_2(
    what: str,
    kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    field, write_study = FIELDS[what]
    make, says = MAKERS[kind]
    write_study(tmp_path)
    make(tmp_path / "bad.safetensors")
    start = time.monotonic()
    code, _, err = run_main(RUN, tmp_path, monkeypatch, capsys)
    _check(code, err, field, says, tmp_path, time.monotonic() - start)


def test_float8_tensor_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _calibration_study(tmp_path)
    _float8(tmp_path / "bad.safetensors")
    _, _, err = run_main(RUN, tmp_path, monkeypatch, capsys)
    assert "tensor '" in err and "dtype 'F8_E4M3'" in err, err


@pytest.mark.parametrize("what", sorted(FIELDS))
def test_bad_weights_as_a_user_runs_it(what: str, tmp_path: Path) -> None:
    """As a subprocess: before Ray starts, no SQLite schema created."""
    field, write_study = FIELDS[what]
    write_study(tmp_path)
    _sparse_100g(tmp_path / "bad.safetensors")
    start = time.monotonic()
    out = fpstune(*RUN, cwd=tmp_path, timeout=120)
    _check(out.returncode, out.stderr, field, "sparse", tmp_path, time.monotonic() - start)


@pytest.mark.parametrize("kind", ["float8", "sparse-100g", "pickle"])
def test_bad_prompt_embeddings_are_one_line(kind: str, tmp_path: Path) -> None:
    """``fpstune capture --prompt-embeds`` reads its file through the same gate."""
    from fpstune.errors import BadInput
    from fpstune.models.prompts import load_prompt_embeds

    make, expected = MAKERS[kind]
    path = tmp_path / "embeds.safetensors"
    make(path)
    t0 = time.monotonic()
    with pytest.raises(BadInput) as e:
        load_prompt_embeds(path, text_dim=16, videos=1, guided=False)
    assert time.monotonic() - t0 < 10
    assert str(e.value).startswith(str(path)) and expected in str(e.value)
    assert "\n" not in str(e.value)
