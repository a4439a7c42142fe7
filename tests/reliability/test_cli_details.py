"""The CLI's details as a user meets them: help (``-h``, ``--version``, no ``<bool>`` labels,
group texts that match their commands), the install hint without the [tune] extra, policy
messages that name the flag, readable tables, the policy grid, ``study trials / best / delete``
and ``study run --timeout``."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import typer
import yaml
from optuna.trial import TrialState
from reliability_helpers import H100, TINY, fill_latency_table, fpstune, run_main

from fpstune import __version__
from fpstune.catalog import MODE_CODES, mode_grid
from fpstune.cli.commands import app
from fpstune.kernels import Mode
from fpstune.kernels.policy import Policy, PolicyError
from fpstune.spec.study import load_study

sys.path.insert(0, str(Path(__file__).parents[1] / "dashboard"))
from dashboard_helpers import MINI, mini_study

STORE = ["--storage", "sqlite:///study.db"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mini schedule study (8 searched trials, 2 baselines, 1 FAIL) and a policy of it."""
    d = tmp_path_factory.mktemp("details")
    study = mini_study(f"sqlite:///{d / 'study.db'}", trials=8)
    Policy.from_dict(study.trials[1].user_attrs["candidate"]["policy"]).dump(d / "policy.yaml")
    return d


@pytest.fixture
def cwd(store: Path, tmp_path: Path) -> Path:
    for name in ("study.db", "policy.yaml"):
        shutil.copy(store / name, tmp_path / name)
    return tmp_path


def _error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- item 4: no [tune] extra -----------------------------------------------------------------

# The console script's entry point with the [tune] extra's packages hidden.
WITHOUT_TUNE = """
import sys
from importlib.abc import MetaPathFinder

class Hide(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

HIDDEN = set(sys.argv[1:])
sys.meta_path.insert(0, Hide())
sys.argv = ["fpstune", "--help"]
from fpstune.cli.commands import main
main()
"""


@pytest.mark.parametrize("hidden", [["typer", "click", "rich"], ["optuna"], ["optuna", "typer"]])
def test_without_the_tune_extra_the_command_says_what_to_install(
    tmp_path: Path, hidden: list[str]
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_TUNE, *hidden],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = _error_line(out.returncode, out.stderr)
    assert 'pip install "fpstune[tune]"' in line
    assert f"No module named {hidden[0]!r}" in line
    assert not list(tmp_path.iterdir())


# -- help --------------------------------------------------------------------------------------


def _commands() -> list[list[str]]:
    """Every group and command, as the words that name it."""
    found: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        found.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def test_every_command_takes_dash_h_and_shows_no_bool_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = _commands()
    assert ["study", "trials"] in commands and ["study", "delete"] in commands
    for words in commands:
        code, out, err = run_main([*words, "-h"], tmp_path, monkeypatch, capsys)
        assert code == 0 and out.startswith("Usage:"), (words, err)
        assert "<bool>" not in out, words
        assert "-h, --help" in out
    _, run_help, _ = run_main(["study", "run", "-h"], tmp_path, monkeypatch, capsys)
    assert "--progress / --no-progress" in run_help and "--timeout" in run_help
    _, validate, _ = run_main(["policy", "validate", "-h"], tmp_path, monkeypatch, capsys)
    assert "Validate a policy file" in validate and "Policy YAML" in validate
    assert "--allow-other-gpu " in validate and "--no-allow-other-gpu" not in validate


def test_group_texts_match_their_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, top, _ = run_main(["-h"], tmp_path, monkeypatch, capsys)
    assert "in and out" not in top and "inspect the embedded" not in top
    assert not top.split("Commands:")[1].count("...")  # every command's line is whole
    _, latency, _ = run_main(["latency", "-h"], tmp_path, monkeypatch, capsys)
    commands = latency.split("Commands:")[1].split()
    assert commands[0] == "export" and "import" not in commands


