"""Beam and angle plates: agreement with the straightforward GDP-HMM reference, geometry."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from test_plates_reference import reference_all_beam_plate, reference_beam_plate, reference_source

from engine.case import AXIAL_DIRECTION, Beam, Geometry, PatientPosition, Plan, Technique
from engine.features.beam_geometry import source_direction_lps
from engine.features.beam_rays import _range_min_max, _rasterise, ray_ends, words_per_column
from engine.features.plates import (
    angle_plate,
    angle_plate_2d,
    beam_plate,
    close_like_reference,
    plan_angles,
    plan_plates,
)

SHAPE = (40, 64, 72)
ISO = (20, 32, 36)
NINE = [float(a) for a in range(0, 360, 40)]


def _ellipsoid(centre, radii, shape=SHAPE):
    g = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum(((gi - c) / r) ** 2 for gi, c, r in zip(g, centre, radii)) <= 1.0


@pytest.fixture(scope="module")
def two_lobes():
    """A large lobe and a smaller one offset in z and x: the beam's eye view has gaps."""
    return _ellipsoid((18, 30, 38), (7, 9, 11)) | _ellipsoid((25, 36, 24), (4, 4, 5))


def _agreement(fast, ref):
    return float(np.mean(np.isclose(fast, ref, rtol=1e-5, atol=1e-6)))


def test_closing_matches_scipy_on_random_masks():
    rng = np.random.default_rng(3)
    for _ in range(50):
        shape = tuple(int(n) for n in rng.integers(1, 12, size=3))
        m = rng.random(shape) < rng.random()
        ref = ndimage.binary_erosion(ndimage.binary_dilation(m, np.ones((4, 4, 4))),
                                     np.ones((3, 3, 3)))
        assert np.array_equal(close_like_reference(m), ref)


def test_closing_matches_scipy_across_64_slice_words():
    """Columns longer than one 64-bit word: the bit shifts carry between words."""
    rng = np.random.default_rng(4)
    for n_z in (63, 64, 65, 97, 128, 131):
        m = rng.random((n_z, 5, 6)) < 0.08
        m[60:68, 2, 3] = True  # a run across the first word boundary
        ref = ndimage.binary_erosion(ndimage.binary_dilation(m, np.ones((4, 4, 4))),
                                     np.ones((3, 3, 3)))
        assert np.array_equal(close_like_reference(m), ref)


def test_range_min_max_matches_slices():
    rng = np.random.default_rng(5)
    for size in (1, 2, 3, 7, 64, 1000):
        values = rng.random(size)
        lo, hi = np.sort(rng.integers(0, size + 1, size=(2, 300)), axis=0)
        low, high, nonempty = _range_min_max(values, lo, hi)
        assert np.array_equal(nonempty, hi > lo)
        for a, b, mn, mx in zip(lo[hi > lo], hi[hi > lo], low[nonempty], high[nonempty]):
            assert mn == values[a:b].min() and mx == values[a:b].max()


@pytest.mark.parametrize("source", [(20.0, -300.0, 50.0), (20.0, 40.0, 400.0), (33.0, 20.0, -90.0)])
def test_exact_rasterisation_matches_the_reference_samples(source):
    """Every ray of a group, also rays that end inside the grid or leave it sideways."""
    source = np.array(source)
    rng = np.random.default_rng(6)
    surface = np.stack([rng.integers(0, n, 400) for n in SHAPE], axis=1)
    delta, length = ray_ends(surface, source, SHAPE)
    keep = length > 0
    delta, length = delta[keep], length[keep]
    a = np.abs(delta)
    major = np.where(a[:, 0] >= length, 0, np.where(a[:, 1] >= length, 1, 2))
    z_pad = 64 * words_per_column(SHAPE[0])
    for ax in range(3):
        for sign in (-1.0, 1.0):
            sel = (major == ax) & (np.sign(delta[np.arange(len(length)), major]) == sign)
            if not sel.any():
                continue
            fast = set(_rasterise(delta[sel], length[sel], source, SHAPE, ax, sign).tolist())
            ref = set()
            for d, n in zip(delta[sel], length[sel]):
                samples = np.round(np.linspace(source, source + d, int(n) + 1)).astype(int)
                inside = np.all((samples >= 0) & (samples < SHAPE), axis=1)
                ref.update(((y * SHAPE[2] + x) * z_pad + z) for z, y, x in samples[inside])
            assert fast == ref


