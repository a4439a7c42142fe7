"""Quality: synthetic calibration sets, their files, and the metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fpstune.kernels import AttentionSpec, attention
from fpstune.kernels.policy import ModelShape
from fpstune.quality import (
    CalibrationError,
    cap_grid,
    check_fits,
    compare,
    cosine,
    evenly_spaced,
    load_calibration,
    rel_l2,
    save_calibration,
    synthetic_calibration,
)
from fpstune.quality.calibration import META_KEY, CalibrationSet

MINI = ModelShape(name="mini", heads=4, head_dim=64, layers=4, grid=(5, 12, 16), steps=10, cfg=2)


@pytest.fixture(scope="module")
def small() -> CalibrationSet:
    return synthetic_calibration(MINI, seed=3, layers=[0, 3], steps=[0, 9], max_tokens=300)


def test_synthetic_is_deterministic_per_seed(small: CalibrationSet) -> None:
    again = synthetic_calibration(MINI, seed=3, layers=[3, 0], steps=[9, 0], max_tokens=300)
    assert again.meta == small.meta
    assert small.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(small.tensors[n], again.tensors[n]) for n in small.tensors)
    other = synthetic_calibration(MINI, seed=4, layers=[0], steps=[0], max_tokens=300)
    assert not torch.equal(other.qkv(0, 0)[0], small.qkv(0, 0)[0])


def test_synthetic_subset_equals_the_full_sets_cells(small: CalibrationSet) -> None:
    one = synthetic_calibration(MINI, seed=3, layers=[3], steps=[9], max_tokens=300)
    for a, b in zip(one.qkv(3, 9), small.qkv(3, 9), strict=True):
        assert torch.equal(a, b)
    picked = small.select(layers=[3], steps=[9])
    assert picked.cells == ((3, 9),) and len(picked.tensors) == 3
    with pytest.raises(KeyError, match="no layer 2"):
        small.select(layers=[2])


def test_synthetic_shapes_metadata_and_locality(small: CalibrationSet) -> None:
    m = small.meta
    assert m.grid == cap_grid(MINI.grid, 300) and m.model_grid == (5, 12, 16) and m.capped
    assert m.cells == ((0, 0), (0, 9), (3, 0), (3, 9))
    assert m.source == "synthetic" and m.seed == 3 and m.dtype == "bfloat16"
    q, k, _v = small.qkv(0, 0)
    assert q.shape == (1, 4, math.prod(m.grid), 64) and q.dtype == torch.bfloat16
    # attention concentrates near each token: most of the mass within Chebyshev distance 2
    t, h, w = (torch.arange(x) for x in m.grid)
    coords = torch.cartesian_prod(t, h, w)
    near = (coords[:, None] - coords[None]).abs().amax(-1) <= 2
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8, -1)
    local = (p * near).sum(-1).mean().item()
    share = near.double().mean().item()
    assert local > 0.5 and local > 2 * share


def test_later_steps_are_noisier(small: CalibrationSet) -> None:
    fp8 = AttentionSpec.from_dict({"mode": "fp8_dense", "tile": [1, 4, 4]})
    ref_spec = AttentionSpec.from_dict({"mode": "bf16_dense"})
    grid = small.meta.grid
    for layer in (0, 3):
        errs = []
        for step in (0, 9):
            q, k, v = small.qkv(layer, step)
            ref = attention(q, k, v, grid=grid, spec=ref_spec)
            errs.append(rel_l2(attention(q, k, v, grid=grid, spec=fp8), ref))
        assert 0 < errs[0] < errs[1] < 0.2


def test_save_load_round_trip(small: CalibrationSet, tmp_path: Path) -> None:
    path = tmp_path / "cal.safetensors"
    save_calibration(small, path)
    loaded = load_calibration(path, model=MINI)
    assert loaded.meta == small.meta
    assert sorted(loaded.tensors) == sorted(small.tensors)
    assert all(torch.equal(loaded.tensors[n], small.tensors[n]) for n in small.tensors)
    assert "q/layer3/step9" in loaded.tensors


def _write_raw(cal: CalibrationSet, path: Path, **override: torch.Tensor) -> None:
    tensors = {**cal.tensors, **override}
    save_file(tensors, str(path), metadata={META_KEY: cal.meta.to_json()})


def test_nan_and_inf_are_refused_with_one_line(small: CalibrationSet, tmp_path: Path) -> None:
    bad = small.tensors["k/layer3/step0"].clone()
    bad[0, 1, 5, 7] = float("nan")
    path = tmp_path / "nan.safetensors"
    _write_raw(small, path, **{"k/layer3/step0": bad})
    with pytest.raises(CalibrationError) as e:
        load_calibration(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "k/layer3/step0" in msg and "NaN" in msg

    inf = small.tensors["v/layer0/step9"].clone()
    inf[0, 0, 0, 0] = float("inf")
    _write_raw(small, path, **{"v/layer0/step9": inf})
    with pytest.raises(CalibrationError, match=r"v/layer0/step9: holds Inf"):
        load_calibration(path)
    # saving refuses it as well, and leaves no file behind
    broken = CalibrationSet(small.meta, {**small.tensors, "v/layer0/step9": inf})
    with pytest.raises(CalibrationError, match="holds Inf"):
        save_calibration(broken, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_file_errors_are_one_line(small: CalibrationSet, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no such calibration file"):
        load_calibration(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationError, match="not a safetensors file"):
        load_calibration(junk)
    no_meta = tmp_path / "nometa.safetensors"
    save_file({"x": torch.zeros(1)}, str(no_meta))
    with pytest.raises(CalibrationError, match="no 'fpstune' metadata"):
        load_calibration(no_meta)
    short = tmp_path / "short.safetensors"
    tensors = {n: t for n, t in small.tensors.items() if n != "q/layer0/step9"}
    save_file(tensors, str(short), metadata={META_KEY: small.meta.to_json()})
    with pytest.raises(CalibrationError, match="q/layer0/step9 is missing"):
        load_calibration(short)
    wrong = tmp_path / "shape.safetensors"
    _write_raw(small, wrong, **{"q/layer0/step0": torch.zeros(1, 4, 7, 64)})
    with pytest.raises(CalibrationError, match=r"q/layer0/step0: shape \[1, 4, 7, 64\]"):
        load_calibration(wrong)
    meta = json.loads(small.meta.to_json())
    meta["format_version"] = 99
    save_file(dict(small.tensors), str(wrong), metadata={META_KEY: json.dumps(meta)})
    with pytest.raises(CalibrationError, match="metadata: format_version 99"):
        load_calibration(wrong)


def test_check_fits_names_the_field(small: CalibrationSet) -> None:
    check_fits(small, MINI)
    other = MINI.model_copy(update={"heads": 8})
    with pytest.raises(CalibrationError, match="heads: calibration set has 4, model has 8"):
        check_fits(small, other)


def test_grid_cap_and_spacing() -> None:
    assert cap_grid((5, 12, 16), None) == (5, 12, 16)
    assert cap_grid((5, 12, 16), 960) == (5, 12, 16)
    capped = cap_grid((21, 45, 80), 4096)
    assert math.prod(capped) <= 4096 and capped[0] < capped[1] < capped[2]
    assert cap_grid((1, 1, 100), 10) == (1, 1, 10)
    assert evenly_spaced(50, 4) == [0, 16, 33, 49]
    assert evenly_spaced(3, 5) == [0, 1, 2] and evenly_spaced(7, 1) == [0]


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_on_known_vectors() -> None:
    ref = torch.tensor([3.0, 4.0, 0.0])
    assert rel_l2(ref, ref) == 0.0 and cosine(ref, ref) == pytest.approx(1.0)
    assert rel_l2(2 * ref, ref) == pytest.approx(1.0) and cosine(2 * ref, ref) == pytest.approx(1)
    assert rel_l2(-ref, ref) == pytest.approx(2.0) and cosine(-ref, ref) == pytest.approx(-1.0)
    ortho = torch.tensor([-4.0, 3.0, 0.0])
    assert cosine(ortho, ref) == pytest.approx(0.0)
    assert rel_l2(ortho, ref) == pytest.approx(math.sqrt(2))
    assert rel_l2(torch.tensor([3.0, 4.0, 1.0]), ref) == pytest.approx(0.2)
    zero = torch.zeros(3)
    assert rel_l2(zero, zero) == 0.0 and rel_l2(ref, zero) == math.inf
    assert compare(ref.view(1, 1, 3, 1), ref.view(1, 1, 3, 1)) == {"rel_l2": 0.0, "cosine": 1.0}
    with pytest.raises(ValueError, match="shape"):
        rel_l2(ref, ref[:2])
    with pytest.raises(ValueError, match="unknown metric"):
        compare(ref, ref, ["psnr"])


def test_metrics_accumulate_in_float64() -> None:
    # bf16 inputs: the metric must not be computed in bf16 (this error would vanish there)
    ref = torch.full((1 << 12,), 1.0, dtype=torch.bfloat16)
    out = ref.clone()
    out[0] = 1.0078125  # one bf16 ulp above 1
    expected = 0.0078125 / math.sqrt(1 << 12)
    assert rel_l2(out, ref) == pytest.approx(expected, rel=1e-9)