def test_a_group_without_a_command_prints_its_help(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for words in ([], ["study"], ["model"]):
        code, _, err = run_main(words, tmp_path, monkeypatch, capsys)
        assert code == 2 and err.startswith("Usage:") and "\nCommands:\n" in err, err


def test_version(tmp_path: Path) -> None:
    out = fpstune("--version", cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"fpstune {__version__}", out.stderr


# -- item 2: policies of another GPU ---------------------------------------------------------


def test_other_gpu_policy_names_the_flag_and_warns_in_one_line(
    cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_load((cwd / "policy.yaml").read_text())
    doc.pop("checksum")
    doc["hardware"] = H100
    (cwd / "h100.yaml").write_text(yaml.safe_dump(doc))
    code, _, err = run_main(["policy", "validate", "h100.yaml"], cwd, monkeypatch, capsys)
    line = _error_line(code, err)
    assert "h100.yaml: hardware.gpu: tuned on NVIDIA H100" in line
    assert "--allow-other-gpu" in line and "allow_other_gpu=True" not in line
    with pytest.raises(PolicyError, match="allow_other_gpu=True"):  # Python keeps its keyword
        Policy.load(cwd / "h100.yaml")

    args = ["policy", "validate", "h100.yaml", "--allow-other-gpu"]
    code, out, err = run_main(args, cwd, monkeypatch, capsys)
    entries = len(Policy.load(cwd / "policy.yaml", hardware=None).entries)
    assert code == 0 and out.strip() == f"h100.yaml: ok (mini, {entries} entries)", err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("warning: h100.yaml: hardware") for line in lines), err
    assert "(--allow-other-gpu)" in lines[0]
    assert "PolicyWarning" not in err and "allow_other_gpu" not in err
    # As a user's terminal shows it: Python's own warning printout would add a source line.
    user = fpstune(*args, cwd=cwd, timeout=120)
    assert user.returncode == 0 and user.stderr.strip().splitlines() == lines, user.stderr


# -- item 6: tables, grid, messages ----------------------------------------------------------


def test_status_rounds_in_the_table_and_json_keeps_every_digit(
    cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    front = optuna.load_study(
        study_name="mini:schedule", storage="sqlite:///" + str(cwd / "study.db")
    ).best_trials
    latency = min(t.values[0] for t in front)
    code, out, _ = run_main(["study", "status", "mini", *STORE], cwd, monkeypatch, capsys)
    assert code == 0 and f"{latency:.4g}" in out and repr(latency) not in out
    code, out, _ = run_main(["study", "status", "mini", *STORE, "--json"], cwd, monkeypatch, capsys)
    assert min(p["latency_ms"] for p in json.loads(out)["front"]) == latency


def test_tables_are_whole_when_stdout_is_not_a_terminal(
    cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    long = "a-study-name-much-wider-than-any-terminal-" * 3
    optuna.create_study(study_name=long, storage="sqlite:///" + str(cwd / "study.db"))
    code, out, _ = run_main(["study", "list", *STORE], cwd, monkeypatch, capsys)
    assert code == 0 and long in out and "mini:schedule" in out and "…" not in out


def test_policy_show_prints_the_step_by_layer_grid(
    cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(["policy", "show", "policy.yaml"], cwd, monkeypatch, capsys)
    assert code == 0 and "{'" not in out  # no dict reprs
    policy = Policy.load(cwd / "policy.yaml", hardware=None)
    grid = policy.grid_of_modes()
    lines = out.splitlines()
    rows = [ln for ln in lines if ln[:6].strip().isdigit()]
    assert len(rows) == policy.model.steps
    for step, (line, modes) in enumerate(zip(rows, grid, strict=True)):
        assert line.split() == [str(step), "".join(MODE_CODES[m] for m in modes)]
    assert lines[-1].startswith("legend: ") and "fp8_sparse" in lines[-1]


def test_the_grid_numbers_layers_past_ten() -> None:
    grid = [[Mode.BF16_DENSE] * 12, [Mode.FP8_DENSE] * 6 + [Mode.FP8_SPARSE] * 6]
    assert mode_grid(grid)[1:] == [
        "       0         1",
        "layer  012345678901",
        "    0  BBBBBBBBBBBB",
        "    1  FFFFFFffffff",
        "legend: B bf16_dense, F fp8_dense, f fp8_sparse",
    ]


def test_export_bound_message_names_only_the_given_bound(
    cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["export", "mini", *STORE, "-o", "p.yaml", "--max-latency", "0.001"]
    code, _, err = run_main(args, cwd, monkeypatch, capsys)
    line = _error_line(code, err)
    assert "no Pareto trial meets --max-latency 0.001;" in line
    assert "None" not in line and "--min-quality" not in line
    assert not (cwd / "p.yaml").exists()


def test_misspelt_required_key_says_what_was_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_load(MINI.read_text())
    doc["trails"] = doc.pop("trials")
    for key in ("kernel_space", "schedule_space"):
        doc[key] = str(MINI.parent / doc[key])
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(doc))
    args = ["study", "run", "study.yaml", "--storage", "sqlite:///s.db"]
    code, _, err = run_main(args, tmp_path, monkeypatch, capsys)
    line = _error_line(code, err)
    assert line.endswith(
        "study.yaml: trials: required key is missing (found 'trails': did you mean 'trials'?)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


# -- study trials / best / delete ------------------------------------------------------------


def test_study_trials_and_best(
    cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(["study", "trials", "mini", *STORE, "--json"], cwd, monkeypatch, capsys)
    rows = json.loads(out)
    assert code == 0 and [r["trial"] for r in rows] == list(range(11))
    assert {r["state"] for r in rows} == {"COMPLETE", "FAIL"}
    searched = rows[0]
    assert searched["params"] and searched["baseline"] is None
    assert set(searched) >= {"latency_ms", "rel_l2", "feasible"}
    code, table, _ = run_main(["study", "trials", "mini", *STORE], cwd, monkeypatch, capsys)
    assert code == 0 and "bf16_until=" in table and "fpsattention_3phase" in table

    code, out, _ = run_main(["study", "best", "mini", *STORE, "--json"], cwd, monkeypatch, capsys)
    best = json.loads(out)
    study = optuna.load_study(
        study_name="mini:schedule", storage="sqlite:///" + str(cwd / "study.db")
    )
    assert sorted(r["trial"] for r in best) == sorted(t.number for t in study.best_trials)
    assert all(r["feasible"] for r in best)
    latencies = [r["latency_ms"] for r in best]
    assert latencies == sorted(latencies)


def test_study_delete_needs_yes_without_a_terminal(
    cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "sqlite:///" + str(cwd / "study.db")
    before = (cwd / "study.db").read_bytes()
    code, _, err = run_main(["study", "delete", "mini", *STORE], cwd, monkeypatch, capsys)
    line = _error_line(code, err)
    assert "--yes" in line and "mini:schedule" in line
    assert (cwd / "study.db").read_bytes() == before
    code, out, err = run_main(
        ["study", "delete", "mini", *STORE, "--yes"], cwd, monkeypatch, capsys
    )
    assert code == 0 and out.strip() == "mini:schedule: deleted (11 trials)", err
    assert optuna.get_all_study_names(url) == []


# -- study run --timeout ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-3", "nan"])
def test_timeout_must_be_positive(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["study", "run", str(TINY), "--storage", "sqlite:///s.db", "--timeout", value]
    code, _, err = run_main(args, tmp_path, monkeypatch, capsys)
    line = _error_line(code, err)
    assert line.startswith("error: --timeout: must be more than 0 seconds")
    assert not list(tmp_path.iterdir())


@pytest.mark.usefixtures("local_ray")
def test_timeout_stops_the_run_and_leaves_no_trial_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    fill_latency_table(url, load_study(TINY))
    args = ["study", "run", str(TINY), "--storage", url, "--trials", "500", "--no-progress"]
    code, out, err = run_main([*args, "--timeout", "5"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "stopped by --timeout 5 s; run the same command again to continue" in out
    trials = optuna.load_study(study_name="tiny:schedule", storage=url).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) < 500
    assert TrialState.RUNNING not in states
    assert not math.isnan(sum(t.values[0] for t in trials if t.state == TrialState.COMPLETE))
