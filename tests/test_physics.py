"""The physics adapter's own logic (no physics environment needed): environment discovery,
beam angles, grid orientation, the optimisation problem, normalisation, the subprocess."""

from __future__ import annotations

import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.case import (
    Beam,
    Case,
    Geometry,
    PatientPosition,
    Plan,
    Role,
    Structure,
    Technique,
    Volume,
)
from engine.physics import dose_calc as physics
from engine.physics.dose_calc import (
    PhysicsCancelled,
    PhysicsError,
    PhysicsSettings,
    PhysicsUnavailableError,
    arc_sample_angles,
    body_mask,
    canonical_grid,
    delivery_angles,
    dose_comparison,
    from_canonical,
    grow_mask,
    hfs_gantry_deg,
    normalize_to_d95,
    optimization_structures,
    physics_python,
    target_prescriptions,
    to_canonical,
)


def _source(gantry_deg: float) -> np.ndarray:
    t = math.radians(gantry_deg)
    return np.array([math.sin(t), -math.cos(t), 0.0])


def _phantom(shape=(10, 20, 24), spacing=(3.0, 2.0, 2.0)) -> Case:
    g = Geometry(shape, (0.0, 0.0, 0.0), spacing)
    ct = np.full(shape, -1000.0, np.float32)
    ct[:, 2:-2, 2:-2] = 0.0
    ptv = np.zeros(shape, bool)
    ptv[4:6, 8:12, 10:14] = True
    ptv2 = np.zeros(shape, bool)
    ptv2[3:7, 6:14, 8:16] = True
    cord = np.zeros(shape, bool)
    cord[:, 15:17, 11:13] = True
    lung = np.zeros(shape, bool)
    lung[:, 4:6, 3:5] = True
    return Case("phantom", Volume(ct, g), (
        Structure("PTV_low", Role.TARGET, ptv2, prescription_gy=50.0),
        Structure("PTV_high", Role.TARGET, ptv, prescription_gy=60.0),
        Structure("SpinalCord", Role.OAR, cord),
        Structure("Lung_L", Role.OAR, lung)))


# ---------------------------------------------------------------- environment


def test_missing_physics_env_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(physics.PHYSICS_PYTHON_ENV, str(tmp_path / "nope" / "python"))
    with pytest.raises(PhysicsUnavailableError, match="make physics-env"):
        physics_python()


def test_env_var_selects_the_interpreter(monkeypatch):
    monkeypatch.setenv(physics.PHYSICS_PYTHON_ENV, sys.executable)
    assert physics_python() == Path(sys.executable)


def test_default_interpreter_is_the_repo_venv(monkeypatch, tmp_path):
    monkeypatch.delenv(physics.PHYSICS_PYTHON_ENV, raising=False)
    monkeypatch.setattr(physics, "DEFAULT_PHYSICS_PYTHON", tmp_path / "python")
    with pytest.raises(PhysicsUnavailableError, match=str(tmp_path / "python")):
        physics_python()


# ---------------------------------------------------------------- angles


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
@pytest.mark.parametrize("gantry", [0.0, 33.0, 90.0, 200.0, 301.0])
def test_patient_position_maps_to_the_same_source_in_patient_lps(position, gantry):
    # room -> patient LPS for each position (couch 0): HFS identity; feet first turns the
    # patient about the vertical axis (x, z flip); prone turns it about the long axis (x, y flip)
    flips = {"HFS": (1, 1, 1), "FFS": (-1, 1, -1), "HFP": (-1, -1, 1), "FFP": (1, -1, -1)}
    in_patient = np.array(flips[position]) * _source(gantry)
    mapped = hfs_gantry_deg(gantry, PatientPosition(position))
    np.testing.assert_allclose(_source(mapped), in_patient, atol=1e-9)


def test_decubitus_is_refused():
    with pytest.raises(PhysicsError, match="HFDL"):
        hfs_gantry_deg(0.0, PatientPosition.HFDL)


def test_full_arc_sampled_at_segment_midpoints():
    cps = [(181.0 + 2.0 * k) % 360.0 for k in range(180)]  # clockwise 181 -> 179, 358 deg
    angles = arc_sample_angles(cps, 20.0)
    assert len(angles) == 18
    steps = np.diff(np.unwrap(np.radians(angles)))
    np.testing.assert_allclose(np.degrees(steps), 358.0 / 18, atol=1e-6)
    assert angles[0] == pytest.approx(181.0 + 358.0 / 36)


