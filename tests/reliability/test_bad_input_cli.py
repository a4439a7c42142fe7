"""Bad input through the real CLI: every case exits 2 with exactly one line on stderr that names
the file (or option) and the field, no traceback, and leaves the storage as it was.

The corpus runs in-process through `fpstune.cli.commands.main` (the entry point the
``fpstune`` script calls); a sample runs as a real subprocess, which is what proves "no
traceback" for a user.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from reliability_helpers import CHEAP, H100, ROOT, fpstune, run_main
from safetensors.torch import save_file
from shared_helpers import ALIAS_BOMB

from fpstune.quality.calibration import META_KEY, save_calibration, synthetic_calibration
from fpstune.spec.study import load_study
from fpstune.stages.schedule import ScheduleStage

SERVICE = ROOT / "tests" / "service" / "data"

Edit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Case:
    """``files``: what the case writes into the working folder (``study.yaml`` and ``policy.yaml``
    start from valid ones; a value is the file's text or bytes, or an edit of its YAML). The one
    stderr line must contain ``names`` (the file or option) and ``field`` and ``says``."""

    id: str
    args: list[str]
    names: str
    field: str | None
    says: str
    files: dict[str, str | bytes | Edit] = field(default_factory=dict)


def _set(path: str, value: Any) -> Edit:
    def edit(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value

    return edit


def _drop(path: str) -> Edit:
    def edit(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        del d[last]

    return edit


def _unsigned(edit: Edit) -> Edit:
    """A hand edit of a policy: the checksum line goes, as the file's header says to do."""

    def both(d: dict[str, Any]) -> None:
        edit(d)
        d.pop("checksum", None)

    return both


ENTRY = "- {steps: [0, 1], layers: [0, 1], spec: {mode: bf16_dense}}\n"
BOMB_MARK = "__alias_bomb__"  # an edit sets a field to this; the file then holds the bomb there


def _bomb(path: str) -> Edit:
    return _set(path, BOMB_MARK)


def _window(window: list[float]) -> Edit:
    return _unsigned(
        _set("default", {"mode": "fp8_sparse", "sparsity": 0.5,
                         "pattern": {"kind": "window", "window": window}})
    )  # fmt: skip


RUN = ["study", "run", "study.yaml", "--storage", "sqlite:///store.db", "--no-progress"]
VALIDATE = ["policy", "validate", "policy.yaml"]
KERNEL_SPACE = (SERVICE / "kernel-tiny.yaml").read_text()
SCHEDULE_SPACE = (SERVICE / "schedule-tiny.yaml").read_text()

CORPUS: list[Case] = [
    # -- malformed, truncated or unsafe study files
    Case("yaml-unclosed-bracket", RUN, "study.yaml", None, "not valid YAML",
         {"study.yaml": "name: cheap\nmodel: {heads: 2, head_dim: 64\n"}),
    Case("yaml-bad-indent", RUN, "study.yaml", None, "not valid YAML",
         {"study.yaml": "name: cheap\n  model: x\n bad: [\n"}),
    Case("yaml-duplicate-key", RUN, "study.yaml", "name", "duplicate key",
         {"study.yaml": "name: a\nname: b\n"}),
    Case("yaml-python-tag", RUN, "study.yaml", None, "not valid YAML",
         {"study.yaml": "name: !!python/object/apply:os.system ['touch pwned']\n"}),
    Case("study-truncated", RUN, "study.yaml", None, "not valid YAML",
         {"study.yaml": "truncate"}),
    Case("study-empty", RUN, "study.yaml", None, "file is empty", {"study.yaml": ""}),
    Case("study-not-mapping", RUN, "study.yaml", None, "expected a mapping",
         {"study.yaml": "- 1\n- 2\n"}),
    Case("study-binary", RUN, "study.yaml", None, "not UTF-8",
         {"study.yaml": b"\xff\xfe\x00\x01garbage"}),
    Case("study-missing", ["study", "run", "nope.yaml", "--storage", "sqlite:///store.db"],
         "nope.yaml", None, "no such file"),
    # -- unknown keys, wrong types, out-of-range values
    Case("unknown-top-key", RUN, "study.yaml", "colour", "unknown key",
         {"study.yaml": _set("colour", "red")}),
    Case("unknown-nested-key", RUN, "study.yaml", "model.hedas", "did you mean 'heads'",
         {"study.yaml": _set("model.hedas", 2)}),
    Case("wrong-type-heads", RUN, "study.yaml", "model.heads", "integer",
         {"study.yaml": _set("model.heads", "two")}),
    Case("bool-as-int", RUN, "study.yaml", "model.layers", "integer",
         {"study.yaml": _set("model.layers", True)}),
    Case("cfg-out-of-range", RUN, "study.yaml", "model.cfg", "less than or equal to 8",
         {"study.yaml": _set("model.cfg", 9)}),
    Case("zero-trials", RUN, "study.yaml", "trials.schedule", "greater than or equal to 1",
         {"study.yaml": _set("trials.schedule", 0)}),
    Case("negative-seed", RUN, "study.yaml", "sampler.seed", "greater than or equal to 0",
         {"study.yaml": _set("sampler.seed", -1)}),
    Case("constraint-nan", RUN, "study.yaml", "constraints.0.max", "finite",
         {"study.yaml": _set("constraints.0.max", math.nan)}),
    Case("constraint-inf", RUN, "study.yaml", "constraints.0.max", "finite",
         {"study.yaml": _set("constraints.0.max", math.inf)}),
    Case("objective-wrong-direction", RUN, "study.yaml", "objectives.1.direction",
         "rel_l2 is better when lower", {"study.yaml": _set("objectives.1.direction", "maximize")}),
    Case("missing-trials", RUN, "study.yaml", "trials", "required key is missing",
         {"study.yaml": _drop("trials")}),
    # -- empty or infeasible search spaces
    Case("kernel-space-empty-list", RUN, "kspace.yaml", "tiles", "",
         {"kspace.yaml": KERNEL_SPACE.replace("tiles: [[1, 4, 8], [1, 2, 16]]", "tiles: []"),
          "study.yaml": _set("kernel_space", "kspace.yaml")}),
    Case("kernel-space-infeasible", RUN, "kspace.yaml", "", "empty after removing infeasible",
         {"kspace.yaml": KERNEL_SPACE.replace("block_n: [32]", "block_n: [16]")
          .replace("modes: [bf16_dense, fp8_dense, fp8_sparse]", "modes: [fp8_dense]"),
          "sspace.yaml": SCHEDULE_SPACE,
          "study.yaml": _set("kernel_space", "kspace.yaml")}),
    Case("schedule-range-inverted", RUN, "sspace.yaml", "sparse.sparsity", "",
         {"sspace.yaml": SCHEDULE_SPACE.replace("{low: 0.5, high: 0.75", "{low: 0.75, high: 0.5"),
          "study.yaml": _set("schedule_space", "sspace.yaml")}),
    Case("schedule-tile-not-measured", RUN, "sspace.yaml", "sparse.tile.1",
         "no feasible fp8_sparse point",
         {"sspace.yaml": SCHEDULE_SPACE.replace("[1, 2, 16]]", "[2, 4, 8]]"),
          "study.yaml": _set("schedule_space", "sspace.yaml")}),
    Case("space-of-wrong-kind", RUN, "sspace.yaml", "kind", "expected a kernel space",
         {"sspace.yaml": SCHEDULE_SPACE, "study.yaml": _set("kernel_space", "sspace.yaml")}),
    Case("space-truncated", RUN, "kspace.yaml", None, "",
         {"kspace.yaml": KERNEL_SPACE[: KERNEL_SPACE.index("tiles") + 12],
          "study.yaml": _set("kernel_space", "kspace.yaml")}),
    # -- calibration weights: missing, truncated, NaN/Inf, another model, not safetensors
    Case("calibration-missing", RUN, "cal.safetensors", "calibration.source", "no such file",
         {"study.yaml": _set("calibration.source", "cal.safetensors")}),
    Case("calibration-truncated", RUN, "cal.safetensors", "calibration.source",
         "not a safetensors file",
         {"cal.safetensors": "truncated-calibration",
          "study.yaml": _set("calibration.source", "cal.safetensors")}),
    Case("calibration-nan", RUN, "cal.safetensors", "calibration.source", "holds NaN",
         {"cal.safetensors": "nan-calibration",
          "study.yaml": _set("calibration.source", "cal.safetensors")}),
    Case("calibration-inf", RUN, "cal.safetensors", "calibration.source", "holds Inf",
         {"cal.safetensors": "inf-calibration",
          "study.yaml": _set("calibration.source", "cal.safetensors")}),
    Case("calibration-other-model", RUN, "cal.safetensors", "calibration.source",
         "heads: calibration set has 4, model has 2",
         {"cal.safetensors": "other-model-calibration",
          "study.yaml": _set("calibration.source", "cal.safetensors")}),
    Case("calibration-pickle-file", RUN, "study.yaml", "calibration.source",
         "expected 'synthetic' or a .safetensors file",
         {"cal.pt": b"\x80\x04\x95pickle", "study.yaml": _set("calibration.source", "cal.pt")}),
    # -- policies for another GPU type, model shape or schema version; broken policies
    Case("policy-other-gpu", VALIDATE, "policy.yaml", "hardware.gpu", "tuned on",
         {"policy.yaml": _unsigned(_set("hardware", H100))}),
    Case("policy-other-model", [*VALIDATE, "--study", "study.yaml", "--no-hardware-check"],
         "policy.yaml", "model.heads", "policy has 4, model has 2",
         {"policy.yaml": _unsigned(_set("model.heads", 4))}),
    Case("policy-schema-version", VALIDATE, "policy.yaml", "schema_version", "not supported",
         {"policy.yaml": _set("schema_version", 2)}),
    Case("policy-truncated", VALIDATE, "policy.yaml", None, "not valid YAML",
         {"policy.yaml": "truncate"}),
    Case("policy-edited-checksum", VALIDATE, "policy.yaml", "checksum", "does not match",
         {"policy.yaml": _set("default.mode", "fp8_dense")}),
    Case("policy-inf-objective", VALIDATE, "policy.yaml", "provenance.objectives", "finite",
         {"policy.yaml": _unsigned(_set("provenance.objectives", {"rel_l2": math.inf}))}),
    Case("policy-illegal-kernel", VALIDATE, "policy.yaml", "default.kernel", "power of two",
         {"policy.yaml": _unsigned(_set("default", {
             "mode": "fp8_dense", "tile": [1, 4, 8],
             "kernel": {"block_m": 48, "block_n": 32, "num_warps": 4, "num_stages": 2}}))}),
    # -- hostile YAML: alias bombs in every field family, oversize files and node counts
    *[
        Case(f"yaml-alias-bomb-{field}", RUN, "study.yaml", None, "anchors/aliases are not allowed",
             {"study.yaml": _bomb(field)})
        for field in ("name", "model.name", "trials.schedule", "sampler.seed", "objectives.0")
    ],
    Case("kernel-space-alias-bomb", RUN, "kspace.yaml", None, "anchors/aliases are not allowed",
         {"kspace.yaml": KERNEL_SPACE.replace("[[1, 4, 8], [1, 2, 16]]", ALIAS_BOMB),
          "study.yaml": _set("kernel_space", "kspace.yaml")}),
    Case("policy-alias-bomb-notes", VALIDATE, "policy.yaml", None,
         "anchors/aliases are not allowed", {"policy.yaml": _bomb("provenance.notes")}),
    Case("policy-alias-bomb-model-name", VALIDATE, "policy.yaml", None,
         "anchors/aliases are not allowed", {"policy.yaml": _bomb("model.name")}),
    Case("study-oversize", RUN, "study.yaml", None, "more than 1048576 bytes",
         {"study.yaml": "name: cheap\n" + "# padding\n" * 120_000}),
    Case("study-too-many-nodes", RUN, "study.yaml", None, "YAML nodes",
         {"study.yaml": "name: [" + "1, " * 30_000 + "1]\n"}),
    Case("policy-100k-entries", VALIDATE, "policy.yaml", None, "",
         {"policy.yaml": "entries:\n" + ENTRY * 100_000}),
    Case("policy-too-many-nodes", VALIDATE, "policy.yaml", None, "more than 120000 YAML nodes",
         {"policy.yaml": "entries: [" + "1," * 125_000 + "1]\n"}),
    # -- NaN/Inf in floats, oversize tiles
    Case("policy-nan-window", VALIDATE, "policy.yaml", "default.pattern.window", "finite",
         {"policy.yaml": _window([math.nan, 1.0, 1.0])}),
    Case("policy-inf-window", VALIDATE, "policy.yaml", "default.pattern.window", "finite",
         {"policy.yaml": _window([math.inf] * 3)}),
    Case("policy-nan-sparsity", VALIDATE, "policy.yaml", "entries[0].spec.sparsity", "finite",
         {"policy.yaml": _unsigned(_set("entries.0.spec.sparsity", math.nan))}),
    Case("policy-huge-tile", VALIDATE, "policy.yaml", "default.tile", "more than 8192",
         {"policy.yaml": _unsigned(_set("default", {"mode": "fp8_dense",
                                                    "tile": [100_000] * 3}))}),
    Case("policy-tile-overhangs-grid", VALIDATE, "policy.yaml", "default.tile", "far larger",
         {"policy.yaml": _unsigned(_set("default", {"mode": "fp8_dense",
                                                    "tile": [1, 1, 4096]}))}),
    Case("study-nan-nsga-prob", RUN, "study.yaml", "sampler.options.crossover_prob", "",
         {"study.yaml": _set("sampler", {"name": "nsgaii", "seed": 0,
                                         "options": {"crossover_prob": math.nan}})}),
    Case("schedule-space-nan", RUN, "sspace.yaml", "sparse.sparsity", "",
         {"sspace.yaml": SCHEDULE_SPACE.replace("{low: 0.5, high: 0.75", "{low: .nan, high: 0.75"),
          "study.yaml": _set("schedule_space", "sspace.yaml")}),
    # -- options
    Case("storage-scheme", [*RUN[:3], "--storage", "mongodb://x/y"], "--storage", None,
         "unsupported database"),
    Case("stage-unknown", [*RUN, "--stage", "warp"], "--stage", None, "not one of"),
    Case("workers-zero", [*RUN, "--workers", "0"], "--workers", None, "greater than or equal to 1"),
    Case("max-retries-negative", [*RUN, "--max-retries", "-1"], "--max-retries", None,
         "greater than or equal to 0"),
    Case("export-unknown-study", ["export", "nosuch", "-o", "p.yaml", "--storage",
         "sqlite:///store.db"], "nosuch", None, "not found in sqlite:///store.db"),
]  # fmt: skip


# -- the files a case starts from -----------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Valid inputs: the cheap study (spaces by absolute path), a policy for its model, a
    calibration set for it (and the broken variants), and a storage holding one study."""
    d = tmp_path_factory.mktemp("base")
    study = yaml.safe_load(CHEAP.read_text())
    study["kernel_space"] = str(SERVICE / "kernel-tiny.yaml")
    study["schedule_space"] = str(SERVICE / "schedule-tiny.yaml")
    spec = load_study(CHEAP)
    trial = optuna.create_study(directions=["minimize", "minimize"]).ask()
    policy = ScheduleStage(spec).suggest(trial).policy.to_dict()
    cal = synthetic_calibration(spec.model, seed=0)
    save_calibration(cal, d / "good.safetensors")
    raw = (d / "good.safetensors").read_bytes()
    (d / "truncated-calibration").write_bytes(raw[: len(raw) // 2])
    for name, poison in (("nan-calibration", math.nan), ("inf-calibration", math.inf)):
        tensors = dict(cal.tensors)
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0, 3, 5] = poison
        save_file(tensors, str(d / name), metadata={META_KEY: cal.meta.to_json()})
    other = synthetic_calibration(spec.model.model_copy(update={"heads": 4}), seed=0)
    save_calibration(other, d / "other-model-calibration")
    store = d / "store.db"
    optuna.create_study(study_name="kept", storage=f"sqlite:///{store}").ask()
    return {"study": study, "policy": policy, "dir": d}


# Files the ``base`` fixture prepares, named by a case's ``files`` values.
PREPARED = {
    "truncated-calibration",
    "nan-calibration",
    "inf-calibration",
    "other-model-calibration",
}


def _materialise(case: Case, base: dict[str, Any], cwd: Path) -> None:
    texts: dict[str, str | bytes] = {
        "study.yaml": yaml.safe_dump(base["study"], sort_keys=False),
        "policy.yaml": yaml.safe_dump(base["policy"], sort_keys=False),
    }
    for name, content in case.files.items():
        if callable(content):
            doc = copy.deepcopy(base["study" if name == "study.yaml" else "policy"])
            content(doc)
            texts[name] = yaml.safe_dump(doc, sort_keys=False)
        elif content == "truncate":
            text = texts[name]
            assert isinstance(text, str)
            texts[name] = text[: text.index("head_dim") + 4]  # cut mid-key, as a full disk does
        elif isinstance(content, str) and content in PREPARED:
            texts[name] = (base["dir"] / content).read_bytes()
        else:
            texts[name] = content
    for name, content in texts.items():
        if isinstance(content, str):
            content = content.replace(BOMB_MARK, ALIAS_BOMB)
        path = cwd / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    shutil.copy(base["dir"] / "store.db", cwd / "store.db")


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def check_one_line(case: Case, code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert case.names in line and case.says in line, line
    if case.field:
        assert f": {case.field}" in line or f"{case.field}:" in line, line
    return line


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.id)
def test_bad_input_is_one_line_exit_2_and_storage_untouched(
    case: Case,
    base: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _materialise(case, base, tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = run_main(case.args, tmp_path, monkeypatch, capsys)
    check_one_line(case, code, err)
    assert _snapshot(tmp_path) == before  # no storage created or written, no lock left behind
    assert not (tmp_path / "pwned").exists()


def test_corpus_size_and_kinds() -> None:
    assert len(CORPUS) >= 30
    kinds = {c.id.split("-")[0] for c in CORPUS}
    assert {"yaml", "study", "unknown", "calibration", "policy", "schedule", "kernel"} <= kinds


# A sample as real subprocesses: what a user's terminal shows (warnings, logging, Ray) included.
SAMPLE = [
    "yaml-python-tag",
    "calibration-truncated",
    "policy-other-gpu",
    "workers-zero",
    "yaml-alias-bomb-trials.schedule",
    "policy-alias-bomb-notes",
]


@pytest.mark.parametrize("case_id", SAMPLE)
def test_sample_as_a_user_runs_it(case_id: str, base: dict[str, Any], tmp_path: Path) -> None:
    [case] = [c for c in CORPUS if c.id == case_id]
    _materialise(case, base, tmp_path)
    before = _snapshot(tmp_path)
    out = fpstune(*case.args, cwd=tmp_path, timeout=120)
    check_one_line(case, out.returncode, out.stderr)
    assert _snapshot(tmp_path) == before


# Files that are not regular files, as real subprocesses (a FIFO must not block the reader): the
# study, a search space it names, or a policy is a symlink to a device, or a FIFO.
SPECIAL = [
    (target, role)
    for target in ("/dev/zero", "/dev/urandom", "fifo")
    for role in ("study", "kernel_space", "policy")
]


@pytest.mark.parametrize(("target", "role"), SPECIAL, ids=lambda x: x.replace("/dev/", ""))
def test_device_and_fifo_files_are_refused_at_once(
    target: str, role: str, base: dict[str, Any], tmp_path: Path
) -> None:
    case = Case(f"special-{role}", RUN if role != "policy" else VALIDATE, "", None,
                "not a regular file")  # fmt: skip
    files: dict[str, str | bytes | Edit] = {}
    if role == "kernel_space":
        files["study.yaml"] = _set("kernel_space", "special.yaml")
    _materialise(Case(case.id, case.args, "", None, "", files), base, tmp_path)
    special = tmp_path / {"study": "study.yaml", "policy": "policy.yaml"}.get(role, "special.yaml")
    special.unlink(missing_ok=True)
    if target == "fifo":
        os.mkfifo(special)
    else:
        special.symlink_to(target)
    before = _snapshot(tmp_path)
    start = time.monotonic()
    out = fpstune(*case.args, cwd=tmp_path, timeout=60)
    line = check_one_line(case, out.returncode, out.stderr)
    assert special.name in line, line
    assert time.monotonic() - start < 30  # the interpreter's start-up included
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "store.db-journal").exists()
