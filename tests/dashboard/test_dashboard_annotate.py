"""Notes and artifacts attached for the dashboard: complete trials only, once, with files that
say the same as the trial (schedule cells, latency split, the policy export would write)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from dashboard_helpers import BASELINES, mini_study
from optuna.artifacts import (
    FileSystemArtifactStore,
    download_artifact,
    get_all_artifact_meta,
    upload_artifact,
)
from optuna.trial import TrialState
from optuna_dashboard import get_note
from optuna_dashboard.artifact._backend import list_study_artifacts, list_trial_artifacts

from fpstune.dashboard import annotate
from fpstune.dashboard.annotate import (
    FRONT_PLOT_ID,
    AnnotateResult,
    _blocks,
    _saved_plot,
    annotate_storage,
    artifact_name,
    schedule_svg,
    stored_artifacts,
)
from fpstune.dashboard.server import _keep_annotating, default_artifact_dir, open_artifacts
from fpstune.dashboard.trials import schedule_info, trial_policy
from fpstune.kernels import Policy


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("built") / "study.db"
    mini_study(f"sqlite:///{path}", trials=6)
    return path


@pytest.fixture
def study(built: Path, tmp_path: Path) -> optuna.Study:
    """A fresh copy of the module's study for each test (built once: it takes seconds)."""
    shutil.copy(built, tmp_path / "study.db")
    return optuna.load_study(
        study_name="mini:schedule", storage=f"sqlite:///{tmp_path / 'study.db'}"
    )


def _annotate(study: optuna.Study, store: FileSystemArtifactStore | None) -> AnnotateResult:
    return annotate_storage(study._storage, artifact_store=store, storage_label="sqlite:///x.db")


def _attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


def _links(study: optuna.Study) -> dict[str, str]:
    return stored_artifacts(study._study_id, _attrs(study))


def _read(store: FileSystemArtifactStore, study: optuna.Study, name: str, tmp: Path) -> str:
    artifact_id = _links(study)[name].rsplit("/", 1)[1]
    path = tmp / f"dl-{name}"
    download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(path))
    return path.read_text(encoding="utf-8")


def _dashboard_lists(study: optuna.Study, t: optuna.trial.FrozenTrial) -> set[str]:
    """The files optuna-dashboard lists on the trial's page, as it reads them."""
    trial_attrs = study._storage.get_trial_system_attrs(t._trial_id)
    return {a["filename"] for a in list_trial_artifacts(_attrs(study), trial_attrs, t)}


def test_every_complete_trial_gets_a_note_and_three_files_once(
    study: optuna.Study, tmp_path: Path
) -> None:
    store = open_artifacts(f"sqlite:///{tmp_path / 'study.db'}", None)
    assert store is not None and (tmp_path / "study-artifacts").is_dir()
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 6 + len(BASELINES) and len(study.trials) == len(complete) + 1

    first = _annotate(study, store)
    assert (first.studies, first.trials, first.notes) == (1, len(complete), len(complete))
    assert first.artifacts == 3 * len(complete)
    # each trial's own files on its page; none on the study page
    for t in complete:
        kinds = ("schedule.svg", "latency.csv", "policy.yaml")
        assert _dashboard_lists(study, t) == {artifact_name(t.number, k) for k in kinds}
    assert list_study_artifacts(_attrs(study)) == [] == get_all_artifact_meta(study)

    again = _annotate(study, store)
    assert (again.trials, again.artifacts, again.notes) == (0, 0, 0)
    assert len(_links(study)) == first.artifacts