@pytest.mark.parametrize("ptv_kind", ["convex", "two_lobes"])
def test_static_beams_agree_with_the_reference(ptv_kind, two_lobes):
    ptv = two_lobes if ptv_kind == "two_lobes" else _ellipsoid((18, 30, 38), (7, 9, 11))
    sources = np.array([reference_source(ISO, a) for a in NINE], dtype=float)
    fast = beam_plate(ptv, ISO, sources)
    ref = reference_all_beam_plate(ptv, ISO, NINE)
    assert fast.dtype == np.float32
    assert _agreement(fast, ref) >= 0.999
    assert (ref > 0).sum() > 0.2 * ref.size  # the beams cover a real part of the grid


@pytest.mark.parametrize("angle", [45.0, 90.0, 135.0, 275.0])
def test_single_oblique_and_lateral_beams_agree(angle, two_lobes):
    fast = beam_plate(two_lobes, ISO, np.array([reference_source(ISO, angle)], dtype=float))
    ref = reference_beam_plate(two_lobes, ISO, angle)
    assert _agreement(fast, ref) >= 0.999
    assert fast[ISO] == pytest.approx(1.0)


def test_worker_threads_do_not_change_the_plate(two_lobes):
    sources = np.array([reference_source(ISO, a) for a in NINE], dtype=float)
    weights = np.linspace(0.5, 2.0, len(NINE))
    one = beam_plate(two_lobes, ISO, sources, weights, workers=1)
    assert one.any()
    for workers in (2, 3):
        assert np.array_equal(beam_plate(two_lobes, ISO, sources, weights, workers=workers), one)


def test_empty_ptv_gives_an_empty_plate():
    plate = beam_plate(np.zeros(SHAPE, bool), ISO, np.array([reference_source(ISO, 0.0)], float))
    assert not plate.any()


def _grid(shape=SHAPE, spacing=(2.0, 2.5, 2.5)):
    iso_mm = (0.0, 0.0, 0.0)
    origin = tuple(-np.array(ISO[::-1]) * np.array(spacing[::-1]))
    return Geometry(shape=shape, origin=origin, spacing=spacing, direction=AXIAL_DIRECTION), iso_mm


def test_plan_plates_reproduce_the_reference_for_a_hfs_plan(two_lobes):
    geometry, iso_mm = _grid()
    plan = Plan(beams=tuple(Beam(name=f"B{a:g}", gantry_deg=a, isocenter_mm=iso_mm)
                            for a in NINE))
    beam, angle, n = plan_plates(two_lobes, geometry, plan)
    assert n == 9
    assert _agreement(beam, reference_all_beam_plate(two_lobes, ISO, NINE)) >= 0.999
    assert angle.max() == 1.0 and angle[ISO] == 1.0


@pytest.mark.parametrize("position, shift", [("HFP", 180.0), ("FFS", None), ("FFP", None)])
def test_other_patient_positions_are_transformed(position, shift, two_lobes):
    geometry, iso_mm = _grid()

    def plates(pos, gantry):
        plan = Plan(beams=(Beam(name="B", gantry_deg=gantry, isocenter_mm=iso_mm),),
                    patient_position=pos)
        return plan_plates(two_lobes, geometry, plan)[0]

    hfs_direction = source_direction_lps(70.0, 0.0, "HFS")
    other = source_direction_lps(70.0, 0.0, position)
    if shift is not None:  # prone: the source of gantry g is the supine source of g + 180
        np.testing.assert_allclose(other, source_direction_lps(70.0 + shift, 0.0, "HFS"),
                                   atol=1e-12)
        assert _agreement(plates(position, 70.0), plates("HFS", 70.0 + shift)) == 1.0
    else:  # feet first: left and right swap (x), anterior/posterior as supine/prone says
        assert other[0] == pytest.approx(-hfs_direction[0] if position == "FFS"
                                         else hfs_direction[0])
        assert not np.allclose(plates(position, 70.0), plates("HFS", 70.0))


