"""RTDOSE and RTPLAN export: round trips through pydicom and SimpleITK, dciodvfy, edited plans."""

import dataclasses
import hashlib
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from engine.case import Beam, Geometry, Plan, Technique, Volume
from engine.geometry import flip_axes, from_sitk, grid_around, voxel_centers_lps
from engine.io.dicom import load_dicom_case
from engine.io.dicom_export import write_rtdose, write_rtplan
from engine.io.dicom_rtdose import read_rtdose
from engine.io.dicom_rtplan import read_rtplan
from engine.phantom import PhantomSpec, make_phantom

DCIODVFY = shutil.which("dciodvfy")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def loaded(phantom_dicom, tmp_path):
    src = tmp_path / "patient"
    shutil.copytree(phantom_dicom.rtplan_path.parent, src)
    return load_dicom_case(src), src


def _smooth_dose(g: Geometry) -> Volume:
    p = voxel_centers_lps(g)
    r2 = ((p - np.asarray(g.index_to_lps(np.asarray(g.shape) / 2.0))) ** 2).sum(-1)
    return Volume((72.3 * np.exp(-r2 / 4000.0)).astype(np.float32), g)


def _tolerance(scaling, dose):
    """Half the quantisation step, plus the float32 rounding of the values themselves."""
    return scaling / 2 + 2 * float(np.spacing(np.float32(dose.array.max())))


def _sitk_dose(path):
    """The dose as SimpleITK reads it: stored values and grid, times DoseGridScaling."""
    image = sitk.ReadImage(str(path))
    scaling = float(image.GetMetaData("3004|000e"))
    vol = from_sitk(image)
    return Volume(vol.array.astype(np.float64) * scaling, vol.geometry), scaling


def test_rtdose_round_trip_pydicom_and_simpleitk(loaded, tmp_path):
    case, _ = loaded
    # a dose grid of its own, off the CT's voxel centres
    g = grid_around((-20.3, -10.1, 3.7), (14, 21, 25), (2.5, 3.5, 2.0))
    dose = _smooth_dose(g)
    path = tmp_path / "out" / "dose.dcm"
    uid = write_rtdose(dose, case, path)
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == uid and ds.Modality == "RTDOSE"
    assert ds.StudyInstanceUID == case.refs.study_instance_uid
    assert ds.FrameOfReferenceUID == case.refs.frame_of_reference_uid
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == \
        case.refs.plan_sop_instance_uid
    scaling = float(ds.DoseGridScaling)
    mine = read_rtdose(ds).volume
    theirs, sitk_scaling = _sitk_dose(path)
    assert sitk_scaling == scaling
    for back in (mine, theirs):
        assert back.geometry.shape == g.shape
        assert np.allclose(back.geometry.origin, g.origin, atol=1e-6)
        assert np.allclose(back.geometry.spacing, g.spacing, atol=1e-6)
        assert np.allclose(back.geometry.direction, g.direction)
        assert np.abs(back.array - dose.array).max() <= _tolerance(scaling, dose)


def test_rtdose_flipped_input_grid_keeps_positions(loaded, tmp_path):
    case, _ = loaded
    g = grid_around((0.0, 0.0, 0.0), (8, 10, 12), (3.0, 3.0, 3.0))
    dose = _smooth_dose(g)
    flipped = flip_axes(dose, (0, 2))  # frames running inferior, columns running right
    path = tmp_path / "dose.dcm"
    write_rtdose(flipped, case, path)
    ds = pydicom.dcmread(path)
    back = read_rtdose(ds).volume
    assert [float(v) for v in ds.GridFrameOffsetVector][:2] == [0.0, 3.0]
    assert np.allclose(back.geometry.origin, g.origin)
    assert np.abs(back.array - dose.array).max() <= _tolerance(float(ds.DoseGridScaling), dose)


