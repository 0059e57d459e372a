"""Phantom -> DICOM files -> load_dicom_case: masks, CT, plan and dose against the truth."""

import numpy as np
import pydicom
import pytest

from engine.case import PatientPosition, Role, Technique
from engine.io.dicom import load_dicom_case
from engine.phantom import PhantomSpec, write_phantom


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _check_structures(case, truth, min_cc=5.0):
    g = truth.geometry
    loaded = {s.name: s for s in case.structures}
    assert set(loaded) == {s.name for s in truth.structures}
    checked = 0
    for t in truth.structures:
        s = loaded[t.name]
        assert s.role is t.role and s.prescription_gy == t.prescription_gy
        if t.volume_cc(g) < min_cc:
            continue
        checked += 1
        assert _dice(s.mask, t.mask) >= 0.99, t.name
        assert abs(s.volume_cc(g) - t.volume_cc(g)) <= 0.02 * t.volume_cc(g), t.name
    return checked


def test_phantom_round_trip_masks_ct_plan_dose(phantom_dicom):
    truth = phantom_dicom.case
    case = load_dicom_case(phantom_dicom.rtplan_path.parent)
    assert case.warnings == ()
    assert case.geometry == truth.geometry
    assert np.abs(case.ct.array - truth.ct.array).max() <= 0.5  # HU stored as integers
    assert _check_structures(case, truth) >= 7
    vertebra = case.structure("Vertebra")  # a ring: the spinal canal is a hole
    canal = case.structure("SpinalCord").mask
    assert not (vertebra.mask & canal).any()
    nodes = case.structure("PTV56").mask  # two islands on each slice
    k = int(np.argmax(nodes.sum(axis=(1, 2))))
    x_cols = np.flatnonzero(nodes[k].any(axis=0))
    assert np.diff(x_cols).max() > 5
    assert case.external.name == "BODY" and case.by_role(Role.TARGET)
    assert len(case.plan.beams) == len(truth.plan.beams) == 7
    for b, t in zip(case.plan.beams, truth.plan.beams):
        assert (b.name, b.number, b.technique) == (t.name, t.number, Technique.STATIC)
        assert b.gantry_deg == pytest.approx(t.gantry_deg) and b.couch_deg == 0.0
        assert np.allclose(b.isocenter_mm, t.isocenter_mm, atol=1e-6)
    assert case.plan.fractions == 35 and case.plan.prescription_gy == 70.0
    scaling = float(pydicom.dcmread(phantom_dicom.rtdose_path).DoseGridScaling)
    assert np.abs(case.dose.array - truth.dose.array).max() <= scaling / 2 + 1e-5
    assert case.refs.plan_path == str(phantom_dicom.rtplan_path)
    assert len(case.refs.ct_sop_instance_uids) == truth.geometry.shape[0]
    first = pydicom.dcmread(phantom_dicom.ct_paths[0])
    assert case.refs.ct_sop_instance_uids[0] == first.SOPInstanceUID


@pytest.mark.parametrize("position", ["HFP", "FFS", "FFP"])
def test_patient_positions_give_the_same_patient(tmp_path, position):
    spec = PhantomSpec(shape=(20, 40, 56), spacing=(3.0, 4.0, 3.5), patient_position=position,
                       noise_hu=0.0)
    written = write_phantom(tmp_path, spec)
    iop = [float(v) for v in pydicom.dcmread(written.ct_paths[0]).ImageOrientationPatient]
    expected = {"HFP": [-1, 0, 0, 0, -1, 0], "FFS": [-1, 0, 0, 0, 1, 0],
                "FFP": [1, 0, 0, 0, -1, 0]}[position]
    assert iop == expected  # the files really are in that orientation
    case = load_dicom_case(tmp_path)
    truth = written.case
    assert case.geometry == truth.geometry
    assert np.array_equal(case.ct.array, truth.ct.array)
    assert _check_structures(case, truth, min_cc=2.0) >= 5
    assert case.plan.patient_position is PatientPosition(position)


def test_without_contour_image_sequence_and_square_images(tmp_path):
    spec = PhantomSpec(shape=(24, 64, 64), spacing=(2.5, 3.0, 3.0))
    written = write_phantom(tmp_path, spec, contour_image_refs=False)
    ss = pydicom.dcmread(written.rtstruct_path)
    assert all("ContourImageSequence" not in c for roi in ss.ROIContourSequence
               for c in roi.ContourSequence)
    case = load_dicom_case(tmp_path)
    assert _check_structures(case, written.case) >= 5


def test_arc_plan_keeps_control_point_angles(tmp_path):
    written = write_phantom(tmp_path, PhantomSpec(shape=(12, 40, 48), arc=True,
                                                  arc_step_deg=10.0))
    case = load_dicom_case(tmp_path)
    arc1, arc2 = case.plan.beams
    assert arc1.technique is Technique.ARC and arc2.technique is Technique.ARC
    assert arc1.control_point_gantry_deg == written.case.plan.beams[0].control_point_gantry_deg
    assert arc1.control_point_gantry_deg[:3] == (181.0, 191.0, 201.0)
    assert arc2.control_point_gantry_deg[0] == arc1.control_point_gantry_deg[-1]
    assert arc2.collimator_deg == 90.0
    plan = pydicom.dcmread(written.rtplan_path)
    assert plan.BeamSequence[0].ControlPointSequence[0].GantryRotationDirection == "CW"
    assert plan.BeamSequence[1].ControlPointSequence[0].GantryRotationDirection == "CC"


def test_many_rois_and_traced_contours(tmp_path):
    """Structures without source contours are traced from their masks and come back exact."""
    import dataclasses

    from engine.io.dicom_export import write_case_dicom
    from engine.phantom import make_phantom

    truth = make_phantom(PhantomSpec(shape=(16, 48, 40), extra_oars=6))
    bare = dataclasses.replace(truth, structures=tuple(
        dataclasses.replace(s, contours=()) for s in truth.structures))
    write_case_dicom(bare, tmp_path)
    case = load_dicom_case(tmp_path)
    assert len(case.structures) == len(truth.structures) == 17
    for s, t in zip(case.structures, truth.structures):
        assert np.array_equal(s.mask, t.mask), s.name