def test_counter_clockwise_arc_and_wraparound():
    angles = arc_sample_angles([30.0, 10.0, 350.0, 330.0], 20.0)  # 60 deg counter-clockwise
    assert angles == pytest.approx((20.0, 0.0, 340.0))


def test_arc_that_turns_back_is_refused():
    with pytest.raises(PhysicsError, match="one way"):
        arc_sample_angles([0.0, 20.0, 10.0], 10.0)


def test_delivery_angles_dedupes_and_maps_positions():
    iso = (0.0, 0.0, 0.0)
    beams = (Beam("A", 10.0, iso), Beam("B", 10.0, iso),
             Beam("Arc", 0.0, iso, technique=Technique.ARC,
                  control_point_gantry_deg=(0.0, 10.0, 20.0, 30.0, 40.0)))
    plan = Plan(beams, patient_position=PatientPosition.HFS)
    assert delivery_angles(plan, 20.0) == ((10.0, 0.0), (30.0, 0.0))
    prone = Plan(beams[:1], patient_position=PatientPosition.HFP)
    assert delivery_angles(prone, 20.0) == ((190.0, 0.0),)
    couch = Plan((Beam("C", 0.0, iso, couch_deg=90.0),), patient_position=PatientPosition.FFS)
    with pytest.raises(PhysicsError, match="couch"):
        delivery_angles(couch, 20.0)
    with pytest.raises(PhysicsError, match="no beams"):
        delivery_angles(Plan(()), 20.0)


# ---------------------------------------------------------------- grid orientation


@pytest.mark.parametrize("direction", [
    ((0, 0, 1), (0, 1, 0), (1, 0, 0)),
    ((0, 0, -1), (0, 1, 0), (1, 0, 0)),
    ((0, 0, 1), (0, -1, 0), (-1, 0, 0)),
    ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
])
def test_canonical_reordering_puts_voxels_where_they_are(direction):
    g = Geometry((4, 5, 6), (10.0, -20.0, 30.0), (2.0, 3.0, 4.0), direction)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"), axis=-1)
    lps = g.index_to_lps(idx)  # [z, y, x, 3]
    canon = np.stack([to_canonical(lps[..., c], g) for c in range(3)], axis=-1)
    origin, spacing = canonical_grid(g)
    cz, cy, cx = np.meshgrid(*[np.arange(n) for n in canon.shape[:3]], indexing="ij")
    expected = np.stack([origin[0] + cx * spacing[2], origin[1] + cy * spacing[1],
                         origin[2] + cz * spacing[0]], axis=-1)
    np.testing.assert_allclose(canon, expected, atol=1e-9)
    values = np.arange(g.shape[0] * g.shape[1] * g.shape[2]).reshape(g.shape)
    np.testing.assert_array_equal(from_canonical(to_canonical(values, g), g), values)


def test_oblique_grid_is_refused():
    c, s = math.cos(0.3), math.sin(0.3)
    g = Geometry((2, 2, 2), (0, 0, 0), (1, 1, 1), ((0, 0, 1), (s, c, 0), (c, -s, 0)))
    with pytest.raises(PhysicsError, match="axis-aligned"):
        to_canonical(np.zeros(g.shape), g)


# ---------------------------------------------------------------- optimisation problem


def test_body_from_ct_fills_cavities_and_keeps_largest_region():
    case = _phantom()
    ct = case.ct.array.copy()
    ct[:, 9:11, 9:11] = -1000.0  # an air cavity inside
    ct[:, 0, 0] = 0.0  # a small speck outside
    body = body_mask(Case("c", Volume(ct, case.geometry)))
    assert body[:, 9:11, 9:11].all() and not body[:, 0, 0].any()
    assert body.sum() == ct[:, 2:-2, 2:-2].size
    ext = np.zeros(case.geometry.shape, bool)
    ext[2:4] = True
    with_ext = Case("c", case.ct, (Structure("Body", Role.EXTERNAL, ext),))
    np.testing.assert_array_equal(body_mask(with_ext), ext)


def test_body_missing_is_an_error():
    g = Geometry((2, 3, 3), (0, 0, 0), (1, 1, 1))
    with pytest.raises(PhysicsError, match="no body"):
        body_mask(Case("air", Volume(np.full(g.shape, -1000.0, np.float32), g)))