def test_rtdose_needs_a_plan():
    case = make_phantom(PhantomSpec(shape=(4, 8, 8)))
    with pytest.raises(ValueError, match="RTPLAN"):
        write_rtdose(case.ct, case, "unused.dcm")


def test_edited_plan_is_a_new_copy_of_the_source(loaded, tmp_path):
    case, src = loaded
    source_path = src / "RTPLAN.dcm"
    before = _sha(source_path)
    edited = case.plan.with_gantry(2, 123.4)
    path = tmp_path / "edited.dcm"
    uid = write_rtplan(case, edited, path)
    assert _sha(source_path) == before
    new = pydicom.dcmread(path)
    old = pydicom.dcmread(source_path)
    assert new.SOPInstanceUID == uid != old.SOPInstanceUID
    assert new.SeriesInstanceUID != old.SeriesInstanceUID
    assert new.file_meta.MediaStorageSOPInstanceUID == uid
    assert new.StudyInstanceUID == old.StudyInstanceUID
    assert new.FrameOfReferenceUID == old.FrameOfReferenceUID
    assert new.ApprovalStatus == "UNAPPROVED"
    pred = new.ReferencedRTPlanSequence[0]
    assert (pred.ReferencedSOPInstanceUID, pred.RTPlanRelationship) == (old.SOPInstanceUID,
                                                                        "PREDECESSOR")
    angles = [float(b.ControlPointSequence[0].GantryAngle) for b in new.BeamSequence]
    expected = [b.gantry_deg for b in edited.beams]
    assert angles == pytest.approx(expected) and angles[2] == pytest.approx(123.4)
    for b in new.BeamSequence:  # every control point of a static beam moves with it
        assert len({float(cp.GantryAngle) for cp in b.ControlPointSequence
                    if "GantryAngle" in cp}) == 1
    reread = read_rtplan(new).plan
    assert reread.beams[2].gantry_deg == pytest.approx(123.4)
    assert reread.fractions == case.plan.fractions


def test_edited_arc_rotates_every_control_point(tmp_path):
    from engine.phantom import write_phantom

    written = write_phantom(tmp_path / "p", PhantomSpec(shape=(8, 24, 24), arc=True,
                                                        arc_step_deg=30.0))
    case = load_dicom_case(tmp_path / "p")
    edited = case.plan.with_gantry(0, 200.0)  # the first arc starts at 181
    write_rtplan(case, edited, tmp_path / "arc.dcm")
    back = read_rtplan(pydicom.dcmread(tmp_path / "arc.dcm")).plan
    start = written.case.plan.beams[0].control_point_gantry_deg
    assert back.beams[0].control_point_gantry_deg == pytest.approx(
        [(a + 19.0) % 360 for a in start])
    assert back.beams[1].control_point_gantry_deg == case.plan.beams[1].control_point_gantry_deg


def test_minimal_plan_when_there_is_no_source(tmp_path):
    case = make_phantom(PhantomSpec(shape=(6, 16, 16)))
    plan = Plan((Beam("A", 10.0, (1.0, 2.0, 3.0), couch_deg=270.0, collimator_deg=15.0),
                 Beam("Arc", 181.0, (1.0, 2.0, 3.0), technique=Technique.ARC,
                      control_point_gantry_deg=(181.0, 270.0, 0.0, 90.0, 179.0))),
                fractions=30, prescription_gy=60.0, patient_position="HFP", name="Mini")
    write_rtplan(case, plan, tmp_path / "plan.dcm")
    back = read_rtplan(pydicom.dcmread(tmp_path / "plan.dcm")).plan
    assert (back.fractions, back.prescription_gy, back.patient_position.value) == (30, 60.0,
                                                                                   "HFP")
    a, arc = back.beams
    assert (a.name, a.gantry_deg, a.couch_deg, a.collimator_deg) == ("A", 10.0, 270.0, 15.0)
    assert a.isocenter_mm == (1.0, 2.0, 3.0) and a.technique is Technique.STATIC
    assert arc.control_point_gantry_deg == (181.0, 270.0, 0.0, 90.0, 179.0)


