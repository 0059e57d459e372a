"""The synthetic patient: coherent anatomy, exact truth masks that match its contours, plans."""

import numpy as np
import pytest

from engine.case import Role, Technique
from engine.io.dicom_rtstruct import rasterize
from engine.phantom import PhantomSpec, make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(PhantomSpec(shape=(30, 56, 72), spacing=(3.0, 3.5, 3.0),
                                    with_dose=True))


def test_anatomy_is_coherent(phantom):
    body = phantom.external.mask
    ct = phantom.ct.array
    assert phantom.external.name == "BODY"
    assert np.all(ct[~body] == -1000.0)
    for s in phantom.structures:
        assert s.mask.any(), s.name
        assert not (s.mask & ~body).any(), f"{s.name} sticks out of the body"
    bone = phantom.structure("Vertebra").mask
    assert 600 < ct[bone].mean() < 800
    assert ct[phantom.structure("Trachea").mask].mean() < -950  # the air cavity
    soft = body & ~bone & ~phantom.structure("Trachea").mask
    assert abs(float(np.median(ct[soft]))) < 60
    cord = phantom.structure("SpinalCord").mask
    assert not (cord & bone).any()  # the cord lies in the vertebra's hole
    k = phantom.geometry.shape[0] // 2
    rows, cols = np.nonzero(bone[k])
    centre = (int(round(rows.mean())), int(round(cols.mean())))
    assert not bone[k][centre] and cord[k][centre]
    roles = {s.name: s.role for s in phantom.structures}
    assert roles["PTV70"] is Role.TARGET and roles["Parotid_L"] is Role.OAR
    assert {s.name: s.prescription_gy for s in phantom.targets} == {"PTV70": 70.0,
                                                                    "PTV56": 56.0}


def test_patient_left_is_plus_x(phantom):
    g = phantom.geometry
    left = g.index_to_lps(np.argwhere(phantom.structure("Parotid_L").mask).mean(0))
    right = g.index_to_lps(np.argwhere(phantom.structure("Parotid_R").mask).mean(0))
    spine = g.index_to_lps(np.argwhere(phantom.structure("Vertebra").mask).mean(0))
    trachea = g.index_to_lps(np.argwhere(phantom.structure("Trachea").mask).mean(0))
    assert left[0] > 0 > right[0]
    assert spine[1] > trachea[1]  # the spine is posterior (+y in LPS)


def test_contours_rasterise_to_the_truth(phantom):
    g = phantom.geometry
    for s in phantom.structures:
        mask = rasterize(s.contours, g).mask
        dice = 2 * np.count_nonzero(mask & s.mask) / (mask.sum() + s.mask.sum())
        assert dice >= (0.99 if s.volume_cc(g) >= 5 else 0.95), s.name


def test_islands_per_slice(phantom):
    nodes = phantom.structure("PTV56")
    k = int(np.argmax(nodes.mask.sum(axis=(1, 2))))
    z = phantom.geometry.index_to_lps([k, 0, 0])[2]
    on_slice = [c for c in nodes.contours if np.isclose(c[0, 2], z)]
    assert len(on_slice) == 2
    assert np.sign(on_slice[0][:, 0].mean()) != np.sign(on_slice[1][:, 0].mean())


def test_plan_and_dose(phantom):
    plan = phantom.plan
    assert [b.gantry_deg for b in plan.beams] == pytest.approx(
        [0, 51.4, 102.9, 154.3, 205.7, 257.1, 308.6])
    g = phantom.geometry
    ptv = phantom.structure("PTV70")
    centroid = g.index_to_lps(np.argwhere(ptv.mask).mean(0))
    assert np.allclose(plan.isocenter_mm, centroid)
    dose = phantom.dose.array
    assert dose.dtype == np.float32 and np.all(dose[~phantom.external.mask] == 0)
    assert 66 < np.median(dose[ptv.mask]) < 75
    assert np.median(dose[phantom.structure("PTV56").mask]) < 62
    assert dose[phantom.structure("Brainstem").mask].mean() < 20


def test_spec_options(tmp_path):
    small = PhantomSpec(shape=(10, 30, 50), spacing=(2.0, 2.0, 1.5), arc=True,
                        arc_step_deg=30.0, extra_oars=3, noise_hu=0.0, seed=1)
    a = make_phantom(small)
    b = make_phantom(small)
    assert np.array_equal(a.ct.array, b.ct.array)  # deterministic
    assert a.geometry.shape == (10, 30, 50) and a.geometry.spacing == (2.0, 2.0, 1.5)
    assert len(a.structures) == 14 and a.dose is None
    arc1, arc2 = a.plan.beams
    assert arc1.technique is Technique.ARC and len(arc1.control_point_gantry_deg) == 12
    assert arc2.control_point_gantry_deg == arc1.control_point_gantry_deg[::-1]
    noisy = make_phantom(PhantomSpec(shape=(10, 30, 50), noise_hu=20.0))
    assert 10 < np.std(noisy.ct.array[noisy.external.mask & (noisy.ct.array < 200)
                                      & (noisy.ct.array > -200)]) < 30
