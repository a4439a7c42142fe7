"""Study files and search spaces: every shipped YAML loads, every bad input is one clear line."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from fpstune.kernels import Mode
from fpstune.spec import (
    BadInput,
    KernelSpace,
    ScheduleSpace,
    StudySpec,
    load_space,
    load_study,
)
from fpstune.spec.study import TPEOptions

ROOT = Path(__file__).resolve().parents[2]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


# -- shipped files --------------------------------------------------------------------------


def test_shipped_files_exist() -> None:
    names = {p.stem for p in STUDIES}
    assert {
        "mini",
        "wan2.1-t2v-1.3b-480p",
        "wan2.1-t2v-1.3b-720p",
        "wan2.1-t2v-14b-480p",
        "wan2.1-t2v-14b-720p",
    } <= names
    assert {p.stem for p in SPACES} >= {
        "kernel-default",
        "schedule-default",
        "kernel-mini",
        "schedule-mini",
    }


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_study_loads(path: Path) -> None:
    study = load_study(path)
    assert study.source == str(path)
    assert study.name == path.stem
    assert study.kernel_space.source.endswith(".yaml")
    if study.end_to_end is None:
        assert study.metric_names == ["latency_ms", "rel_l2"]
        assert study.directions == ["minimize", "minimize"]
    else:  # scored end to end on the mini model
        assert study.metric_names == ["latency_ms", "psnr"]
        assert study.directions == ["minimize", "maximize"]


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_space_loads(path: Path) -> None:
    space = load_space(path)
    assert isinstance(space, KernelSpace | ScheduleSpace)
    assert space.source == str(path)


@pytest.mark.parametrize(
    ("stem", "heads", "layers", "grid"),
    [
        ("wan2.1-t2v-1.3b-480p", 12, 30, (21, 30, 52)),
        ("wan2.1-t2v-1.3b-720p", 12, 30, (21, 45, 80)),
        ("wan2.1-t2v-14b-480p", 40, 40, (21, 30, 52)),
        ("wan2.1-t2v-14b-720p", 40, 40, (21, 45, 80)),
    ],
)
def test_wan_shapes_match_the_anchors(
    stem: str, heads: int, layers: int, grid: tuple[int, int, int]
) -> None:
    m = load_study(ROOT / "studies" / f"{stem}.yaml").model
    assert (m.adapter, m.heads, m.head_dim, m.layers, m.grid, m.steps, m.cfg) == (
        "wan-diffusers",
        heads,
        128,
        layers,
        grid,
        50,
        2,
    )


@pytest.mark.parametrize(
    ("stem", "adapter", "heads", "head_dim", "layers", "grid", "cfg", "text"),
    [
        ("hunyuanvideo-t2v-13b-720p", "hunyuanvideo", 24, 128, 60, (33, 45, 80), 1, 256),
        ("cogvideox-5b-480p", "cogvideox", 48, 64, 42, (13, 30, 45), 2, 226),
        ("ltx-video-2b-512p", "ltx-video", 32, 64, 28, (16, 16, 24), 2, 0),
    ],
)
def test_joint_family_studies_match_the_published_configs(
    stem: str, adapter: str, heads: int, head_dim: int, layers: int,
    grid: tuple[int, int, int], cfg: int, text: int,
) -> None:  # fmt: skip
    """HunyuanVideo 720p x 129 frames (guidance-distilled: one pass), CogVideoX-5B 720x480 x 49,
    LTX-Video 768x512 x 121; the text tokens each joint call holds reach the policy."""
    m = load_study(ROOT / "studies" / f"{stem}.yaml").model
    assert (m.adapter, m.heads, m.head_dim, m.layers, m.grid, m.steps, m.cfg, m.text) == (
        adapter, heads, head_dim, layers, grid, 50, cfg, text,
    )  # fmt: skip
    assert m.shape().text == text


def test_mini_study() -> None:
    study = load_study(ROOT / "studies" / "mini.yaml")
    m = study.model
    assert (m.adapter, m.heads, m.head_dim, m.layers, m.grid, m.steps, m.cfg) == (
        "synthetic",
        4,
        64,
        4,
        (5, 12, 16),
        10,
        2,
    )
    assert m.tokens == 960
    assert study.calibration.step_indices(m) == tuple(range(10))
    assert study.study_name("schedule") == "mini:schedule"
    assert (
        study.study_name("kernel", "fp8_sparse:0.9:window") == "mini:kernel:fp8_sparse:0.9:window"
    )
    assert study.constraint_values({"rel_l2": 0.05}) == {"rel_l2": pytest.approx(-0.05)}
    assert study.model.shape().grid == (5, 12, 16)


def test_sampler_defaults_and_build() -> None:
    study = load_study(ROOT / "studies" / "mini.yaml")
    sampler = study.sampler.build()
    assert type(sampler).__name__ == "TPESampler"
    assert isinstance(study.sampler.options, TPEOptions)
    assert dict(study.sampler.options)["group"] is True
    for name, cls in [
        ("nsgaii", "NSGAIISampler"),
        ("random", "RandomSampler"),
        ("gp", "GPSampler"),
    ]:
        spec = study.sampler.model_validate({"name": name, "seed": 3})
        assert type(spec.build()).__name__ == cls


def test_objective_direction_defaults_to_natural(tmp_path: Path) -> None:
    data = _mini()
    data["objectives"] = [{"name": "latency_ms"}, {"name": "psnr"}]
    data["constraints"] = [{"name": "psnr", "min": 30.0}]
    with pytest.raises(BadInput, match=r"objectives\.1\.name: psnr is not measured"):
        _load(tmp_path, data)
    data["model"] = {**data["model"], "adapter": "mini"}
    data["end_to_end"] = {"seeds": [0, 1]}
    study = _load(tmp_path, data)
    assert study.directions == ["minimize", "maximize"]
    assert study.constraint_values({"psnr": 32.0}) == {"psnr": -2.0}
    assert study.end_to_end is not None and study.end_to_end.seeds == (0, 1)


def test_end_to_end_needs_the_mini_adapter_and_distinct_seeds(tmp_path: Path) -> None:
    data = _mini()
    data["end_to_end"] = {"seeds": [0]}
    with pytest.raises(
        BadInput,
        match=r"end_to_end: adapter synthetic does not run end-to-end quality \(adapters "
        r"that do: mini, wan-diffusers\)",
    ):
        _load(tmp_path, data)
    data["model"] = {**data["model"], "adapter": "mini"}
    data["end_to_end"] = {"seeds": [3, 3]}
    with pytest.raises(BadInput, match=r"end_to_end\.seeds: .*duplicate seed"):
        _load(tmp_path, data)
    data["end_to_end"] = {"seeds": [0], "weights": "nope.safetensors"}
    with pytest.raises(BadInput, match=r"end_to_end\.weights: .*no such file"):
        _load(tmp_path, data)


def test_inline_spaces_and_calibration_file(tmp_path: Path) -> None:
    data = _mini()
    data["kernel_space"] = yaml.safe_load((ROOT / "search_spaces/kernel-mini.yaml").read_text())
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "cal.safetensors").write_bytes(b"\0" * 8)
    data["calibration"] = {"source": "cal.safetensors", "steps": [9, 0], "layers": "all"}
    study = _load(tmp_path, data)
    assert study.kernel_space.source == "<kernel space>"
    assert study.calibration.source == str((tmp_path / "studies/cal.safetensors").resolve())
    assert study.calibration.steps == (0, 9)


def test_study_is_frozen() -> None:
    study = load_study(ROOT / "studies" / "mini.yaml")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        study.name = "other"


# -- the bad-input corpus ----------------------------------------------------------------------


def _mini() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "studies" / "mini.yaml").read_text())


def _space(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())


def _load(tmp_path: Path, study: dict[str, Any]) -> StudySpec:
    _write_tree(tmp_path, study, _space("kernel-mini"), _space("schedule-mini"))
    return load_study(tmp_path / "studies" / "s.yaml")


def _write_tree(
    root: Path, study: Any, kernel: Any, schedule: Any, raw: dict[str, str] | None = None
) -> dict[str, Path]:
    paths = {
        "study": root / "studies" / "s.yaml",
        "kernel": root / "search_spaces" / "kernel-mini.yaml",
        "schedule": root / "search_spaces" / "schedule-mini.yaml",
    }
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    for key, data in (("study", study), ("kernel", kernel), ("schedule", schedule)):
        text = (raw or {}).get(key)
        paths[key].write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False))
    return paths


Mutation = Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], None]


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Mutation | None  # (study, kernel, schedule) edited in place
    blame: str  # which file the error must name: study | kernel | schedule | <relative path>
    field: str | None  # the dotted field it must name; None for whole-file errors
    says: str  # a fragment of the message
    raw: dict[str, str] | None = None  # raw text replacing a file


def _set(path: str, value: Any, target: str = "study") -> Mutation:
    def mutate(study: dict[str, Any], kernel: dict[str, Any], schedule: dict[str, Any]) -> None:
        node = {"study": study, "kernel": kernel, "schedule": schedule}[target]
        *parents, last = path.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_DELETE = object()


def _all(*mutations: Mutation) -> Mutation:
    def mutate(study: dict[str, Any], kernel: dict[str, Any], schedule: dict[str, Any]) -> None:
        for m in mutations:
            m(study, kernel, schedule)

    return mutate


CORPUS: list[Case] = [
    # whole files
    Case("missing-study", None, "missing.yaml", None, "no such file"),
    Case("empty-file", None, "study", None, "file is empty", raw={"study": ""}),
    Case("comments-only", None, "study", None, "file is empty", raw={"study": "# nothing\n"}),
    Case(
        "truncated-yaml",
        None,
        "study",
        None,
        "not valid YAML",
        raw={"study": "name: mini\nmodel: {heads: 4, head_dim: 6"},
    ),
    Case(
        "bad-indent",
        None,
        "study",
        None,
        "not valid YAML",
        raw={"study": "name: mini\n  model: x\n bad: [\n"},
    ),
    Case("not-a-mapping", None, "study", None, "expected a mapping", raw={"study": "- 1\n- 2\n"}),
    Case("scalar-file", None, "study", None, "expected a mapping", raw={"study": "42\n"}),
    Case(
        "python-tag",
        None,
        "study",
        None,
        "not valid YAML",
        raw={"study": "name: !!python/object/apply:os.system ['true']\n"},
    ),
    Case(
        "duplicate-key", None, "study", "name", "duplicate key", raw={"study": "name: a\nname: b\n"}
    ),
    # study fields
    Case("unknown-top-key", _set("colour", "red"), "study", "colour", "unknown key"),
    Case(
        "unknown-nested-key", _set("model.hedas", 4), "study", "model.hedas", "did you mean 'heads'"
    ),
    Case("wrong-type-int", _set("model.heads", "four"), "study", "model.heads", "valid integer"),
    Case("bool-as-int", _set("model.layers", True), "study", "model.layers", "valid integer"),
    Case("float-as-int", _set("model.steps", 10.5), "study", "model.steps", "valid integer"),
    Case(
        "zero-heads", _set("model.heads", 0), "study", "model.heads", "greater than or equal to 1"
    ),
    Case(
        "grid-too-short",
        _set("model.grid", [5, 12]),
        "study",
        "model.grid",
        "expected 3 or more items, got [5, 12]",
    ),
    Case(
        "unknown-adapter",
        _set("model.adapter", "hf"),
        "study",
        "model.adapter",
        "unknown adapter 'hf' (registered: cogvideox, hunyuanvideo, hunyuanvideo-1.5, ltx-video, "
        "mini, synthetic, wan-diffusers)",
    ),
    Case("adapter-not-a-string", _set("model.adapter", 3), "study", "model.adapter", "string"),
    Case("missing-trials", _set("trials", _DELETE), "study", "trials", "required key is missing"),
    Case(
        "zero-schedule-trials",
        _set("trials.schedule", 0),
        "study",
        "trials.schedule",
        "greater than or equal to 1",
    ),
    Case("name-with-colon", _set("name", "a:b"), "study", "name", "pattern"),
    Case("unknown-sampler", _set("sampler.name", "cmaes"), "study", "sampler.name", "'tpe'"),
    Case(
        "unknown-sampler-option",
        _set("sampler.options.n_startup", 3),
        "study",
        "sampler.options.n_startup",
        "unknown key",
    ),
    Case(
        "option-of-other-sampler",
        lambda s, k, c: s.update(sampler={"name": "nsgaii", "options": {"multivariate": True}}),
        "study",
        "sampler.options.multivariate",
        "unknown key for the nsgaii sampler",
    ),
    Case(
        "option-wrong-type",
        _set("sampler.options.multivariate", "yes please"),
        "study",
        "sampler.options.multivariate",
        "valid boolean (got 'yes please')",
    ),
    Case(
        "random-with-options",
        lambda s, k, c: s.update(sampler={"name": "random", "options": {"seed": 1}}),
        "study",
        "sampler.options.seed",
        "unknown key for the random sampler (it takes no options)",
    ),
    Case(
        "unknown-metric",
        _set("objectives.0.name", "speed"),
        "study",
        "objectives.0.name",
        "no probe produces 'speed' (the latency source produces latency_ms; probes: attention:",
    ),
    Case(
        "wrong-direction",
        _set("objectives.1", {"name": "psnr", "direction": "minimize"}),
        "study",
        "objectives.1.direction",
        "must be maximize",
    ),
    Case("empty-objectives", _set("objectives", []), "study", "objectives", "empty list"),
    Case(
        "duplicate-objective",
        _set("objectives.1", {"name": "latency_ms"}),
        "study",
        "objectives.1.name",
        "listed twice",
    ),
    Case(
        "constraint-two-bounds",
        _set("constraints.0.min", 0.0),
        "study",
        "constraints.0",
        "exactly one of max or min",
    ),
    Case(
        "constraint-nan",
        _set("constraints.0.max", float("nan")),
        "study",
        "constraints.0.max",
        "finite",
    ),
    Case(
        "too-few-reps",
        _set("latency.reps", 5),
        "study",
        "latency.reps",
        "greater than or equal to 20",
    ),
    Case(
        "calibration-step-out-of-range",
        _set("calibration.steps", [0, 10]),
        "study",
        "calibration.steps",
        "outside the model's 10 steps",
    ),
    Case(
        "calibration-layer-negative",
        _set("calibration.layers", [0, -1]),
        "study",
        "calibration.layers.1",
        "index >= 0",
    ),
    Case(
        "calibration-empty-list",
        _set("calibration.steps", []),
        "study",
        "calibration.steps",
        "empty list",
    ),
    Case(
        "calibration-missing-file",
        _set("calibration.source", "qkv.safetensors"),
        "study",
        "calibration.source",
        "no such file",
    ),
    Case(
        "calibration-pickle",
        _set("calibration.source", "qkv.pt"),
        "study",
        "calibration.source",
        ".safetensors",
    ),
    Case(
        "space-path-missing",
        _set("kernel_space", "../search_spaces/nope.yaml"),
        "search_spaces/nope.yaml",
        None,
        "no such file",
    ),
    Case(
        "space-path-not-string",
        _set("schedule_space", 3),
        "study",
        "schedule_space",
        "expected a path",
    ),
    Case(
        "space-of-wrong-kind",
        _set("kernel_space", "../search_spaces/schedule-mini.yaml"),
        "schedule",
        "kind",
        "expected a kernel space here",
    ),
    Case(
        "inline-space-error",
        lambda s, k, c: s.update(kernel_space={**k, "block_m": []}),
        "study",
        "kernel_space.block_m",
        "empty list",
    ),
    Case(
        "head-dim-infeasible",
        _set("model.head_dim", 96),
        "kernel",
        None,
        "kernel space is empty after removing infeasible points",
    ),
    Case(
        "groups-over-layers",
        _set("layers.groups", 5, "schedule"),
        "schedule",
        "layers.groups",
        "model has 4 layers",
    ),
    # kernel space
    Case(
        "kernel-missing-kind",
        _set("kind", _DELETE, "kernel"),
        "kernel",
        "kind",
        "required key is missing",
    ),
    Case(
        "kernel-unknown-key",
        _set("warps", [4], "kernel"),
        "kernel",
        "warps",
        "did you mean 'num_warps'",
    ),
    Case("kernel-empty-tiles", _set("tiles", [], "kernel"), "kernel", "tiles", "empty list"),
    Case(
        "kernel-zero-tile",
        _set("tiles.0", [1, 0, 8], "kernel"),
        "kernel",
        "tiles.0.1",
        "greater than or equal to 1",
    ),
    Case(
        "kernel-duplicate-tile",
        _set("tiles.1", [1, 4, 8], "kernel"),
        "kernel",
        "tiles.1",
        "duplicate [1, 4, 8] (also at 0)",
    ),
    Case("kernel-bad-warps", _set("num_warps", [3], "kernel"), "kernel", "num_warps.0", "1, 2, 4"),
    Case(
        "kernel-unknown-mode", _set("modes.0", "int8", "kernel"), "kernel", "modes.0", "'fp8_dense'"
    ),
    Case(
        "kernel-sparsity-one",
        _set("sparsities", [0.5, 1.0], "kernel"),
        "kernel",
        "sparsities.1",
        "(0, 1)",
    ),
    Case(
        "kernel-no-buckets",
        _set("sparsities", _DELETE, "kernel"),
        "kernel",
        "sparsities",
        "sparse mode",
    ),
    Case(
        "kernel-unknown-pattern",
        _set("patterns.0", "radial", "kernel"),
        "kernel",
        "patterns.0.kind",
        "'window'",
    ),
    Case(
        "kernel-only-infeasible",
        _set("block_m", [256], "kernel"),
        "kernel",
        None,
        "kernel space is empty after removing infeasible points",
    ),
    Case(
        "kernel-block-not-power-of-two",
        _set("block_n", [64, 128, 300], "kernel"),
        "kernel",
        "block_n.2",
        "powers of two >= 16, got 300",
    ),
    Case(
        "kernel-lacks-schedule-mode",
        _set("modes", ["bf16_dense", "fp8_sparse"], "kernel"),
        "kernel",
        "modes",
        "fp8_dense missing",
    ),
    # schedule space
    Case(
        "schedule-empty-range",
        _set("sparse.sparsity", {"low": 0.9, "high": 0.5}, "schedule"),
        "schedule",
        "sparse.sparsity",
        "empty range",
    ),
    Case(
        "schedule-empty-choices",
        _set("layers.group_offset", [], "schedule"),
        "schedule",
        "layers.group_offset",
        "empty list",
    ),
    Case(
        "schedule-empty-tiles",
        _set("sparse.tile", [], "schedule"),
        "schedule",
        "sparse.tile",
        "empty list",
    ),
    Case(
        "schedule-step-not-dividing",
        _set("phases.bf16_until", {"low": 0.0, "high": 0.3, "step": 0.07}, "schedule"),
        "schedule",
        "phases.bf16_until",
        "does not divide",
    ),
    Case(
        "schedule-range-and-choices",
        _set("sparse.mass", {"low": 0.8, "high": 0.9, "choices": [0.8]}, "schedule"),
        "schedule",
        "sparse.mass",
        "not both",
    ),
    Case(
        "schedule-half-range",
        _set("sparse.sparsity", {"low": 0.5}, "schedule"),
        "schedule",
        "sparse.sparsity",
        "needs both low and high",
    ),
    Case(
        "schedule-param-string",
        _set("sparse.sparsity", "lots", "schedule"),
        "schedule",
        "sparse.sparsity",
        "expected a range",
    ),
    Case(
        "schedule-sparsity-one",
        _set("sparse.sparsity", [0.5, 1.0], "schedule"),
        "schedule",
        "sparse.sparsity",
        "[0, 1)",
    ),
    Case(
        "schedule-fraction-over-one",
        _set("phases.fp8_dense_until", {"low": 0.0, "high": 1.5}, "schedule"),
        "schedule",
        "phases.fp8_dense_until",
        "[0, 1]",
    ),
    Case(
        "schedule-duplicate-choice",
        _set("layers.group_offset", [0.0, 0.0], "schedule"),
        "schedule",
        "layers.group_offset",
        "duplicate",
    ),
    Case(
        "schedule-bad-dense-mode",
        _set("layers.dense_mode", "fp16", "schedule"),
        "schedule",
        "layers.dense_mode",
        "'fp8_dense'",
    ),
    Case(
        "schedule-offset-too-big",
        _set("layers.group_offset", [-1.0, 0.0], "schedule"),
        "schedule",
        "layers.group_offset",
        "(-1, 1)",
    ),
    Case(
        "schedule-zero-window",
        _set("sparse.window.0", [0, 1, 1], "schedule"),
        "schedule",
        "sparse.window.0",
        "positive",
    ),
    Case(
        "schedule-negative-dense-layers",
        _set("layers.dense_first", {"low": -1, "high": 1}, "schedule"),
        "schedule",
        "layers.dense_first",
        "values must be >= 0, got -1 .. 1",
    ),
    Case(
        "schedule-tile-not-in-kernel",
        # tiles are checked where they are costed: at the mini's own shape, not latency.target's
        _all(_set("latency.target", _DELETE), _set("sparse.tile.2", [2, 4, 8], "schedule")),
        "schedule",
        "sparse.tile.2",
        "no feasible fp8_sparse point",
    ),
    Case(
        "schedule-pattern-not-in-kernel",
        _set("patterns", ["window"], "kernel"),
        "schedule",
        "sparse.pattern.1",
        "not among the kernel space's patterns",
    ),
    Case(
        "schedule-sparsity-outside-buckets",
        _set("sparsities", [0.6, 0.75, 0.9], "kernel"),
        "schedule",
        "sparse.sparsity",
        "outside the kernel space's sparsity buckets",
    ),
    Case(
        "schedule-too-many-splits",
        _set("sparse.splits", 9, "schedule"),
        "schedule",
        "sparse.splits",
        "less than or equal to 8",
    ),
]


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.id)
def test_bad_input(tmp_path: Path, case: Case) -> None:
    study, kernel, schedule = _mini(), _space("kernel-mini"), _space("schedule-mini")
    if case.mutate is not None:
        case.mutate(study, kernel, schedule)
    paths = _write_tree(tmp_path, study, kernel, schedule, case.raw)
    target = paths["study"] if case.id != "missing-study" else tmp_path / "missing.yaml"
    with pytest.raises(BadInput) as info:
        load_study(target)
    text = str(info.value)
    blamed = paths.get(case.blame) or (
        target if case.blame == "missing.yaml" else tmp_path / case.blame
    )
    assert "\n" not in text
    assert info.value.file == str(blamed), text
    head = f"{blamed}: {case.field}: " if case.field else f"{blamed}: "
    assert text.startswith(head), text
    assert case.says in text, text
    if case.field is None:
        assert info.value.field == "", text


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30


def test_space_loaded_alone(tmp_path: Path) -> None:
    f = tmp_path / "k.yaml"
    f.write_text("kind: other\n")
    with pytest.raises(BadInput, match=r"k\.yaml: kind: expected kernel or schedule"):
        load_space(f)
    f.write_text(yaml.safe_dump({**_space("kernel-mini"), "tiles": "1x4x8"}))
    with pytest.raises(BadInput, match=r"k\.yaml: tiles: Input should be a list"):
        load_space(f)


def test_not_utf8_and_directory(tmp_path: Path) -> None:
    f = tmp_path / "bin.yaml"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BadInput, match="not UTF-8"):
        load_study(f)
    with pytest.raises(BadInput, match="is a directory"):
        load_study(tmp_path)


def test_bad_input_pickles() -> None:
    import pickle

    e = BadInput("a.yaml", "model.heads", "bad\nthing")
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) == "a.yaml: model.heads: bad thing"


def test_schedule_space_modes() -> None:
    space = load_space(ROOT / "search_spaces" / "schedule-default.yaml")
    assert isinstance(space, ScheduleSpace)
    assert space.modes() == {Mode.BF16_DENSE, Mode.FP8_DENSE, Mode.FP8_SPARSE}
    data = copy.deepcopy(_space("schedule-default"))
    data["phases"] = {"bf16_until": 0.0, "fp8_dense_until": 0.0}
    data["layers"]["dense_mode"] = "bf16_dense"
    assert ScheduleSpace.model_validate(data).modes() == {
        Mode.BF16_DENSE,
        Mode.FP8_SPARSE,
    }


def test_bad_input_is_the_clis_bad_input() -> None:
    from fpstune import errors

    assert issubclass(BadInput, errors.BadInput)


def test_study_round_trips_through_json() -> None:
    # what the controller stores as a study attribute, and a worker may rebuild
    study = load_study(ROOT / "studies" / "mini.yaml")
    again = StudySpec.model_validate(study.model_dump(mode="json"))
    assert again.model_dump() == study.model_dump()


def test_sampler_options_default_per_sampler() -> None:
    from fpstune.spec import SamplerSpec
    from fpstune.spec.study import NSGAIIOptions

    spec = SamplerSpec.model_validate({"name": "nsgaii", "seed": 1})
    assert isinstance(spec.options, NSGAIIOptions)
    assert spec.kwargs()["population_size"] == 50


@pytest.mark.parametrize("ref", ["", "  ", ".", "../search_spaces"])
def test_a_space_reference_that_names_no_file_blames_the_study_field(
    tmp_path: Path, ref: str
) -> None:
    data = _mini()
    data["kernel_space"] = ref
    with pytest.raises(BadInput) as err:
        _load(tmp_path, data)
    assert err.value.file == str(tmp_path / "studies" / "s.yaml")
    assert err.value.field == "kernel_space"
    assert "expected a path to a search space file" in err.value.message