def test_missing_source_plan_gives_a_minimal_plan(loaded, tmp_path, caplog):
    case, src = loaded
    (src / "RTPLAN.dcm").rename(src / "moved.dcm")
    write_rtplan(case, case.plan.with_gantry(0, 90.0), tmp_path / "plan.dcm")
    assert "could not be re-read" in caplog.text
    back = read_rtplan(pydicom.dcmread(tmp_path / "plan.dcm")).plan
    assert back.beams[0].gantry_deg == 90.0 and len(back.beams) == 7


def test_changed_beam_set_gives_a_minimal_plan(loaded, tmp_path):
    case, _ = loaded
    fewer = case.plan.with_beams(case.plan.beams[:3])
    write_rtplan(case, fewer, tmp_path / "plan.dcm")
    ds = pydicom.dcmread(tmp_path / "plan.dcm")
    assert len(ds.BeamSequence) == 3 and "ReferencedRTPlanSequence" not in ds
    assert ds.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == \
        case.refs.structure_set_sop_instance_uid


def _dciodvfy_errors(path):
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    return [line for line in text.splitlines() if line.startswith("Error")] + (
        [text] if "Assertion" in text or "Abort" in text else [])


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) missing")
def test_exports_pass_dciodvfy(loaded, tmp_path, phantom_dicom):
    case, _ = loaded
    dose_path = tmp_path / "dose.dcm"
    write_rtdose(case.dose, case, dose_path)
    edited_path = tmp_path / "edited.dcm"
    write_rtplan(case, case.plan.with_gantry(0, 33.0), edited_path)
    minimal_path = tmp_path / "minimal.dcm"
    no_source = dataclasses.replace(case, refs=dataclasses.replace(case.refs, plan_path=""))
    write_rtplan(no_source, case.plan, minimal_path)
    arc_path = tmp_path / "arc.dcm"
    arc_plan = Plan((Beam("Arc", 181.0, (0, 0, 0), technique=Technique.ARC,
                          control_point_gantry_deg=(181.0, 270.0, 0.0, 179.0)),))
    write_rtplan(no_source, arc_plan, arc_path)
    for path in (dose_path, edited_path, minimal_path, arc_path, phantom_dicom.rtstruct_path,
                 phantom_dicom.ct_paths[0]):
        assert _dciodvfy_errors(path) == [], path.name


def test_roi_numbers_link_plan_prescriptions_to_rtstruct_rois(tmp_path):
    """Structures without ROI numbers get free ones, used by both RTSTRUCT and RTPLAN."""
    from engine.io.dicom_export import roi_numbers, write_case_dicom

    truth = make_phantom(PhantomSpec(shape=(8, 24, 28)))
    renumbered = dataclasses.replace(truth, structures=tuple(
        dataclasses.replace(s, number=0 if s.name != "PTV56" else 1) for s in truth.structures))
    numbers = roi_numbers(renumbered)
    names_in_order = [s.name for s in renumbered.structures]
    assert len(set(numbers)) == len(numbers) and numbers[names_in_order.index("PTV56")] == 1
    written = write_case_dicom(renumbered, tmp_path)
    plan = pydicom.dcmread(written.rtplan_path)
    by_roi = {int(r.ReferencedROINumber): float(r.TargetPrescriptionDose)
              for r in plan.DoseReferenceSequence}
    ss = pydicom.dcmread(written.rtstruct_path)
    names = {int(r.ROINumber): r.ROIName for r in ss.StructureSetROISequence}
    assert {names[n]: dose for n, dose in by_roi.items()} == {"PTV70": 70.0, "PTV56": 56.0}
    case = load_dicom_case(tmp_path)
    assert {s.name: s.prescription_gy for s in case.targets} == {"PTV70": 70.0, "PTV56": 56.0}