def test_grow_mask_by_physical_distance():
    spacing = (2.5, 1.0, 4.0)
    mask = np.zeros((21, 41, 11), bool)
    mask[10, 20, 5] = True
    grown = grow_mask(mask, spacing, 5.0)
    pts = np.argwhere(grown) - [10, 20, 5]
    dist = np.sqrt(((pts * spacing) ** 2).sum(axis=1))
    assert dist.max() <= 5.0 + 1e-9
    assert grown[10, 15, 5] and grown[12, 20, 5] and grown[10, 20, 6] and not grown[10, 20, 7]
    np.testing.assert_array_equal(grow_mask(mask, spacing, 0.0), mask)


def test_targets_sorted_by_prescription_and_plan_rx_for_single_target():
    case = _phantom()
    assert [(t.name, rx) for t, rx in target_prescriptions(case, None)] == [
        ("PTV_high", 60.0), ("PTV_low", 50.0)]
    single = Case("s", case.ct, (Structure("PTV", Role.TARGET, case.structures[0].mask),))
    assert target_prescriptions(single, Plan((), prescription_gy=2.0))[0][1] == 2.0
    with pytest.raises(PhysicsError, match="no prescription"):
        target_prescriptions(single, Plan(()))
    with pytest.raises(PhysicsError, match="no non-empty target"):
        target_prescriptions(Case("n", case.ct, case.structures[2:]), None)


def test_optimization_structures_priorities_objectives_and_margins():
    case = _phantom()
    structures = optimization_structures(case, None, PhysicsSettings(target_margin_mm=2.0))
    by_name = {s.name: s for s in structures}
    assert [s.name for s in structures] == ["PTV_high", "PTV_low", "SpinalCord", "Lung_L",
                                            "SerialPRV", "Ring", "Body"]
    assert [s.overlap_priority for s in structures] == [1, 2, 3, 3, 3, 4, 5]
    assert [s.kind for s in structures] == ["target", "target", "oar", "oar", "helper",
                                            "helper", "external"]
    # the spinal cord's planning volume: the cord grown by 5 mm, outside the targets, max 48/70
    prv = by_name["SerialPRV"]
    cord_mask = by_name["SpinalCord"].mask
    expected = grow_mask(cord_mask, case.geometry.spacing, 5.0) & body_mask(case) & ~(
        case.structures[0].mask | case.structures[1].mask)
    np.testing.assert_array_equal(prv.mask, expected)
    assert prv.mask.sum() > cord_mask.sum()
    assert [(o.kind, o.dose_gy) for o in prv.objectives] == [
        ("squared_overdosing", pytest.approx(60.0 * 48 / 70))]
    high = by_name["PTV_high"]
    assert [(o.kind, o.dose_gy) for o in high.objectives] == [
        ("squared_deviation", 60.0), ("squared_underdosing", 60.0),
        ("squared_overdosing", pytest.approx(61.8)), ("squared_overdosing", pytest.approx(63.0))]
    # the lower-dose target is covered, held gently at its prescription, no tight maximum
    assert [(o.kind, o.dose_gy, o.priority) for o in by_name["PTV_low"].objectives] == [
        ("squared_deviation", 50.0, 100.0), ("squared_underdosing", 50.0, 10000.0),
        ("squared_overdosing", pytest.approx(63.0), 30000.0)]
    # grown by 2 mm: one 2 mm voxel in y and x but not diagonally, none along z (3 mm slices)
    assert high.mask.sum() == 2 * (6 * 6 - 4) and case.structures[1].mask.sum() == 2 * 4 * 4
    cord = [(o.kind, o.dose_gy) for o in by_name["SpinalCord"].objectives]
    assert cord == [("squared_overdosing", pytest.approx(0.6 * 60.0)),
                    ("squared_overdosing", pytest.approx(0.65 * 60.0)), ("mean_dose", 0.0),
                    ("squared_overdosing", pytest.approx(1.05 * 60.0))]
    # every organ at risk, the ring and the body limit hot spots
    assert [(o.kind, o.dose_gy) for o in by_name["Lung_L"].objectives] == [
        ("mean_dose", 0.0), ("squared_overdosing", pytest.approx(63.0))]
    assert [(o.dose_gy, o.priority) for o in by_name["Ring"].objectives][-1] == (
        pytest.approx(63.0), 3000.0)
    assert [(o.dose_gy, o.priority) for o in by_name["Body"].objectives][-1] == (
        pytest.approx(48.0), 3000.0)
    body = body_mask(case)
    for s in structures:
        assert not (s.mask & ~body).any()
    assert by_name["Ring"].mask.sum() > high.mask.sum()


