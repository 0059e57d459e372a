"""Incomplete and inconsistent studies, written as real DICOM (pydicom) and then broken the way
transfers and exports break them: CT files missing in the middle or at the ends, only one slice
of many left, a structure set drawn on another CT, a dose grid larger than the CT.

Each gives ONE study-level warning (first among the case's warnings) instead of a pile of
per-ROI notes, lists every ROI of the structure set (those without a mask on the CT marked), and
keeps the dose on its own grid so that its true maximum is still reported."""

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from engine.case import Volume
from engine.cli import main
from engine.geometry import grid_around
from engine.io.dicom import DicomImportError, load_dicom_case
from engine.io.dicom_export import write_rtdose
from engine.phantom import PhantomSpec, write_phantom

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
N_SLICES = 98


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A phantom with a synthetic dose: 98 slices of 3 mm (as the reported export), 11 ROIs,
    7 beams."""
    out = tmp_path_factory.mktemp("incomplete_source")
    return write_phantom(out, PhantomSpec(shape=(N_SLICES, 40, 48), spacing=(3.0, 3.0, 3.0),
                                          with_dose=True))


@pytest.fixture()
def patient(source, tmp_path):
    dst = tmp_path / "patient"
    shutil.copytree(source.rtplan_path.parent, dst)
    return dst


def _ct(patient: Path) -> list[Path]:
    return sorted((patient / "CT").glob("*.dcm"))


def _keep_only(patient: Path, keep: set[int]) -> None:
    for i, path in enumerate(_ct(patient)):
        if i not in keep:
            path.unlink()


def _edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def _roi_names(source) -> set[str]:
    return {s.name for s in source.case.structures}


def test_a_complete_study_has_no_study_warning(patient, source):
    case = load_dicom_case(patient)
    assert case.warnings == () and case.study_warnings == ()
    assert case.structures_not_on_ct == ()
    assert case.dose_grid is not None
    assert case.dose_grid.array.max() == pytest.approx(source.case.dose.array.max(), abs=0.01)


def test_one_slice_of_many_lists_every_roi_warns_once_and_keeps_the_dose(patient, source,
                                                                          capsys):
    """The reported Eclipse export: 1 of its CT slices present. Before: 1 structure listed,
    a dozen per-ROI warnings, the dose maximum of that one slice reported as the dose's."""
    truth = source.case.dose.array
    low = int(np.argmin(truth.max(axis=(1, 2))))  # the slice where the dose is lowest
    _keep_only(patient, {low})
    case = load_dicom_case(patient)
    assert case.geometry.shape[0] == 1
    listed = [s.name for s in case.structures] + [s.name for s in case.structures_not_on_ct]
    assert sorted(listed) == sorted(_roi_names(source))
    assert case.structures_not_on_ct, "most ROIs have no contour on that one slice"
    assert all(s.reason == "its contours lie outside the CT" for s in case.structures_not_on_ct)
    assert len(case.study_warnings) == 1
    warning = case.study_warnings[0]
    assert case.warnings[0] == warning
    assert warning.startswith(f"CT series incomplete: {N_SLICES - 1} of {N_SLICES} images "
                              "referenced by the structure set are missing.")
    assert not [w for w in case.warnings[1:] if "outside the CT" in w or "covers no CT" in w]
    for s in case.structures_not_on_ct:
        assert s.name in warning
    assert "1 slice)" in warning and f"{truth.max():.2f} Gy on its own grid" in warning
    # the dose: the slice holds little of it; its own grid holds all of it
    assert case.dose.array.max() < 0.5 * truth.max()
    assert case.dose_grid.array.max() == pytest.approx(truth.max(), abs=0.01)

    assert main(["inspect", str(patient), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["structures"]) == len(_roi_names(source))
    off = [s for s in report["structures"] if not s["on_ct"]]
    assert len(off) == len(case.structures_not_on_ct)
    assert all(s["volume_cc"] is None and s["reason"] for s in off)
    assert report["dose"]["own_grid"]["max_gy"] == pytest.approx(truth.max(), abs=0.01)
    assert report["dose"]["max_gy"] < 0.5 * truth.max()
    assert report["warnings"][0] == warning
    assert main(["inspect", str(patient)]) == 0
    text = capsys.readouterr().out
    assert f"Structures ({len(_roi_names(source))}, {len(off)} not on the CT):" in text
    assert "not on the CT: its contours lie outside the CT" in text
    assert "Dose on its own grid (" in text
    assert f"max {report['dose']['own_grid']['max_gy']:g} Gy" in text


def test_missing_slices_at_the_ends_load_with_one_warning(patient, source):
    _keep_only(patient, set(range(4, N_SLICES - 3)))
    case = load_dicom_case(patient)
    assert case.geometry.shape[0] == N_SLICES - 7
    assert len(case.study_warnings) == 1 and case.warnings[0] == case.study_warnings[0]
    warning = case.study_warnings[0]
    assert warning.startswith(f"CT series incomplete: 7 of {N_SLICES} images referenced by "
                              "the structure set are missing.")
    assert "are cut to the slices present" in warning and "BODY" in warning
    z = case.geometry.axis_coordinates()[0]
    assert f"covers z {z.min():.1f} to {z.max():.1f} mm ({N_SLICES - 7} slices)" in warning
    assert not [w for w in case.warnings[1:] if "outside the CT" in w]
    listed = {s.name for s in case.structures} | {s.name for s in case.structures_not_on_ct}
    assert listed == _roi_names(source)
    # the structures present are the ground truth cut to the slices present
    body = case.structure("BODY").mask
    assert np.array_equal(body, source.case.structure("BODY").mask[4:N_SLICES - 3])


def test_missing_slices_in_the_middle_are_an_error_that_says_why(patient):
    for path in _ct(patient)[10:13]:
        path.unlink()
    with pytest.raises(DicomImportError) as info:
        load_dicom_case(patient)
    text = str(info.value)
    assert text.startswith(f"CT series incomplete: 3 of {N_SLICES} images referenced by the "
                           "structure set are missing.")
    assert "3 slice(s) missing between" in text


def _as_other_series(patient: Path) -> str:
    """Rewrite the CT as another series (new series and image UIDs), same frame of reference."""
    series = generate_uid()
    for path in _ct(patient):
        def renew(ds):
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        _edit(path, renew)
    return series


def test_a_structure_set_drawn_on_another_ct(patient, source):
    drawn_on = source.case.refs.ct_series_instance_uid
    opened = _as_other_series(patient)
    case = load_dicom_case(patient)
    assert len(case.study_warnings) == 1
    warning = case.study_warnings[0]
    assert warning.startswith(f"The structure set belongs to another CT: {N_SLICES} image(s) "
                              f"of CT series {drawn_on} are referenced and none of them is in "
                              f"the folder, whose CT is series {opened}.")
    assert "placed on this CT by their coordinates" in warning
    assert {s.name for s in case.structures} == _roi_names(source)  # same place: all fit


def test_a_structure_set_of_another_ct_and_frame_of_reference(patient, source):
    other_for, other_series = generate_uid(), generate_uid()

    def move(ds):
        frame = ds.ReferencedFrameOfReferenceSequence[0]
        frame.FrameOfReferenceUID = other_for
        series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        series.SeriesInstanceUID = other_series
        for item in series.ContourImageSequence:
            item.ReferencedSOPInstanceUID = generate_uid()
        for roi in ds.StructureSetROISequence:
            roi.ReferencedFrameOfReferenceUID = other_for
    _edit(patient / "RTSTRUCT.dcm", move)
    case = load_dicom_case(patient)
    assert case.structures == ()
    assert {s.name for s in case.structures_not_on_ct} == _roi_names(source)
    assert {s.reason for s in case.structures_not_on_ct} == {
        "the structure set is in another frame of reference than the CT"}
    assert len(case.study_warnings) == 1
    assert "another frame of reference" in case.study_warnings[0]


def test_images_missing_that_only_the_dose_refers_to(patient):
    (patient / "RTSTRUCT.dcm").unlink()
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in _ct(patient)]

    def refer(ds):
        items = []
        for uid in uids:
            item = Dataset()
            item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
            item.ReferencedSOPInstanceUID = uid
            items.append(item)
        ds.ReferencedImageSequence = Sequence(items)
    _edit(patient / "RTDOSE.dcm", refer)
    _keep_only(patient, set(range(2, N_SLICES)))
    case = load_dicom_case(patient)
    assert len(case.study_warnings) == 1
    assert case.study_warnings[0].startswith(
        f"CT series incomplete: 2 of {N_SLICES} images referenced by the dose are missing.")


