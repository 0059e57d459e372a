"""The local study store: one folder per patient and study, staged until complete, never
overwriting a different object, refusing objects that are broken or of another patient."""

from __future__ import annotations

import os
import shutil

import pydicom
import pytest

from engine.io.dicom import load_dicom_case
from engine.io.dicom_scan import scan_folder
from engine.pacs.store import (
    RejectedObject,
    StoreConflict,
    StudyStore,
    patient_folder_name,
    study_folder_name,
)
from tests.conftest import demo_files


def _bytes(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def demo():
    files = demo_files()
    head = pydicom.dcmread(files[0], stop_before_pixels=True)
    return files, str(head.PatientID), str(head.StudyInstanceUID)


def test_folder_names_are_safe_and_distinct():
    assert patient_folder_name("pt_201") == "pt_201"
    names = {patient_folder_name(p) for p in ("A/B", "A_B", "A B", "", "../..", ".hidden",
                                              "_results")}
    assert len(names) == 7
    for name in names:
        assert "/" not in name and not name.startswith((".", "_")) and name not in ("", "..")
    assert study_folder_name("1.2.840.113619.2.1") == "1.2.840.113619.2.1"
    assert study_folder_name("../../etc") != "../../etc" and "/" not in study_folder_name("a/b")


def test_a_study_appears_only_when_committed_and_then_opens(tmp_path, demo):
    files, patient, study = demo
    store = StudyStore(tmp_path / "store")
    staging = store.begin(patient, study)
    for f in files:
        assert staging.add_file(f).status == "stored"
    # while receiving: nothing a loader would read (the staging folder is a temporary)
    assert scan_folder(store.root).objects == ()
    assert not store.study_folder(patient, study).exists()
    committed = staging.commit(source="test")
    assert committed.folder == tmp_path / "store" / "pt_201" / study
    assert committed.total == len(files) == len(committed.added)
    assert committed.modalities == {"CT": 128, "RTDOSE": 1, "RTPLAN": 1, "RTSTRUCT": 1}
    assert not staging.folder.exists()
    case = load_dicom_case(committed.folder)
    assert case.plan is not None and case.ct.array.shape[0] == 128
    # the received bytes are stored as they came
    plan = next(committed.folder.glob("RTPLAN_*.dcm"))
    assert plan.read_bytes() == next(f for f in files if f.name == "RTPLAN.dcm").read_bytes()
    assert store.studies()[0]["patient_id"] == "pt_201"


def test_objects_received_again_are_kept_once_and_never_overwrite_a_different_one(
        tmp_path, demo):
    files, patient, study = demo
    store = StudyStore(tmp_path)
    plan_file = next(f for f in files if f.name == "RTPLAN.dcm")
    first = store.begin(patient, study)
    first.add_file(plan_file)
    first.add_file(plan_file)  # the same object twice in one transfer
    assert first.count == 1 and first.duplicates == 1
    done = first.commit()
    stored = done.folder / done.added[0]
    original = stored.read_bytes()

    changed = pydicom.dcmread(plan_file)  # the same SOP Instance UID, different content
    changed.RTPlanLabel = "EDITED"
    again = store.begin(patient, study)
    assert again.add_file(plan_file).status == "stored"
    assert again.add_bytes(_bytes(changed)).status == "renamed"
    result = again.commit()
    assert result.duplicates == 1 and len(result.added) == 1
    assert stored.read_bytes() == original  # never overwritten
    kept = result.folder / result.added[0]
    assert kept != stored and pydicom.dcmread(kept).RTPlanLabel == "EDITED"
    manifest = store.manifest(result.folder)
    assert set(manifest["objects"]) == {stored.name, kept.name}
    assert [h["added"] for h in manifest["history"]] == [1, 1]


def test_broken_objects_and_objects_of_another_patient_or_study_are_refused(tmp_path, demo):
    files, patient, study = demo
    store = StudyStore(tmp_path)
    staging = store.begin(patient, study)
    ct = files[0].read_bytes()
    with pytest.raises(RejectedObject, match="truncated") as info:
        staging.add_bytes(ct[: len(ct) // 2])
    assert info.value.status == 0xC000
    with pytest.raises(RejectedObject, match="not a DICOM"):
        staging.add_bytes(b"hello" * 100)
    other = pydicom.dcmread(files[0])
    other.PatientID = "someone_else"
    with pytest.raises(RejectedObject, match="someone_else") as info:
        staging.add_bytes(_bytes(other))
    assert info.value.status == 0xA900
    other = pydicom.dcmread(files[0])
    other.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(RejectedObject, match="belongs to study 1.2.3.4"):
        staging.add_bytes(_bytes(other))
    other = pydicom.dcmread(files[0])
    del other.SeriesInstanceUID
    with pytest.raises(RejectedObject, match="lacks SeriesInstanceUID"):
        staging.add_bytes(_bytes(other))
    assert staging.count == 0
    assert [p.name for p in staging.folder.iterdir()] == []  # nothing left of them


def test_a_study_folder_of_another_patient_is_not_mixed(tmp_path, demo):
    files, patient, study = demo
    store = StudyStore(tmp_path)
    staging = store.begin(patient, study)
    staging.add_file(files[0])
    folder = staging.commit().folder
    # someone's files under that patient's folder name claim another patient ID
    (folder / "study.json").write_text((folder / "study.json").read_text().replace(
        '"patient_id": "pt_201"', '"patient_id": "other"'))
    late = store.begin(patient, study)
    late.add_file(files[1])
    with pytest.raises(StoreConflict, match="nothing was added"):
        late.commit()
    assert len(list(folder.glob("*.dcm"))) == 1


def test_a_killed_receivers_staging_is_cleaned_up(tmp_path, demo):
    files, patient, study = demo
    store = StudyStore(tmp_path)
    staging = store.begin(patient, study)
    staging.add_file(files[0])
    dead = tmp_path / f".{study}-1.tmp-{2 ** 22 + 12345}"  # a pid that does not run
    shutil.copytree(staging.folder, dead)
    assert dead.exists() and os.path.exists(staging.folder)
    StudyStore(tmp_path)
    assert not dead.exists() and staging.folder.exists()  # ours (alive) is kept
