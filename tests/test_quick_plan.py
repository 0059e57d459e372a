"""The quick plan: the physics objectives optimised on the physics' pencil beam, cut short."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine.case import Volume
from engine.phantom import PhantomSpec, make_phantom
from engine.physics.dose_calc import PhysicsError, body_mask
from engine.physics.quick_plan import (
    QuickPlanner,
    QuickPlanSettings,
    optimise_quick_plan,
    quick_plan_dose,
)

FAST = QuickPlanSettings(samples=4000, target_samples=2000, max_iter=60)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(PhantomSpec(shape=(24, 48, 56), spacing=(4.0, 4.0, 4.0)))


def _structure(case, name):
    return next(s for s in case.structures if s.name == name)


@pytest.fixture(scope="module")
def dose(phantom):
    return quick_plan_dose(phantom, settings=FAST)


def test_the_target_is_covered_at_its_prescription_and_the_cord_spared(phantom, dose):
    ptv = _structure(phantom, "PTV70").mask
    assert np.isfinite(dose).all() and dose.min() >= 0.0
    assert np.percentile(dose[ptv], 5.0) == pytest.approx(70.0, abs=1.0)  # D95 = prescription
    assert np.percentile(dose[ptv], 98.0) < 1.15 * 70.0                    # no wild hot spot
    assert dose[_structure(phantom, "SpinalCord").mask].max() < 0.75 * 70.0
    assert not dose[~body_mask(phantom)].any()


def test_the_optimiser_shapes_the_fluence_beyond_open_fields(phantom, dose):
    """The same beams without optimisation (every bixel weight equal, max_iter 0) put more
    dose where the objectives ask for less: the parotid beside PTV70."""
    open_fields = quick_plan_dose(phantom, settings=replace(FAST, max_iter=0))
    parotid = _structure(phantom, "Parotid_R").mask
    assert dose[parotid].mean() < open_fields[parotid].mean() - 2.0


def test_a_beam_doses_the_side_it_enters_from(phantom):
    ptv = _structure(phantom, "PTV70").mask
    body = body_mask(phantom)
    one = phantom.plan.with_beams(phantom.plan.beams[:1])
    doses = {}
    for gantry in (90.0, 270.0):
        plan = one.with_gantry(0, gantry)
        doses[gantry] = quick_plan_dose(phantom, plan, FAST)
    # the target's x extent; the entrance side of gantry 90 (patient left, +x in LPS) is the
    # high-x side of the array for this axial phantom, that of 270 the low-x side
    xs = np.nonzero(ptv.any(axis=(0, 1)))[0]
    low, high = np.zeros_like(body), np.zeros_like(body)
    low[:, :, :xs.min()] = True
    high[:, :, xs.max() + 1:] = True
    beam_rows = ptv.any(axis=2, keepdims=True)  # the slices and rows the target spans
    low &= body & beam_rows
    high &= body & beam_rows
    assert doses[90.0][high].mean() > 1.5 * doses[90.0][low].mean()
    assert doses[270.0][low].mean() > 1.5 * doses[270.0][high].mean()


def test_dose_at_gives_the_grid_dose_at_voxel_centres(phantom, dose):
    quick = optimise_quick_plan(phantom, settings=FAST)
    body = body_mask(phantom)
    points = np.argwhere(body)[::37]
    np.testing.assert_allclose(quick.dose_at(points), dose[tuple(points.T)], rtol=1e-5,
                               atol=1e-4)


def test_bad_input_gets_a_clear_error(phantom):
    with pytest.raises(PhysicsError, match="no plan with beams"):
        quick_plan_dose(phantom, phantom.plan.with_beams(()), FAST)
    couch = phantom.plan.with_beams((replace(phantom.plan.beams[0], couch_deg=30.0),))
    with pytest.raises(PhysicsError, match="coplanar"):
        quick_plan_dose(phantom, couch, FAST)
    g = phantom.ct.geometry
    stretched = replace(g, spacing=(g.spacing[0], g.spacing[1], 2 * g.spacing[2]))
    odd = replace(phantom, ct=Volume(phantom.ct.array, stretched))
    with pytest.raises(PhysicsError, match="square pixels"):
        quick_plan_dose(odd, settings=FAST)


def test_a_planner_keeps_the_angles_of_earlier_plans_and_gives_the_same_dose(phantom):
    planner = QuickPlanner(phantom, FAST)
    body = np.argwhere(body_mask(phantom))
    planner.optimise()
    kept = dict(planner._angles)
    moved = phantom.plan.with_gantry(0, phantom.plan.beams[0].gantry_deg + 30.0)
    quick = planner.optimise(moved)
    # six of the moved plan's seven angles are the first plan's, one is new
    assert sum(any(a is b for b in kept.values()) for a in quick.angles) == 6
    assert len(quick.angles) == 7 and len(planner._angles) == 8
    np.testing.assert_array_equal(quick.dose_at(body, "body"),
                                  optimise_quick_plan(phantom, moved, FAST).dose_at(body))
    np.testing.assert_array_equal(quick.dose_at(body, "body"), quick.dose_at(body))


def test_the_isocentre_plane_diverges_from_the_source_with_the_inverse_square(phantom):
    """A voxel 100 mm beyond the isocentre and 11 mm off the axis is 10 mm off it in the
    isocentre plane (SAD 1000 mm) and gets (1000 / r)^2 of the dose, r its distance from the
    source: pyRadPlan's geometry, which a parallel beam misses by 10 % and 20 %."""
    from engine.physics.quick_plan import _Geometry

    geo = _Geometry(phantom, body_mask(phantom), depth_grid_mm=8.0)
    isocentre = np.array([3.0, 5.0, 7.0])
    point = isocentre + np.array([0.0, 100.0, 11.0]) / geo.frame_mm
    z, v, inverse_square = geo.isocentre_plane(point[None], isocentre, sad_mm=1000.0)
    assert (z[0], v[0]) == pytest.approx((0.0, 10.0))
    assert inverse_square[0] == pytest.approx(1000.0 ** 2 / (1100.0 ** 2 + 11.0 ** 2))
