"""The artifacts index's contract (dashboard/annotate.py), on every backend: the files fpstune
attaches to trials live in an Optuna artifact store, and their index in the study storage, one
study system attribute per file (``dashboard:artifacts:<trial_id>:<artifact_id>``, the key
optuna-dashboard lists a trial's artifacts from; a finished trial cannot take attributes of its
own). `stored_artifacts` reads the index back by file name, with the study artifacts an earlier
fpstune stored instead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

import optuna
import pytest
from dashboard_helpers import mini_study
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState
from optuna_dashboard.artifact._backend import list_trial_artifacts

from fpstune.dashboard.annotate import (
    LATENCY,
    POLICY,
    SCHEDULE,
    TRIAL_ARTIFACT_PREFIX,
    _upload,
    annotate_storage,
    artifact_name,
    stored_artifacts,
)


@pytest.fixture
def store(tmp_path: Path) -> FileSystemArtifactStore:
    (tmp_path / "artifacts").mkdir()
    return FileSystemArtifactStore(str(tmp_path / "artifacts"))


@pytest.fixture
def study(db_url: str) -> optuna.Study:
    """A study with two finished trials."""
    study = optuna.create_study(study_name="s", storage=db_url, directions=["minimize"])
    for x in (1.0, 2.0):
        study.tell(study.ask(), x)
    return study


def _index(study: optuna.Study) -> dict[str, str]:
    return stored_artifacts(study._study_id, study._storage.get_study_system_attrs(study._study_id))


def _read(store: FileSystemArtifactStore, url: str) -> str:
    with store.open_reader(url.rsplit("/", 1)[1]) as f:
        return f.read().decode("utf-8")


class TestArtifactIndexContract:
    """What `fpstune dashboard` relies on: files listed once, found again, shown per trial."""

    def test_a_file_of_a_finished_trial_is_indexed_and_reads_back(
        self, study: optuna.Study, store: FileSystemArtifactStore, db_url: str
    ) -> None:
        t0, t1 = study.get_trials(states=(TrialState.COMPLETE,))
        url = _upload(store, study, t1, LATENCY, "mode,ms\nfp8,1.0\n")
        sid = study._study_id
        assert url.startswith(f"/artifacts/{sid}/{t1._trial_id}/")
        # another connection (the dashboard's) finds it by name, and reads the file
        again = optuna.load_study(study_name="s", storage=db_url)
        assert _index(again) == {artifact_name(t1.number, LATENCY): url}
        assert _read(store, url) == "mode,ms\nfp8,1.0\n"
        # optuna-dashboard lists it on its trial's page, and on no other
        attrs = again._storage.get_study_system_attrs(sid)
        listed = {
            t.number: [a["filename"] for a in list_trial_artifacts(attrs, t.system_attrs, t)]
            for t in again.trials
        }
        assert listed == {t0.number: [], t1.number: [artifact_name(t1.number, LATENCY)]}

    def test_every_file_is_one_entry(
        self, study: optuna.Study, store: FileSystemArtifactStore
    ) -> None:
        trials = study.get_trials(states=(TrialState.COMPLETE,))
        urls = {
            artifact_name(t.number, kind): _upload(store, study, t, kind, f"{t.number}{kind}")
            for t in trials
            for kind in (SCHEDULE, LATENCY, POLICY)
        }
        assert _index(study) == urls
        attrs = study._storage.get_study_system_attrs(study._study_id)
        assert sum(k.startswith(TRIAL_ARTIFACT_PREFIX) for k in attrs) == len(urls) == 6
        for name, url in urls.items():
            t = int(name.split("-")[1])
            assert _read(store, url) == f"{t}{name.split('-', 2)[2]}"

    def test_files_an_earlier_fpstune_stored_on_the_study_are_found_by_name(
        self, study: optuna.Study, store: FileSystemArtifactStore, tmp_path: Path
    ) -> None:
        """Study artifacts (before trial artifacts) count; a trial's own file wins over one of
        the same name; deleted entries and files fpstune did not name are not fpstune's."""
        t0, t1 = study.get_trials(states=(TrialState.COMPLETE,))
        old = {}
        for name in (artifact_name(t0.number, POLICY), artifact_name(t1.number, POLICY), "x.txt"):
            (tmp_path / name).write_text(name, encoding="utf-8")
            old[name] = upload_artifact(
                artifact_store=store, file_path=str(tmp_path / name), study_or_trial=study
            )
        sid = study._study_id
        newer = _upload(store, study, t1, POLICY, "newer")
        deleted = _upload(store, study, t0, SCHEDULE, "deleted")
        key = f"{TRIAL_ARTIFACT_PREFIX}{t0._trial_id}:{deleted.rsplit('/', 1)[1]}"
        study._storage.set_study_system_attr(sid, key, json.dumps(None))  # as a delete does
        name0 = artifact_name(t0.number, POLICY)
        assert _index(study) == {
            name0: f"/artifacts/{sid}/{old[name0]}",
            artifact_name(t1.number, POLICY): newer,
        }

    def test_annotating_again_adds_nothing(self, db_url: str, tmp_path: Path) -> None:
        """`annotate_storage` on a study as the controller leaves it: three files and a note
        per complete trial, listed once; the next round finds them all."""
        study = mini_study(db_url, trials=2)
        store = FileSystemArtifactStore(str(tmp_path))
        first = annotate_storage(study._storage, artifact_store=store, storage_label="test")
        complete = study.get_trials(states=(TrialState.COMPLETE,))
        assert first.artifacts == 3 * len(complete) and first.notes == len(complete)
        index = _index(study)
        assert set(index) == {
            artifact_name(t.number, kind) for t in complete for kind in (SCHEDULE, LATENCY, POLICY)
        }
        reopened = optuna.load_study(study_name=study.study_name, storage=db_url)
        again = annotate_storage(reopened._storage, artifact_store=store, storage_label="test")
        assert (again.trials, again.artifacts, again.notes) == (0, 0, 0)
        assert _index(reopened) == index
        assert all(_read(store, url) for url in index.values())


def test_upload_writes_the_file_before_listing_it(
    store: FileSystemArtifactStore, tmp_path: Path
) -> None:
    """A listed file always exists: a failed write lists nothing (in-memory study storage)."""
    study = optuna.create_study()
    study.tell(study.ask(), 1.0)
    [t] = study.trials

    class Full(FileSystemArtifactStore):
        def write(self, artifact_id: str, content_body: BinaryIO) -> None:
            raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space"):
        _upload(Full(str(tmp_path / "artifacts")), study, t, LATENCY, "x")
    assert _index(study) == {}
