"""Model grid, normalisation, OAR coding and the seven model inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.case import Beam, Case, Geometry, Plan, Role, Structure, Volume
from engine.features import (
    MODEL_SHAPE,
    ModelGridTransform,
    Normalization,
    Slot,
    build_modalities,
    model_geometry,
)
from engine.features.oar_coding import guess_site, oar_code, oar_codes

# a small CT stored with flipped, FFS-like axes: slices run head to foot, rows posterior to
# anterior, columns left to right (physical resampling must undo all three)
FLIPPED = ((0.0, 0.0, -1.0), (0.0, -1.0, 0.0), (-1.0, 0.0, 0.0))


def _case(direction=FLIPPED, dose=True, plan=True) -> Case:
    shape = (40, 60, 70)
    # the same box of space, x -100..107, y -90..87, z -60..57 mm, whichever way it is stored
    origin = tuple(np.where(np.asarray(direction).sum(axis=0) < 0,
                            [107.0, 87.0, 57.0], [-100.0, -90.0, -60.0]))
    g = Geometry(shape=shape, origin=origin, spacing=(3.0, 3.0, 3.0), direction=direction)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    lps = g.index_to_lps(np.stack([k, j, i], -1))

    def ball(c, r):
        return np.linalg.norm(lps - np.asarray(c), axis=-1) <= r

    ct = np.where(ball((20.0, 0.0, 0.0), 70.0), 40.0, -1000.0).astype(np.float32)
    ptv = ball((30.0, 5.0, 0.0), 15.0)
    structures = (
        Structure("PTV70", Role.TARGET, ptv, prescription_gy=70.0),
        Structure("PTV56", Role.TARGET, ball((30.0, 5.0, 0.0), 22.0), prescription_gy=56.0),
        Structure("SpinalCord", Role.OAR, ball((20.0, 40.0, 0.0), 6.0)),
        Structure("Parotid_L", Role.OAR, ball((45.0, 10.0, 10.0), 7.0)),
        Structure("Parotid_R", Role.OAR, ball((-5.0, 10.0, 10.0), 7.0)),
        Structure("Body", Role.EXTERNAL, ct > -500),
    )
    d = np.where(ptv, 70.0, 0.0).astype(np.float32) if dose else None
    iso = (30.0, 5.0, 0.0)
    p = Plan(beams=tuple(Beam(f"B{a}", float(a), iso) for a in range(0, 360, 40))) if plan \
        else None
    return Case(name="synthetic", ct=Volume(ct, g), structures=structures, plan=p,
                dose=Volume(d, g) if dose else None)


def test_model_grid_puts_the_isocentre_on_the_centre_voxel():
    g = model_geometry((12.5, -3.0, 7.0))
    assert g.shape == MODEL_SHAPE == (97, 128, 160)
    assert g.spacing == (2.0, 2.5, 2.5)
    np.testing.assert_allclose(g.lps_to_index((12.5, -3.0, 7.0)), (48, 64, 80), atol=1e-9)


def test_normalisation_maps_ranges_and_round_trips_through_json():
    n = Normalization()
    np.testing.assert_allclose(n.ct(np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0])),
                               [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(n.ptv(np.array([0.0, 70.0])), [-1.0, 0.75])
    np.testing.assert_allclose(n.dose_to_gy(n.dose(np.array([0.0, 33.3, 80.0]))),
                               [0.0, 33.3, 80.0], rtol=1e-6)
    np.testing.assert_allclose(n.binary(np.array([0, 1])), [-1.0, 1.0])
    custom = Normalization(dose_max_gy=90.0)
    assert Normalization.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    with pytest.raises(ValueError, match="unknown normalisation keys"):
        Normalization.from_dict({"dose_max": 80})
    with pytest.raises(ValueError, match="increasing"):
        Normalization(ct_min_hu=10.0, ct_max_hu=-10.0)


def test_oar_coding_follows_gdp_hmm():
    case = _case()
    codes = {s.name: c for s, c in oar_codes(case)}
    assert guess_site([s.name for s in case.structures]) == "HaN"
    assert codes["SpinalCord"] == pytest.approx(oar_code(30)) == pytest.approx(5.0)
    # the 70 Gy target sits on the patient's left (+x) of the body centre
    assert codes["Parotid_L"] == pytest.approx(oar_code(23))  # ParotidIps-PTV
    assert codes["Parotid_R"] == pytest.approx(oar_code(22))  # ParotidCon-PTV
    assert guess_site(["Heart", "Lungs", "PTV"]) == "Lung"


def test_build_modalities_fills_every_slot_in_range_and_in_place():
    case = _case()
    inputs = build_modalities(case)
    v = inputs.volumes
    assert v.shape == (7, *MODEL_SHAPE) and v.dtype == np.float32
    assert v.min() >= -1.0 and v.max() <= 1.0
    assert all(inputs.present)
    assert not v.flags.writeable
    iso = (48, 64, 80)  # the isocentre voxel: inside PTV70 and the body, hit by every beam
    assert inputs[Slot.PTV][iso] == pytest.approx(70.0 / 80.0 * 2 - 1)
    assert inputs[Slot.BODY][iso] == 1.0
    assert inputs[Slot.CT][iso] == pytest.approx(40.0 / 1000.0, abs=1e-6)
    assert inputs[Slot.ANGLE_PLATE][iso] == 1.0
    assert inputs[Slot.BEAM_PLATE][iso] == pytest.approx((1.0 / 2.0) * 2 - 1, abs=1e-6)
    # physical placement despite the flipped CT axes: the cord at LPS (20, 40, 0) is 35 mm
    # posterior (14 rows) and 10 mm right (4 columns) of the isocentre (30, 5, 0)
    cord = inputs[Slot.OAR][48, 64 + 14, 80 - 4]
    assert cord == pytest.approx(1.0)
    left_parotid = inputs[Slot.OAR][48 + 5, 64 + 2, 80 + 6]  # LPS (45, 10, 10)
    assert left_parotid == pytest.approx(oar_code(23) / 5.0 * 2 - 1)


def test_dose_goes_back_to_the_ct_grid_through_the_kept_transform():
    case = _case()
    inputs = build_modalities(case)
    back = inputs.dose_on_patient_grid(inputs[Slot.DOSE])
    assert back.geometry == case.geometry
    ptv = case.structure("PTV70").mask
    inner = ptv & np.roll(ptv, 2, 0) & np.roll(ptv, -2, 0) & np.roll(ptv, 2, 1) & np.roll(
        ptv, -2, 1) & np.roll(ptv, 2, 2) & np.roll(ptv, -2, 2)
    np.testing.assert_allclose(back.array[inner], 70.0, atol=1.0)  # a 70 Gy step edge
    assert back.array[~case.external.mask].max() < 1.0


def test_transform_round_trip_of_a_smooth_field_is_close():
    case = _case(direction=((0, 0, 1), (0, 1, 0), (1, 0, 0)))
    tf = ModelGridTransform.around(case.geometry, case.plan.isocenter_mm)
    k, j, i = np.indices(case.geometry.shape)
    field = (20 + 10 * np.sin(k / 7.0) * np.cos(j / 9.0) + i / 10.0).astype(np.float32)
    back = tf.dose_to_patient(tf.dose_to_model(field)).array
    interior = np.zeros(field.shape, bool)
    interior[3:-3, 3:-3, 3:-3] = True  # away from the CT's own edge (zeros beyond it)
    assert np.abs(back - field)[interior].mean() < 0.05


def test_missing_dose_leaves_the_slot_empty_and_errors_are_clear():
    inputs = build_modalities(_case(dose=False))
    assert inputs.present[Slot.DOSE] is False and (inputs[Slot.DOSE] == -1).all()
    with pytest.raises(ValueError, match="no plan"):
        build_modalities(_case(plan=False))
    no_target = _case()
    no_target = Case(name="x", ct=no_target.ct, structures=no_target.oars,
                     plan=no_target.plan)
    with pytest.raises(ValueError, match="no target"):
        build_modalities(no_target)
