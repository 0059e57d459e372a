"""pydicom's bundled RT test files (four unrelated patients) parse to what they hold."""

from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from engine.case import Geometry, PatientPosition, Role, Technique
from engine.io.dicom_rtdose import read_rtdose
from engine.io.dicom_rtplan import read_rtplan
from engine.io.dicom_rtstruct import rasterize, read_rois
from engine.io.dicom_scan import quiet_pydicom, read_object
from engine.structure_names import role_from_observation


def _read(name):
    obj = read_object(Path(get_testdata_file(name)))
    assert not isinstance(obj, str) and obj is not None, obj
    return obj.ds


def test_rtplan_beams_and_prescription():
    with quiet_pydicom():  # the file has an invalid UID, pydicom warns on access
        info = read_rtplan(_read("rtplan.dcm"))
    plan = info.plan
    assert plan.name == "Plan1" and plan.fractions == 30
    assert plan.prescription_gy == pytest.approx(30.826203)
    assert plan.patient_position is PatientPosition.HFS
    (beam,) = plan.beams
    assert (beam.name, beam.number, beam.technique) == ("Field 1", 1, Technique.STATIC)
    assert (beam.gantry_deg, beam.couch_deg, beam.collimator_deg) == (0.0, 0.0, 0.0)
    assert beam.isocenter_mm == pytest.approx((235.711172833292, 244.135437110782,
                                               -724.97815409918))
    assert beam.sad_mm == 1000.0 and beam.energy_mv == 6.0
    assert info.structure_set_uid == "1.2.333.444.55.6.7777.88888" and info.notes == ()


def test_rtstruct_rois_roles_and_contours():
    rois = read_rois(_read("rtstruct.dcm"))
    assert [(r.number, r.name, r.interpreted_type) for r in rois] == [
        (1, "patient", "EXTERNAL"), (2, "Isocenter 1", "ISOCENTER"), (3, "Isocenter 2",
                                                                      "ISOCENTER")]
    roles = [role_from_observation(r.interpreted_type, r.name)[0] for r in rois]
    assert roles == [Role.EXTERNAL, Role.OTHER, Role.OTHER]
    body = rois[0]
    assert body.color == (220, 160, 120) and len(body.contours) == 3
    assert all("point marker" in r.notes[0] for r in rois[1:]) and not rois[1].contours
    # the body is a 400 x 300 mm rectangle on z = -200, -190, -180 mm
    g = Geometry((3, 80, 100), (-247.5, -197.5, -200.0), (10.0, 5.0, 5.0))
    mask = rasterize(body.contours, g).mask
    assert mask.sum() * g.voxel_volume_cc == pytest.approx(3 * 40 * 30 * 1.0)


def test_rtdose_grid_and_values():
    ds = _read("rtdose.dcm")
    with quiet_pydicom():
        grid = read_rtdose(ds)
    g = grid.volume.geometry
    assert g.shape == (15, 10, 10) and g.spacing == (5.0, 10.0, 10.0)
    assert g.origin == pytest.approx((189.43125, 199.43125, -761.87))
    assert grid.scaling == 1e-6 and grid.summation_type == "BEAM"
    assert grid.units == "RELATIVE" and "RELATIVE" in grid.notes[0]
    assert grid.referenced_plan_uid.startswith("1.2.123.456")
    raw = ds.pixel_array
    assert np.allclose(grid.volume.array, raw * 1e-6, atol=1e-7)
    assert float(grid.volume.array.max()) == pytest.approx(1.254, abs=1e-6)
    # the maximum lies in the first frame, row 0, column 7: at x = 189.43 + 70 mm, z = -761.87
    k, j, i = np.unravel_index(np.argmax(grid.volume.array), g.shape)
    assert np.allclose(g.index_to_lps([k, j, i]), (259.43125, 199.43125, -761.87))