def _larger_dose(patient: Path, outside_gy: float) -> float:
    """Replace the RTDOSE by one on a grid 4 slices longer than the CT at each end and 2
    voxels wider in-plane: 20 Gy on the CT's extent, ``outside_gy`` beyond it. Returns the
    voxel count ratio of the part beyond the CT."""
    case = load_dicom_case(patient)
    (patient / "RTDOSE.dcm").unlink()
    g = case.geometry
    nz, ny, nx = g.shape
    shape = (nz + 8, ny + 4, nx + 4)
    centre = tuple(g.index_to_lps((np.asarray(g.shape) - 1) / 2.0))
    big = grid_around(centre, shape, g.spacing)
    dose = np.full(shape, outside_gy, np.float32)
    dose[4:-4, 2:-2, 2:-2] = 20.0
    write_rtdose(Volume(dose, big), case, patient / "big_dose.dcm")
    return 1.0 - (nz * ny * nx) / float(np.prod(shape))


def test_a_dose_grid_larger_than_the_ct_with_dose_beyond_it(patient, capsys):
    _larger_dose(patient, outside_gy=60.0)
    case = load_dicom_case(patient)
    assert case.dose.array.max() == pytest.approx(20.0, abs=0.01)
    assert case.dose_grid.array.max() == pytest.approx(60.0, abs=0.01)
    assert len(case.study_warnings) == 1
    warning = case.study_warnings[0]
    assert warning.startswith("RTDOSE big_dose.dcm: the dose grid reaches beyond the CT")
    assert "up to 60.00 Gy there, 20.00 Gy at most on the CT" in warning
    assert main(["inspect", str(patient), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dose"]["own_grid"]["max_gy"] == pytest.approx(60.0, abs=0.01)
    assert report["dose"]["own_grid"]["shape"] == list(case.dose_grid.geometry.shape)


def test_a_dose_grid_larger_than_the_ct_with_nothing_beyond_it_is_fine(patient):
    _larger_dose(patient, outside_gy=0.0)
    case = load_dicom_case(patient)
    assert case.warnings == () and case.study_warnings == ()
    assert case.dose_grid.geometry.shape != case.geometry.shape
    assert case.dose.array.max() == pytest.approx(20.0, abs=0.01)


def test_the_contours_own_image_references_count_without_the_series_list(patient):
    def drop_series_list(ds):
        series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]\
            .RTReferencedSeriesSequence[0]
        del series.ContourImageSequence
    _edit(patient / "RTSTRUCT.dcm", drop_series_list)
    _keep_only(patient, set(range(N_SLICES - 2)))
    case = load_dicom_case(patient)
    assert len(case.study_warnings) == 1
    assert case.study_warnings[0].startswith(
        f"CT series incomplete: 2 of {N_SLICES} images referenced by the structure set are "
        "missing.")
