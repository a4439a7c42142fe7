"""Policy YAML: load / dump round trip, refusals with one-line errors, lookups for every cell."""

from __future__ import annotations

import copy
import itertools
import math
import os
import pickle
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shared_helpers import ALIAS_BOMB, H100

from fpstune.kernels import (
    AttentionSpec,
    HardwareFingerprint,
    ModelShape,
    Policy,
    PolicyEntry,
    PolicyError,
    PolicyWarning,
    Provenance,
    SpecError,
    current_fingerprint,
    default_config,
    same_gpu_type,
)
from fpstune.kernels import policy as policy_module
from fpstune.kernels.fingerprint import describe_differences, differences
from fpstune.kernels.spec import Mode

A100 = H100.model_copy(
    update={"gpu": "NVIDIA A100-SXM4-80GB", "sm_count": 108, "capability": (8, 0)}
)
CPU = HardwareFingerprint(gpu="cpu", sm_count=0, capability=(0, 0), torch="2.13.0", fpstune="0.1.0")
WAN_1_3B = ModelShape(
    name="wan2.1-t2v-1.3b", heads=12, head_dim=128, layers=30, grid=(21, 30, 52), steps=50, cfg=2
)
KERNEL = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3}
SPARSE = AttentionSpec.from_dict(
    {
        "mode": "fp8_sparse",
        "tile": [2, 8, 8],
        "sparsity": 0.75,
        "pattern": {"kind": "topk"},
        "kernel": KERNEL,
    }
)


def make_policy(**changes: Any) -> Policy:
    fields: dict[str, Any] = {
        "model": WAN_1_3B,
        "hardware": H100,
        "provenance": Provenance(
            study="wan2.1-t2v-1.3b-480p",
            trial=137,
            storage="sqlite:///fpstune.db",
            objectives={"latency_ms": 311.2, "psnr": 31.4},
            created=datetime(2026, 11, 23, 10, tzinfo=UTC),
            fpstune_version="0.1.0",
        ),
        "default": AttentionSpec.from_dict({"mode": "fp8_dense", "tile": [2, 8, 8]}),
        "entries": [
            PolicyEntry(steps=(0, 10), layers=(0, 30), spec=AttentionSpec(mode=Mode.BF16_DENSE)),
            PolicyEntry(steps=(10, 50), layers=(2, 30), spec=SPARSE),
            PolicyEntry(steps=(45, 50), layers=(0, 1), spec=AttentionSpec(mode=Mode.BF16_DENSE)),
        ],
    }
    return Policy(**{**fields, **changes})


def expected_spec(policy: Policy, *, layer: int, step: int) -> AttentionSpec:
    hits = [
        e.spec
        for e in policy.entries
        if e.steps[0] <= step < e.steps[1] and e.layers[0] <= layer < e.layers[1]
    ]
    assert len(hits) <= 1
    return hits[0] if hits else policy.default


def raises_policy_error(fn: Callable[[], object]) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        fn()
    e = info.value
    assert "\n" not in str(e)
    return e


# -- round trip ---------------------------------------------------------------------------------


def test_dump_load_round_trip(tmp_path: Path) -> None:
    policy = make_policy()
    path = tmp_path / "policy.yaml"
    policy.dump(path)
    loaded = Policy.load(path, model=WAN_1_3B, hardware=H100)
    assert loaded == policy
    assert loaded.to_dict() == policy.to_dict()
    assert Policy.from_dict(policy.to_dict()) == policy
    assert os.listdir(tmp_path) == ["policy.yaml"]  # no temp file left behind
    text = path.read_text()
    assert text.startswith("# fpstune policy")
    assert "grid: [21, 30, 52]" in text