def test_files_an_earlier_version_stored_on_the_study_are_kept_not_duplicated(
    study: optuna.Study, tmp_path: Path
) -> None:
    """fpstune before trial artifacts: the files were the study's, the notes link them there."""
    store = open_artifacts(f"sqlite:///{tmp_path / 'study.db'}", None)
    assert store is not None
    _annotate(study, store)
    old = {}
    for name in _links(study):
        (tmp_path / name).write_text(_read(store, study, name, tmp_path), encoding="utf-8")
        old[name] = upload_artifact(
            artifact_store=store, file_path=str(tmp_path / name), study_or_trial=study
        )
    for key in [k for k in _attrs(study) if k.startswith("dashboard:artifacts:")]:
        study._storage.set_study_system_attr(study._study_id, key, "null")  # as a delete does
    assert {m.filename for m in get_all_artifact_meta(study)} == set(old)

    again = _annotate(study, store)
    assert again.artifacts == 0
    sid = study._study_id
    assert _links(study) == {name: f"/artifacts/{sid}/{aid}" for name, aid in old.items()}


def test_new_complete_trials_are_annotated_on_the_next_round(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = mini_study(url, trials=2)
    store = open_artifacts(url, None)
    first = _annotate(study, store)
    running = study.ask()  # not complete: no note, no files
    extra = study.trials[0]
    study.add_trial(
        optuna.create_trial(
            values=extra.values,
            params=extra.params,
            distributions=extra.distributions,
            user_attrs=extra.user_attrs,
        )
    )
    second = _annotate(study, store)
    assert (second.trials, second.notes, second.artifacts) == (1, 1, 3)
    assert first.trials == 2 + len(BASELINES)
    assert not get_note(optuna.Trial(study, running._trial_id))


def test_notes_say_what_the_trial_is(study: optuna.Study, tmp_path: Path) -> None:
    store = open_artifacts(f"sqlite:///{tmp_path / 'study.db'}", None)
    _annotate(study, store)
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        note = get_note(optuna.Trial(study, t._trial_id))
        base = t.user_attrs.get("baseline")
        assert note.startswith(f"### Baseline `{base}`" if base else f"### Trial {t.number}")
        feasible = all(v <= 0 for v in t.constraints.values())
        assert ("; feasible." in note) == feasible and ("infeasible (rel_l2" in note) != feasible
        assert f"--trial {t.number}" in note
        # the embedded image and the links point at the trial's artifacts, served by the dashboard
        links = _links(study)
        svg = links[artifact_name(t.number, "schedule.svg")]
        assert svg.startswith(f"/artifacts/{study._study_id}/{t._trial_id}/")
        assert f"![step x layer schedule of trial {t.number}]({svg})" in note
        assert f"[policy]({links[artifact_name(t.number, 'policy.yaml')]})" in note
    # fpstune's front plot (baselines marked) sits among the dashboard's study plots
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert any(FRONT_PLOT_ID in k for k in attrs)


def test_the_front_is_saved_again_only_when_it_changes(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    _annotate(study, None)
    saves: list[str] = []
    with monkeypatch.context() as m:
        m.setattr(annotate, "save_plotly_graph_object", lambda *a, **k: saves.append("front"))
        _annotate(study, None)
    assert saves == []  # nothing new: not rewritten every round
    # a front an earlier fpstune drew (axis titles without units) is replaced
    key = f"dashboard:plot_data:{FRONT_PLOT_ID}:0"
    study._storage.set_study_system_attr(study._study_id, key, '{"data": [], "layout": {}}')
    _annotate(study, None)
    layout = json.loads(_saved_plot(_attrs(study), FRONT_PLOT_ID))["layout"]
    assert layout["xaxis"]["title"]["text"].startswith("latency_ms (ms; lower is better)")
    assert layout["yaxis"]["title"]["text"] == "rel_l2 (dimensionless; lower is better)"


def test_files_agree_with_the_trial(study: optuna.Study, tmp_path: Path) -> None:
    store = open_artifacts(f"sqlite:///{tmp_path / 'study.db'}", None)
    assert store is not None
    _annotate(study, store)
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        rows = list(
            csv.DictReader(
                io.StringIO(_read(store, study, artifact_name(t.number, "latency.csv"), tmp_path))
            )
        )
        total = sum(float(r["total_ms"]) for r in rows)
        assert total == pytest.approx(t.values[0], rel=1e-5)
        assert sum(int(r["calls"]) for r in rows) == 10 * 4 * 2  # steps x layers x cfg

        text = _read(store, study, artifact_name(t.number, "policy.yaml"), tmp_path)
        preview = Policy.from_dict(yaml.safe_load(text))
        details = t.user_attrs["details"]
        assert preview.hardware.model_dump(mode="json") == details["latency_fingerprint"]
        assert preview.provenance is not None and preview.provenance.trial == t.number
        # every FP8 spec carries the kernel config its latency was composed from
        ran = trial_policy(t, None)
        assert ran is not None
        for row_p, row_r in zip(preview.spec_table(), ran.spec_table(), strict=True):
            for p, r in zip(row_p, row_r, strict=True):
                assert (p.mode, p.sparsity, p.tile) == (r.mode, r.sparsity, r.tile)
                assert (p.kernel is not None) == r.mode.fp8

        svg = _read(store, study, artifact_name(t.number, "schedule.svg"), tmp_path)
        ET.fromstring(svg)  # well-formed
        assert svg.count("<rect") == len(_blocks(schedule_info(ran, trial=t.number)))


def test_schedule_blocks_tile_the_grid_with_equal_cells(study: optuna.Study) -> None:
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        policy = trial_policy(t, None)
        assert policy is not None
        info = schedule_info(policy, trial=t.number)
        seen = [[0] * info.layers for _ in range(info.steps)]
        for s0, s1, l0, l1 in _blocks(info):
            cells = {info.specs[s][la] for s in range(s0, s1) for la in range(l0, l1)}
            assert len(cells) == 1
            for s in range(s0, s1):
                for la in range(l0, l1):
                    seen[s][la] += 1
        assert all(v == 1 for row in seen for v in row)
        assert schedule_svg(info).count("<rect") == len(_blocks(info))


def test_without_an_artifact_store_notes_only(study: optuna.Study) -> None:
    r = _annotate(study, None)
    assert r.artifacts == 0 and r.notes == r.trials > 0
    assert _links(study) == {}


def test_artifact_folder_defaults_beside_an_sqlite_file(tmp_path: Path) -> None:
    assert default_artifact_dir(f"sqlite:///{tmp_path / 'a.db'}") == tmp_path / "a-artifacts"
    # the file's name without its suffix: fpstune-artifacts/ beside fpstune.db
    assert default_artifact_dir("sqlite:///fpstune.db") == Path("fpstune-artifacts")
    assert default_artifact_dir("sqlite://") is None
    assert default_artifact_dir("postgresql+psycopg://u:p@h/db") is None


def test_the_dashboard_keeps_annotating_while_it_serves(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = mini_study(url, trials=1)
    store = open_artifacts(url, None)
    stop = threading.Event()
    worker = threading.Thread(target=_keep_annotating, args=(url, store, "x", 0.2, stop))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        want = {f"dashboard:{t._trial_id}:note_ver" for t in study.trials if t.values}
        while not want <= set(study._storage.get_study_system_attrs(study._study_id)):
            assert time.monotonic() < deadline, "no notes after 60 s"
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not worker.is_alive()


def test_a_trial_without_policy_or_latency_gets_a_note_once(tmp_path: Path) -> None:
    study = optuna.create_study(
        directions=["minimize", "minimize"], storage=f"sqlite:///{tmp_path / 'bare.db'}"
    )
    study.set_user_attr("fpstune_stage", "schedule")
    study.add_trial(optuna.create_trial(values=[1.0, 0.1]))
    store = open_artifacts(f"sqlite:///{tmp_path / 'bare.db'}", None)
    first = _annotate(study, store)
    assert (first.trials, first.notes, first.artifacts) == (1, 1, 0)
    assert _annotate(study, store).trials == 0  # nothing new to write: not counted again
