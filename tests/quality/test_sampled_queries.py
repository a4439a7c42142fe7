"""Calibration sets with sampled query rows (`fpstune capture --max-tokens`): files, probe."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fpstune.kernels import AttentionSpec, attention
from fpstune.kernels.policy import ModelShape
from fpstune.quality import AttentionProbe, compare, load_calibration, synthetic_calibration
from fpstune.quality.calibration import (
    META_KEY,
    CalibrationError,
    CalibrationSet,
    CellWriter,
    query_rows,
    save_calibration,
)
from fpstune.stages.evaluation import CandidateError

SHAPE = ModelShape(name="s", heads=2, head_dim=32, layers=2, grid=(4, 8, 8), steps=4, cfg=2)
BOX = (2, 4, 4)
SPECS = {
    "fp8_dense": {"mode": "fp8_dense", "tile": [1, 4, 4]},
    "fp8_sparse_window": {
        "mode": "fp8_sparse", "tile": [2, 2, 4], "sparsity": 0.5, "pattern": {"kind": "window"},
    },
    "fp8_sparse_topk": {
        "mode": "fp8_sparse", "tile": [1, 4, 4], "sparsity": 0.5, "pattern": {"kind": "topk"},
    },
    "fp8_sparse_cdf": {
        "mode": "fp8_sparse", "tile": [2, 4, 2], "sparsity": 0.75,
        "pattern": {"kind": "cdf", "mass": 0.9},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def full() -> CalibrationSet:
    return synthetic_calibration(SHAPE, seed=1, layers=[0, 1], steps=[0, 3], batch=2)


def _sampled(full: CalibrationSet, rows: torch.Tensor, box: tuple[int, int, int]) -> CalibrationSet:
    meta = replace(full.meta, source="captured", queries=rows.numel(), query_box=box)
    tensors = {n: t[:, :, rows] if n.startswith("q/") else t for n, t in full.tensors.items()}
    return CalibrationSet(meta, tensors, rows)


class Fixed:
    def __init__(self, spec: AttentionSpec) -> None:
        self._spec = spec

    def spec(self, *, layer: int, step: int) -> AttentionSpec:
        return self._spec


def test_query_rows_are_a_seeded_sample_of_whole_boxes() -> None:
    rows = query_rows(SHAPE.grid, BOX, 64)
    assert rows.numel() == 64 and torch.equal(rows, query_rows(SHAPE.grid, BOX, 64))
    assert torch.equal(rows, rows.unique())  # ascending, distinct
    t, h, w = rows // 64, rows // 8 % 8, rows % 8
    boxes = (t // 2) * 4 + (h // 4) * 2 + w // 4
    assert sorted(torch.bincount(boxes).tolist(), reverse=True)[:2] == [32, 32]
    assert query_rows(SHAPE.grid, BOX, None).numel() == 256
    assert query_rows(SHAPE.grid, BOX, 10).numel() == 32  # at least one box


@pytest.mark.parametrize("name", list(SPECS))
def test_sampled_score_equals_the_full_score_on_the_same_rows(
    full: CalibrationSet, name: str
) -> None:
    rows = query_rows(SHAPE.grid, BOX, 64)
    spec = AttentionSpec.from_dict(SPECS[name])
    result = AttentionProbe(_sampled(full, rows, BOX)).measure(Fixed(spec))
    got = dict((tuple(c), v) for c, v in result.attrs["cell_rel_l2"])
    assert result.attrs["calibration"]["queries"] == 64
    wants = []
    for (layer, step), (q, k, v) in full:
        ref = attention(q, k, v, grid=SHAPE.grid, spec=AttentionSpec(mode="bf16_dense"))
        out = attention(q, k, v, grid=SHAPE.grid, spec=spec)
        want = compare(out[:, :, rows], ref[:, :, rows], ("rel_l2",))["rel_l2"]
        assert want > 1e-3  # the spec really differs from the reference
        assert got[(layer, step)] == pytest.approx(want, rel=1e-5)  # attrs keep 6 digits
        wants.append(want)
    assert result.values["rel_l2"] == pytest.approx(sum(wants) / len(wants), rel=1e-9)
    assert result.values["rel_l2_max"] == pytest.approx(max(wants), rel=1e-9)


def test_a_tile_not_dividing_the_box_is_refused(full: CalibrationSet) -> None:
    rows = query_rows(SHAPE.grid, BOX, 64)
    probe = AttentionProbe(_sampled(full, rows, BOX))
    spec = AttentionSpec.from_dict({"mode": "fp8_dense", "tile": [1, 8, 8]})
    with pytest.raises(CandidateError, match=r"tile \[1, 8, 8\] does not divide .* \[2, 4, 4\]"):
        probe.measure(Fixed(spec))
    # a window over bf16 needs no whole q tiles: scored
    spec = AttentionSpec.from_dict(
        {"mode": "bf16_sparse", "tile": [1, 8, 8], "sparsity": 0.5, "pattern": {"kind": "window"}}
    )
    assert probe.measure(Fixed(spec)).values["rel_l2"] > 0


def test_sharded_and_single_files_round_trip(full: CalibrationSet, tmp_path: Path) -> None:
    rows = query_rows(SHAPE.grid, BOX, 64)
    cal = _sampled(full, rows, BOX)
    one = tmp_path / "one.safetensors"
    save_calibration(cal, one)
    sharded = tmp_path / "sh.safetensors"
    writer = CellWriter(sharded)
    for (layer, step), (q, k, v) in cal:
        writer.write(layer, step, q, k, v)
    writer.finish(cal.meta, rows)
    for path in (one, sharded):
        got = load_calibration(path, model=SHAPE)
        assert got.meta == cal.meta and got.query_index is not None
        assert torch.equal(got.query_index, rows)
        assert all(torch.equal(got.tensors[n], t) for n, t in cal.tensors.items())
    # a missing shard or index is one line naming the file
    (shard,) = tmp_path.glob("sh.cells-*/layer1-step3.safetensors")
    shard.unlink()
    with pytest.raises(CalibrationError, match=f"{shard}: no such calibration shard"):
        load_calibration(sharded)
    save_file(dict(cal.tensors), str(one), metadata={META_KEY: cal.meta.to_json()})
    with pytest.raises(CalibrationError, match="query_index is missing"):
        load_calibration(one)


def test_format_1_files_still_load(full: CalibrationSet, tmp_path: Path) -> None:
    meta = json.loads(full.meta.to_json())
    for key in ("queries", "query_box"):
        del meta[key]
    meta["format_version"] = 1
    path = tmp_path / "v1.safetensors"
    save_file(dict(full.tensors), str(path), metadata={META_KEY: json.dumps(meta)})
    got = load_calibration(path, model=SHAPE)
    assert got.meta == full.meta and got.query_index is None


def test_the_greedy_baseline_refuses_a_set_of_sampled_queries(full: CalibrationSet) -> None:
    from fpstune.baselines import calibration_cells
    from fpstune.errors import BadInput

    assert set(calibration_cells(full, "s.yaml")) == set(full.cells)
    rows = torch.arange(SHAPE.grid[1] * SHAPE.grid[2])  # the first frame, a whole box
    sampled = _sampled(full, rows, (1, SHAPE.grid[1], SHAPE.grid[2]))
    with pytest.raises(BadInput) as e:
        calibration_cells(sampled, "s.yaml")
    assert str(e.value) == (
        f"s.yaml: calibration.source: the greedy baseline scores every query row; this set holds "
        f"{rows.numel()} of {full.meta.tokens} (captured with --max-tokens)"
    )


def test_a_relative_path_keeps_its_own_shards(
    full: CalibrationSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`finish` removes older sets' shard folders, never its own: on Python >= 3.12 mkdtemp
    returns an absolute path while a relative ``-o``'s folder lists relative ones."""
    import os
    import tempfile

    monkeypatch.chdir(tmp_path)
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: os.path.abspath(mkdtemp(**kw)))
    older = tmp_path / "rel.cells-zzzzzzzz"
    older.mkdir()
    writer = CellWriter("rel.safetensors")
    for (layer, step), (q, k, v) in full:
        writer.write(layer, step, q, k, v)
    writer.finish(full.meta, None)
    assert not older.exists()
    got = load_calibration(tmp_path / "rel.safetensors", model=SHAPE)
    assert all(torch.equal(got.tensors[n], t) for n, t in full.tensors.items())