def test_dump_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.yaml"
    make_policy().dump(path)
    before = path.read_bytes()

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(policy_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        make_policy(entries=[]).dump(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["policy.yaml"]


def test_policy_without_provenance_round_trips() -> None:
    policy = make_policy(provenance=None)
    assert "provenance" not in policy.to_dict()
    assert Policy.from_dict(policy.to_dict()) == policy
    stamped = policy.with_provenance(
        {"study": "s", "created": "2026-11-23T10:00:00+00:00", "fpstune_version": "0.1.0"}
    )
    assert stamped.provenance is not None and stamped.provenance.study == "s"
    assert stamped.entries == policy.entries


def test_storage_credentials_are_masked() -> None:
    policy = make_policy(
        provenance=Provenance(
            study="s",
            storage="postgresql+psycopg://tuner:hunter2@db:5432/fpstune?sslmode=require&password=x",
            created=datetime(2026, 1, 1, tzinfo=UTC),
            fpstune_version="0.1.0",
        )
    )
    assert policy.provenance is not None
    assert policy.provenance.storage == (
        "postgresql+psycopg://tuner:***@db:5432/fpstune?sslmode=require&password=***"
    )
    assert "hunter2" not in yaml.safe_dump(policy.to_dict())


# -- lookups ------------------------------------------------------------------------------------


def test_spec_answers_for_every_cell() -> None:
    policy = make_policy()
    table = policy.spec_table()
    modes = policy.grid_of_modes()
    assert len(table) == WAN_1_3B.steps and len(table[0]) == WAN_1_3B.layers
    for step, layer in itertools.product(range(WAN_1_3B.steps), range(WAN_1_3B.layers)):
        want = expected_spec(policy, layer=layer, step=step)
        assert policy.spec(layer=layer, step=step) == want
        assert table[step][layer] == want and modes[step][layer] == want.mode
    assert policy.spec(layer=0, step=0).mode is Mode.BF16_DENSE
    assert policy.spec(layer=1, step=20).mode is Mode.FP8_DENSE  # the default
    assert policy.spec(layer=29, step=49) == SPARSE


@pytest.mark.parametrize(
    ("layer", "step", "message"),
    [
        (0, 50, r"step 50 is outside the policy's steps \[0, 50\)"),
        (0, -1, r"step -1 is outside"),
        (30, 0, r"layer 30 is outside the policy's layers \[0, 30\)"),
        (-1, 0, r"layer -1 is outside"),
    ],
)
def test_spec_out_of_range(layer: int, step: int, message: str) -> None:
    with pytest.raises(IndexError, match=message):
        make_policy().spec(layer=layer, step=step)


# -- refusals of the content ----------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if p.isdigit() else d[p]  # type: ignore[index]
        d[int(last) if last.isdigit() else last] = value  # type: ignore[index]

    return apply


def _add_entry(steps: list[int], layers: list[int]) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["entries"].append(
        {"steps": steps, "layers": layers, "spec": {"mode": "bf16_dense"}}
    )


REFUSALS: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("unknown key", _set("model.head", 12), "model.head", "unknown key (did you mean 'heads'?)"),
    ("unknown top key", _set("entires", []), "entires", "unknown key (did you mean 'entries'?)"),
    ("wrong type", _set("model.heads", "twelve"), "model.heads", "valid integer, got 'twelve'"),
    ("bool as int", _set("model.layers", True), "model.layers", "valid integer, got True"),
    ("missing", lambda d: d.pop("default"), "default", "missing"),
    ("grid length", _set("model.grid", [21, 30]), "model.grid[2]", "missing"),
    ("steps too many", _set("model.steps", 10**6), "model.steps", "less than or equal to 1000"),
    ("mode", _set("default.mode", "fp4_dense"), "default.mode", "got 'fp4_dense'"),
    (
        "dense with sparsity",
        _set("entries.0.spec.sparsity", 0.5),
        "entries[0].spec.sparsity",
        "dense mode bf16_dense takes no sparsity",
    ),
    (
        "overlap",
        _add_entry([5, 20], [0, 3]),
        "entries[3]",
        "overlaps entries[0] at step 5, layer 0",
    ),
    (
        "step range past the model",
        _add_entry([40, 60], [0, 1]),
        "entries[3].steps",
        "[40, 60) goes past the model's 50 steps [0, 50)",
    ),
    (
        "layer range past the model",
        _add_entry([10, 11], [0, 31]),
        "entries[3].layers",
        "[0, 31) goes past the model's 30 layers [0, 30)",
    ),
    ("empty range", _add_entry([10, 10], [0, 1]), "entries[3].steps", "[10, 10) is empty"),
    ("negative", _add_entry([-1, 3], [0, 1]), "entries[3].steps[0]", "greater than or equal to 0"),
    (
        "infeasible kernel",
        _set("entries.1.spec.kernel.block_m", 256),
        "entries[1].spec.kernel",
        "block_m=256 does not divide the tile's 128 tokens [2, 8, 8]",
    ),
    (
        "infeasible default kernel",
        _set("default.kernel", {**KERNEL, "block_n": 48}),
        "default.kernel",
        "block_n=48 is not a power of two",
    ),
    (
        "fp8 on an sm_80 policy",
        _set("hardware.capability", [8, 0]),
        "entries[1].spec.kernel",
        "fp8 needs compute capability >= 8.9",
    ),
    (
        "removed knob exp2",
        _set("entries.1.spec.kernel.exp2", "f16x2"),
        "entries[1].spec.kernel.exp2",
        "packed fp16 exponentials (f16x2) saved nothing on sm_90 and were removed",
    ),
    (
        "removed knob exp2 at its old default",
        _set("default.kernel", {**KERNEL, "exp2": "f32"}),
        "default.kernel.exp2",
        "delete the key",
    ),
    (
        "unregistered knob",
        _set("entries.1.spec.kernel.knobs", {"toy": 1}),
        "entries[1].spec.kernel.knobs.toy",
        "unknown knob 'toy' (registered: none)",
    ),
    (
        "naive timestamp",
        _set("provenance.created", "2026-11-23T10:00:00"),
        "provenance.created",
        "timezone",
    ),
    (
        "nan objective",
        _set("provenance.objectives.psnr", float("nan")),
        "provenance.objectives.psnr",
        "finite number, got nan",
    ),
    ("entries not a list", _set("entries", {"a": 1}), "entries", "Input should be a list"),
    ("schema version", _set("schema_version", 2), "schema_version", "2 is not supported"),
    ("schema version text", _set("schema_version", "1"), "schema_version", "'1' is not supported"),
    ("no schema version", lambda d: d.pop("schema_version"), "schema_version", "missing"),
    ("checksum", _set("model.name", "other"), "checksum", "does not match the content"),
    ("checksum type", _set("checksum", 3), "checksum", "expected a string"),
]


@pytest.mark.parametrize(
    ("mutate", "field", "message"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
def test_refusals_name_the_field(
    mutate: Callable[[dict[str, Any]], None], field: str, message: str
) -> None:
    d = make_policy().to_dict()
    if field != "checksum":
        del d["checksum"]  # so the content check, not the checksum, answers
    mutate(d)
    e = raises_policy_error(lambda: Policy.from_dict(d))
    assert e.field == field, str(e)
    assert message in e.message, str(e)
    assert str(e) == f"{e.field}: {e.message}"


def test_hand_edit_without_checksum_loads(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    make_policy().dump(path)
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("checksum:")]
    path.write_text("\n".join(lines).replace("sparsity: 0.75", "sparsity: 0.8") + "\n")
    loaded = Policy.load(path, hardware=H100)
    assert loaded.spec(layer=29, step=49).sparsity == 0.8


def test_policy_file_naming_the_removed_exp2_knob_is_refused_in_one_line(tmp_path: Path) -> None:
    """Policies written while ``exp2`` existed name it only when it was ``f16x2`` (the default
    was left out of the stored form): such a file is refused in one line naming the field."""
    path = tmp_path / "policy.yaml"
    make_policy().dump(path)
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("checksum:")]
    at = next(i for i, ln in enumerate(lines) if ln.strip() == "num_stages: 3")
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    lines.insert(at + 1, f"{indent}exp2: f16x2")
    path.write_text("\n".join(lines) + "\n")
    e = raises_policy_error(lambda: Policy.load(path, hardware=H100))
    assert e.field.endswith("kernel.exp2") and "removed" in e.message, str(e)
    assert str(e).startswith(f"{path}: ")


# -- refusals of the file -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file (expected a policy mapping)"),
        (b"# only a comment\n", "empty file"),
        (b"- 1\n- 2\n", "expected a mapping at the top level, got a list"),
        (b"just a string\n", "expected a mapping at the top level, got a string"),
        (b"model: [1, 2\n", "not valid YAML"),
        (b"model: {heads: 12\n", "not valid YAML"),
        (b"a: 1\na: 2\n", "not valid YAML: duplicate key 'a' at line 2, column 1"),
        (b"\xff\xfe\x00garbage", "not UTF-8 text"),
        (b"a: !!python/object:os.system x\n", "not valid YAML"),
        (b"created: 2026-13-45\n", "not valid YAML"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(content)
    e = raises_policy_error(lambda: Policy.load(path, hardware=None))
    assert str(e).startswith(f"{path}: ")
    assert message in str(e)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    e = raises_policy_error(lambda: Policy.load(tmp_path / "nope.yaml"))
    assert str(e) == f"{tmp_path / 'nope.yaml'}: no such file"
    e = raises_policy_error(lambda: Policy.load(tmp_path))
    assert "is a directory" in str(e)


# -- hostile files: each refused with a PolicyError in bounded time --------------------------------


def _policy_text(**edits: Any) -> str:
    d = make_policy().to_dict()
    d.pop("checksum", None)
    for dotted, value in edits.items():
        *parents, last = dotted.split("__")
        target = d
        for part in parents:
            target = target[part]
        target[last] = value
    return yaml.safe_dump(d, sort_keys=False)


def _hostile(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "policy.yaml"
    bomb = {"bomb-notes": "provenance__notes", "bomb-model-name": "model__name"}
    if kind in bomb:
        path.write_text(_policy_text(**{bomb[kind]: "BOMB"}).replace("BOMB", ALIAS_BOMB))
    elif kind in ("/dev/zero", "/dev/urandom"):
        path.symlink_to(kind)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "oversize":
        path.write_text(_policy_text() + "# padding\n" * 120_000)
    elif kind == "100k-entries":
        entry = "- {steps: [0, 1], layers: [0, 1], spec: {mode: bf16_dense}}\n"
        path.write_text(
            _policy_text(entries=[]).replace("entries: []\n", "entries:\n" + entry * 10**5)
        )
    elif kind == "many-nodes":
        path.write_text(
            _policy_text(provenance__notes="NODES").replace("NODES", "[" + "1," * 125_000 + "1]")
        )
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("bomb-notes", "YAML anchors/aliases are not allowed"),
        ("bomb-model-name", "YAML anchors/aliases are not allowed"),
        ("/dev/zero", "not a regular file"),
        ("/dev/urandom", "not a regular file"),
        ("fifo", "not a regular file"),
        ("oversize", "more than 1048576 bytes"),
        ("100k-entries", "more than 1048576 bytes"),
        ("many-nodes", "more than 120000 YAML nodes"),
    ],
)
def test_hostile_files_are_refused_quickly(tmp_path: Path, kind: str, message: str) -> None:
    path = _hostile(tmp_path, kind)
    start = time.monotonic()
    e = raises_policy_error(lambda: Policy.load(path, hardware=None))
    assert time.monotonic() - start < 10  # a hang bound, not a benchmark (shared CI cores)
    assert str(e).startswith(f"{path}: ") and message in str(e), str(e)


def _windowed(window: list[float]) -> dict[str, Any]:
    return {"mode": "fp8_sparse", "sparsity": 0.5, "pattern": {"kind": "window", "window": window}}


@pytest.mark.parametrize(
    ("default", "field", "message"),
    [
        (_windowed([math.nan, 1, 1]), "default.pattern.window[0]", "finite number"),
        (_windowed([1, 1, math.inf]), "default.pattern.window[2]", "finite number"),
        ({"mode": "fp8_sparse", "sparsity": 0.5, "pattern": {"kind": "cdf", "mass": math.nan}},
         "default.pattern.mass", "finite number"),
        ({"mode": "fp8_sparse", "sparsity": math.nan, "pattern": {"kind": "topk"}},
         "default.sparsity", "finite number"),
        ({"mode": "fp8_dense", "tile": [100_000] * 3}, "default.tile", "more than 8192"),
        ({"mode": "fp8_dense", "tile": [1, 1, 4096]}, "default.tile", "far larger than the grid"),
    ],
)  # fmt: skip
def test_non_finite_floats_and_oversize_tiles_are_refused(
    tmp_path: Path, default: dict[str, Any], field: str, message: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy_text(default=default))
    e = raises_policy_error(lambda: Policy.load(path, hardware=None))
    assert f"{path}: {field}: " in str(e) and message in str(e), str(e)


def test_attention_refuses_a_tile_far_larger_than_the_grid() -> None:
    import torch

    from fpstune.kernels import attention

    q = torch.zeros(1, 1, 5 * 12 * 16, 8)
    spec = AttentionSpec.from_dict({"mode": "fp8_dense", "tile": [1, 1, 4096]})
    with pytest.raises(ValueError, match=r"spec\.tile \[1, 1, 4096\] is far larger than the grid"):
        attention(q, q, q, grid=(5, 12, 16), spec=spec, backend="reference")
    with pytest.raises(SpecError, match="more than 8192"):
        AttentionSpec.from_dict({"mode": "fp8_dense", "tile": [100_000] * 3})


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    policy = make_policy()
    path = tmp_path / "policy.yaml"
    policy.dump(path)
    text = path.read_text()
    line_ends = [i for i, ch in enumerate(text) if ch == "\n"]
    refused = 0
    for cut in [*line_ends[:-1], len(text) // 2, len(text) - 5]:
        path.write_text(text[:cut])
        try:
            loaded = Policy.load(path, hardware=H100)
        except PolicyError as e:
            assert "\n" not in str(e)
            refused += 1
        else:  # only a cut that loses nothing but defaults (a trailing "sparsity: 0.0") loads
            assert loaded == policy
    assert refused >= len(line_ends) - 2


def test_error_text_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_policy().dump("policy.yaml")
    e = raises_policy_error(
        lambda: Policy.load("policy.yaml", model=WAN_1_3B.model_copy(update={"heads": 40}))
    )
    assert str(e) == "policy.yaml: model.heads: policy has 12, model has 40"
    assert (e.path, e.field) == ("policy.yaml", "model.heads")
    e = raises_policy_error(
        lambda: Policy.load("policy.yaml", model=WAN_1_3B.model_copy(update={"grid": (21, 45, 80)}))
    )
    assert str(e) == "policy.yaml: model.grid: policy has [21, 30, 52], model has [21, 45, 80]"
    Path("v2.yaml").write_text("schema_version: 2\n")
    e = raises_policy_error(lambda: Policy.load("v2.yaml"))
    assert str(e) == "v2.yaml: schema_version: 2 is not supported (this fpstune reads 1)"
    assert issubclass(PolicyError, SpecError) and issubclass(SpecError, ValueError)
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) and e2.field == e.field


# -- model and hardware checks --------------------------------------------------------------------


def test_model_name_mismatch_warns(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    make_policy().dump(path)
    with pytest.warns(PolicyWarning, match="model.name: tuned for wan2.1-t2v-1.3b"):
        Policy.load(path, model=WAN_1_3B.model_copy(update={"name": "my-finetune"}), hardware=H100)


@pytest.mark.parametrize("name", ["steps", "cfg", "layers", "head_dim"])
def test_model_shape_mismatch(tmp_path: Path, name: str) -> None:
    path = tmp_path / "policy.yaml"
    make_policy().dump(path)
    other = WAN_1_3B.model_copy(update={name: getattr(WAN_1_3B, name) + 1})
    e = raises_policy_error(lambda: Policy.load(path, model=other, hardware=H100))
    assert e.field == f"model.{name}"


def test_other_gpu_type_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_policy().dump("policy.yaml")
    e = raises_policy_error(lambda: Policy.load("policy.yaml", hardware=A100))
    assert str(e) == (
        "policy.yaml: hardware.gpu: tuned on NVIDIA H100 80GB HBM3, this machine has "
        "NVIDIA A100-SXM4-80GB (pass allow_other_gpu=True to run it anyway)"
    )
    fewer_sms = H100.model_copy(update={"sm_count": 114})
    e = raises_policy_error(lambda: Policy.load("policy.yaml", hardware=fewer_sms))
    assert e.field == "hardware.sm_count" and "tuned on 132 SMs, this machine has 114 SMs" in str(e)


def test_allow_other_gpu_warns(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    make_policy().dump(path)
    with pytest.warns(PolicyWarning, match="hardware.gpu: tuned on NVIDIA H100.*running it anyway"):
        policy = Policy.load(path, hardware=A100, allow_other_gpu=True)
    assert policy == make_policy()


def test_software_versions_warn_only(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    make_policy().dump(path)
    newer = H100.model_copy(update={"torch": "2.13.0", "triton": None, "driver": "560.1"})
    with pytest.warns(PolicyWarning) as record:
        Policy.load(path, hardware=newer)
    (w,) = record
    assert str(w.message).endswith(
        "hardware: tuned with driver 550.54.15, torch 2.11.0, triton 3.6.0; this machine has "
        "driver 560.1, torch 2.13.0, triton none (latency may differ)"
    )
    assert w.filename == __file__  # points at the caller, not at policy.py


def test_hardware_none_skips_and_auto_compares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.yaml"
    make_policy().dump(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Policy.load(path, hardware=None)
        monkeypatch.setattr(policy_module, "current_fingerprint", lambda: H100)
        Policy.load(path)  # hardware="auto"
    monkeypatch.setattr(policy_module, "current_fingerprint", lambda: CPU)
    e = raises_policy_error(lambda: Policy.load(path))
    assert "this machine has cpu" in str(e)


def test_fingerprint_helpers() -> None:
    here = current_fingerprint()
    assert here.torch and here.fpstune
    if here.is_cpu:
        assert (here.sm_count, here.capability) == (0, (0, 0))
    assert same_gpu_type(H100, H100.model_copy(update={"torch": "9"}))
    assert not same_gpu_type(H100, A100)
    assert list(differences(H100, A100)) == ["gpu", "sm_count", "capability"]
    assert describe_differences(H100, H100) == ""
    assert "capability: 9.0 vs 8.0" in describe_differences(H100, A100)
    with pytest.raises(ValueError):
        HardwareFingerprint.model_validate({**H100.model_dump(), "vram": 80})


# -- property-based -------------------------------------------------------------------------------

TILES = [(2, 8, 8), (1, 16, 8), (4, 8, 8), (2, 4, 16)]
FINITE = st.floats(allow_nan=False, allow_infinity=False)
TEXT = st.text(min_size=1, max_size=12)


@st.composite
def specs(draw: st.DrawFn, head_dim: int) -> AttentionSpec:
    mode = draw(st.sampled_from(list(Mode)))
    if mode is Mode.BF16_DENSE and draw(st.booleans()):
        return AttentionSpec(mode=mode)
    tile = draw(st.sampled_from(TILES))
    kernel = draw(st.sampled_from([None, default_config(tile, head_dim, mode)]))
    d: dict[str, Any] = {"mode": mode, "tile": tile, "kernel": kernel}
    if mode.sparse:
        d["sparsity"] = draw(st.floats(0.0, 0.99))
        d["pattern"] = {
            "kind": draw(st.sampled_from(["window", "topk", "cdf"])),
            "window": draw(st.tuples(*[st.floats(0.1, 8.0)] * 3)),
            "mass": draw(st.floats(0.01, 1.0)),
        }
    return AttentionSpec.model_validate(d)


def _ranges(draw: st.DrawFn, n: int) -> list[tuple[int, int]]:
    cuts = draw(st.sets(st.integers(1, n - 1), max_size=4)) if n > 1 else set()
    bounds = [0, *sorted(cuts), n]
    return list(itertools.pairwise(bounds))


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    head_dim = draw(st.sampled_from([64, 128]))
    model = ModelShape(
        name=draw(TEXT),
        heads=draw(st.integers(1, 64)),
        head_dim=head_dim,
        layers=draw(st.integers(1, 40)),
        # at least every TILES entry in each dim: a tile far larger than the grid is refused
        grid=draw(st.tuples(st.integers(4, 100), st.integers(16, 100), st.integers(16, 100))),
        steps=draw(st.integers(1, 60)),
        cfg=draw(st.integers(1, 3)),
    )
    hardware = draw(st.sampled_from([H100, CPU, H100.model_copy(update={"capability": (12, 0)})]))
    provenance = draw(
        st.none()
        | st.builds(
            Provenance,
            study=TEXT,
            trial=st.none() | st.integers(0, 10**6),
            storage=st.none() | st.sampled_from(["sqlite:///x.db", "postgresql://u@h/db"]),
            objectives=st.dictionaries(TEXT, FINITE, max_size=3),
            remeasured=st.dictionaries(TEXT, FINITE, max_size=3),
            created=st.datetimes(
                min_value=datetime(1970, 1, 1),
                max_value=datetime(2100, 1, 1),
                timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
            ),
            fpstune_version=st.just("0.1.0"),
            notes=st.none() | st.text(max_size=30),
        )
    )
    cells = list(itertools.product(_ranges(draw, model.steps), _ranges(draw, model.layers)))
    picked = draw(st.lists(st.sampled_from(cells), unique=True, max_size=6)) if cells else []
    entries = [PolicyEntry(steps=s, layers=lay, spec=draw(specs(head_dim))) for s, lay in picked]
    return Policy(
        model=model,
        hardware=hardware,
        provenance=provenance,
        default=draw(specs(head_dim)),
        entries=entries,
    )


PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(policy=policies())
def test_random_policies_round_trip(policy: Policy, tmp_path: Path) -> None:
    assert Policy.from_dict(policy.to_dict()) == policy
    path = tmp_path / "p.yaml"
    policy.dump(path)
    assert Policy.load(path, hardware=policy.hardware) == policy
    step, layer = policy.model.steps - 1, policy.model.layers - 1
    assert policy.spec(layer=layer, step=step) == expected_spec(policy, layer=layer, step=step)


JUNK = (
    st.none()
    | st.booleans()
    | st.integers(-(10**9), 10**9)
    | st.floats()
    | st.text(max_size=6)
    | st.lists(st.integers(-3, 3), max_size=4)
    | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
)


def _containers(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path] if isinstance(obj, dict | list) else []
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    for k, v in items:
        out += _containers(v, (*path, k))
    return out


def _at(obj: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


@st.composite
def corrupted(draw: st.DrawFn) -> dict[str, Any]:
    d = copy.deepcopy(draw(policies()).to_dict())
    if draw(st.booleans()):
        del d["checksum"]
    for _ in range(draw(st.integers(1, 3))):
        target = _at(d, draw(st.sampled_from(_containers(d))))
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        op = draw(st.sampled_from(["replace", "delete", "add"] if keys else ["add"]))
        if op == "add":
            if isinstance(target, dict):
                target[draw(st.text(max_size=8))] = draw(JUNK)
            else:
                target.append(draw(JUNK))
        else:
            key = draw(st.sampled_from(keys))
            if op == "delete":
                del target[key]
            else:
                target[key] = draw(JUNK)
    return d


@PROPERTY
@given(d=corrupted())
def test_corrupted_dicts_raise_policy_error(d: dict[str, Any]) -> None:
    try:
        policy = Policy.from_dict(d)
    except PolicyError as e:  # any other exception type fails the test
        assert e.field, str(e)
        assert "\n" not in str(e)
    else:
        assert Policy.from_dict(policy.to_dict()) == policy


@PROPERTY
@given(
    policy=policies(),
    edits=st.lists(
        st.tuples(st.sampled_from(["cut", "drop", "put"]), st.floats(0, 1), st.characters()),
        min_size=1,
        max_size=3,
    ),
)
def test_corrupted_files_never_load_as_something_else(
    policy: Policy, edits: list[tuple[str, float, str]], tmp_path: Path
) -> None:
    path = tmp_path / "p.yaml"
    policy.dump(path)
    text = path.read_text()
    for op, where, ch in edits:
        i = int(where * len(text))
        text = {"cut": text[:i], "drop": text[:i] + text[i + 1 :], "put": text[:i] + ch + text[i:]}[
            op
        ]
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        loaded = Policy.load(path, hardware=None)
    except PolicyError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
    else:  # the checksum lets only harmless edits (comments, spacing) through
        assert loaded == policy