def test_iec_source_directions():
    np.testing.assert_allclose(source_direction_lps(0.0), [0, -1, 0], atol=1e-12)  # anterior
    np.testing.assert_allclose(source_direction_lps(90.0), [1, 0, 0], atol=1e-12)  # left
    np.testing.assert_allclose(source_direction_lps(90.0, 0.0, "HFP"), [-1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(source_direction_lps(0.0, 0.0, "FFP"), [0, 1, 0], atol=1e-12)
    # couch 90 (counter-clockwise from above) turns the head away from the gantry to its
    # left, so a gantry-90 source (observer's right) now sits towards the patient's feet
    np.testing.assert_allclose(source_direction_lps(90.0, 90.0), [0, 0, -1], atol=1e-12)
    np.testing.assert_allclose(source_direction_lps(90.0, 0.0, PatientPosition.HFDL),
                               [0, -1, 0], atol=1e-12)


def test_angle_plate_spokes_point_at_the_sources():
    plate = angle_plate_2d((128, 128), (64, 64), np.array([[-1.0, 0.0]]))  # gantry 0 HFS
    assert plate[64 - 40, 64] and not plate[64 + 10, 64]
    assert plate[64 - 50, 64] and not plate[64 - 53, 64]  # length 50 voxels (+ round cap)
    assert plate[64 - 20, 66] and not plate[64 - 20, 67]  # width 4 voxels
    vol = angle_plate(SHAPE, ISO, np.array([[0.0, 1.0]]))  # gantry 90 HFS: to the left (+x)
    assert vol[ISO[0], ISO[1], ISO[2] + 30] == 1.0
    assert vol[ISO[0] - 5, ISO[1], ISO[2] + 30] == 1.0 and vol[ISO[0] + 5, ISO[1], ISO[2]] == 0.0
    assert vol[ISO[0] - 6].max() == 0.0


def test_arc_angles_are_thinned_with_weights_that_count_every_control_point():
    cps = tuple(float(a) for a in np.arange(181.0, 181.0 + 358.0, 2.0) % 360.0)
    arc = Beam(name="A", gantry_deg=cps[0], isocenter_mm=(0, 0, 0), technique=Technique.ARC,
               control_point_gantry_deg=cps)
    plan = Plan(beams=(arc, Beam(name="S", gantry_deg=10.0, isocenter_mm=(0, 0, 0))))
    angles = plan_angles(plan, arc_step_deg=4.0)
    arc_angles = [a for i, a, _ in angles if i == 0]
    assert len(arc_angles) == pytest.approx(len(cps) / 2, abs=1)
    assert sum(w for i, _, w in angles if i == 0) == len(cps)
    assert angles[-1] == (1, 10.0, 1.0)


def test_thinned_arc_stays_close_to_every_control_point(two_lobes):
    """Documented arc difference: 4-degree thinning vs all 2-degree control points."""
    geometry, iso_mm = _grid()
    cps = tuple(float(a) for a in np.arange(181.0, 181.0 + 358.0, 2.0) % 360.0)
    arc = Beam(name="A", gantry_deg=cps[0], isocenter_mm=iso_mm, technique=Technique.ARC,
               control_point_gantry_deg=cps)
    plan = Plan(beams=(arc,))
    thin, _, n = plan_plates(two_lobes, geometry, plan, arc_step_deg=4.0)
    full, _, n_full = plan_plates(two_lobes, geometry, plan, arc_step_deg=0.0)
    assert n == n_full == len(cps)
    rel = np.abs(thin - full).sum() / full.sum()
    assert rel < 0.02