def test_the_target_margin_keeps_away_from_a_serial_organ():
    """PTV_low (y 6..13, 2 mm voxels) grown by 4 mm would reach y 15, the spinal cord's first
    row: the margin stops 4 mm short of the cord (its limit stays reachable), grows elsewhere
    and never drops voxels of the target itself."""
    case = _phantom()
    settings = PhysicsSettings(target_margin_mm=4.0)
    by_name = {s.name: s for s in optimization_structures(case, None, settings)}
    low, cord = by_name["PTV_low"].mask, by_name["SpinalCord"].mask
    margin = low & ~case.structures[0].mask
    assert not (margin & grow_mask(cord, case.geometry.spacing, 4.0)).any()
    assert low[case.structures[0].mask].all()
    assert low[3:7, 4, 8:16].all() and low[3:7, 15, 8].all()  # grown away from the cord
    assert not low[3:7, 15, 9:15].any()
    grown = grow_mask(case.structures[0].mask, case.geometry.spacing, 4.0)
    assert (grown & cord).any()  # without the exclusion the margin would take cord voxels


def test_normalize_to_d95():
    rng = np.random.default_rng(1)
    dose = rng.uniform(0.5, 1.5, (10, 10, 10)).astype(np.float32)
    target = np.zeros(dose.shape, bool)
    target[2:8, 2:8, 2:8] = True
    out, factor = normalize_to_d95(dose, target, 70.0)
    assert np.percentile(out[target], 5) == pytest.approx(70.0, rel=1e-5)
    np.testing.assert_allclose(out, dose * factor, rtol=1e-6)
    with pytest.raises(PhysicsError, match="no dose"):
        normalize_to_d95(np.zeros_like(dose), target, 70.0)


def test_dose_comparison():
    case = _phantom()
    ref = np.zeros(case.geometry.shape, np.float32)
    dose = ref + 2.0
    dose[case.structure("SpinalCord").mask] += 3.0
    out = dose_comparison(case, dose, ref)
    body = body_mask(case)
    assert out["mae_gy"] == pytest.approx(float(dose[body].mean()))
    assert out["SpinalCord_Dmean_diff_gy"] == pytest.approx(5.0)
    assert out["PTV_high_D95_diff_gy"] == pytest.approx(2.0)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="dose_grid_mm"):
        PhysicsSettings(dose_grid_mm=0)
    with pytest.raises(ValueError, match="max_iter"):
        PhysicsSettings(max_iter=0)


# ---------------------------------------------------------------- the subprocess


def test_request_files_are_plain_and_canonical(tmp_path):
    case = _phantom()
    flipped_geometry = Geometry(case.geometry.shape, (0.0, 0.0, 27.0), case.geometry.spacing,
                                ((0, 0, -1), (0, 1, 0), (1, 0, 0)))
    flipped = Case("f", Volume(case.ct.array, flipped_geometry), case.structures)
    plan = Plan((Beam("B", 0.0, (20.0, 20.0, 13.5)),))
    structures = optimization_structures(flipped, plan, PhysicsSettings())
    physics.write_request(tmp_path, flipped, plan, PhysicsSettings(), structures, ((0.0, 0.0),))
    import json

    request = json.loads((tmp_path / "request.json").read_text())
    assert request["grid"] == {"origin_lps_mm": [0.0, 0.0, 0.0], "spacing_zyx_mm": [3.0, 2.0, 2.0]}
    assert request["beams"]["isocenter_lps_mm"] == [20.0, 20.0, 13.5]
    with np.load(tmp_path / "arrays.npz", allow_pickle=False) as arrays:
        np.testing.assert_array_equal(arrays["masks"][0], structures[0].mask[::-1])
        assert arrays["ct_hu"].dtype == np.float32


def test_worker_failure_surfaces_its_message(tmp_path):
    # the core interpreter has no pyRadPlan: the real worker process fails and says why
    (tmp_path / "request.json").write_text("{}")
    with pytest.raises(PhysicsError, match="ModuleNotFoundError|No such file"):
        physics._run_worker(Path(sys.executable), tmp_path, 60.0, None)


def test_cancel_kills_the_worker(tmp_path, monkeypatch):
    script = tmp_path / "sleepy.py"
    script.write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(physics, "WORKER", script)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(PhysicsCancelled):
        physics._run_worker(Path(sys.executable), tmp_path, 60.0, cancel)
    assert time.monotonic() - t0 < 10
    with pytest.raises(PhysicsError, match="limit"):
        physics._run_worker(Path(sys.executable), tmp_path, 0.5, None)


def test_compute_without_a_plan_is_refused():
    with pytest.raises(PhysicsError, match="no plan"):
        physics.compute_physics_dose(_phantom())
