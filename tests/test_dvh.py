"""DVHs against analytic truth: spheres and shells in linear-gradient and step dose fields."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq

from engine.case import Geometry, Structure
from engine.metrics.dvh import (
    all_metrics,
    block_mean,
    compute_dvhs,
    dose_metrics,
    dvh,
    evaluation_block,
    homogeneity_index,
    metric_value,
    paddick_conformity_index,
    parse_metric,
    prepare,
)

SPACING = 2.5
GEOM = Geometry((56, 64, 64), (0.0, 0.0, 0.0), (SPACING, SPACING, SPACING))
CENTRE = np.array([70.3, 80.3, 80.3])  # (z, y, x) mm, off the voxel lattice
Z, Y, X = np.meshgrid(*[np.arange(n) * SPACING for n in GEOM.shape], indexing="ij")
R2 = (X - CENTRE[2]) ** 2 + (Y - CENTRE[1]) ** 2 + (Z - CENTRE[0]) ** 2
GRADIENT = (30.0 + 0.5 * (X - CENTRE[2])).astype(np.float32)  # Gy, 0.5 Gy/mm along x


def cap_fraction(t: np.ndarray | float) -> np.ndarray | float:
    """Fraction of a unit ball's volume with x >= t (t in [-1, 1])."""
    t = np.clip(t, -1.0, 1.0)
    return (1 - t) ** 2 * (2 + t) / 4


def shell_fraction_above(x: float, r_in: float, r_out: float) -> float:
    """Fraction of a spherical shell's volume with (x - centre) >= x."""
    v_out, v_in = r_out**3, r_in**3
    return (v_out * cap_fraction(x / r_out) - v_in * cap_fraction(x / r_in)) / (v_out - v_in)


def circle_contours(radius_of_z, n_points: int = 240) -> list[np.ndarray]:
    """One polygon per slice through the sphere-like body, LPS points (x, y, z)."""
    t = np.linspace(0, 2 * np.pi, n_points, endpoint=False)
    out = []
    for k in range(GEOM.shape[0]):
        z = k * SPACING
        r = radius_of_z(z - CENTRE[0])
        if r > 0:
            out.append(np.c_[CENTRE[2] + r * np.cos(t), CENTRE[1] + r * np.sin(t),
                             np.full_like(t, z)])
    return out


def sphere(radius: float, with_contours: bool) -> Structure:
    contours = circle_contours(lambda dz: np.sqrt(max(radius**2 - dz**2, 0.0)))
    return Structure("Sphere", "oar", R2 <= radius**2,
                     contours=contours if with_contours else ())


def shell(r_in: float, r_out: float, with_contours: bool) -> Structure:
    contours = (circle_contours(lambda dz: np.sqrt(max(r_out**2 - dz**2, 0.0)))
                + circle_contours(lambda dz: np.sqrt(max(r_in**2 - dz**2, 0.0))))
    mask = (R2 <= r_out**2) & (R2 > r_in**2)
    return Structure("Shell", "oar", mask, contours=contours if with_contours else ())


def radius_for(volume_cc: float) -> float:
    return (volume_cc * 1000.0 * 3 / (4 * np.pi)) ** (1 / 3)


def rel_err(value: float, truth: float) -> float:
    return abs(value - truth) / abs(truth)


@pytest.mark.parametrize("with_contours", [True, False], ids=["contours", "mask"])
@pytest.mark.parametrize("volume_cc, tol", [(30.0, 0.01), (5.0, 0.01), (1.5, 0.03), (0.5, 0.03)])
def test_sphere_in_linear_gradient(volume_cc: float, tol: float, with_contours: bool) -> None:
    r = radius_for(volume_cc)
    curve = dvh(GRADIENT, sphere(r, with_contours), GEOM)
    d95_true = 30.0 + 0.5 * r * brentq(lambda t: cap_fraction(t) - 0.95, -1, 1)
    assert rel_err(curve.dose_at_volume_pct(95), d95_true) < tol
    assert rel_err(curve.mean_gy, 30.0) < tol
    assert rel_err(curve.volume_cc, volume_cc) < (tol if with_contours else 0.08)
    # the whole cumulative curve follows the spherical-cap law
    for dose in (27.0, 30.0, 33.0):
        if abs(dose - 30.0) < 0.5 * r:
            truth = 100 * cap_fraction((dose - 30.0) / (0.5 * r))
            assert abs(curve.volume_at_dose_pct(dose) - truth) < 100 * tol + 1.0


@pytest.mark.parametrize("with_contours", [True, False], ids=["contours", "mask"])
def test_shell_in_linear_gradient(with_contours: bool) -> None:
    r_in, r_out = 9.0, 16.0  # 13.6 cc
    curve = dvh(GRADIENT, shell(r_in, r_out, with_contours), GEOM)
    x95 = brentq(lambda x: shell_fraction_above(x, r_in, r_out) - 0.95, -r_out, r_out)
    x50 = brentq(lambda x: shell_fraction_above(x, r_in, r_out) - 0.50, -r_out, r_out)
    truth_cc = 4 / 3 * np.pi * (r_out**3 - r_in**3) / 1000
    assert rel_err(curve.volume_cc, truth_cc) < (0.01 if with_contours else 0.05)
    assert rel_err(curve.dose_at_volume_pct(95), 30.0 + 0.5 * x95) < 0.01
    assert rel_err(curve.dose_at_volume_pct(50), 30.0 + 0.5 * x50) < 0.01
    assert rel_err(curve.mean_gy, 30.0) < 0.01


@pytest.mark.parametrize("with_contours", [True, False], ids=["contours", "mask"])
def test_sphere_in_step_field(with_contours: bool) -> None:
    r = radius_for(10.0)
    step_x = 5 * SPACING * round(CENTRE[2] / (5 * SPACING)) + 0.5 * SPACING  # a voxel face
    dose = np.where(X < step_x, 60.0, 20.0).astype(np.float32)
    curve = dvh(dose, sphere(r, with_contours), GEOM)
    hot = 1.0 - cap_fraction((step_x - CENTRE[2]) / r)  # fraction at 60 Gy (x < step)
    assert 0.2 < hot < 0.6
    assert curve.dose_at_volume_pct(95) == pytest.approx(20.0, rel=0.01)
    assert curve.dose_at_volume_pct(100 * hot / 2) == pytest.approx(60.0, rel=0.01)
    assert rel_err(curve.mean_gy, 20.0 + 40.0 * hot) < 0.01
    assert curve.volume_at_dose_pct(40.0) == pytest.approx(100 * hot, abs=1.5)
    assert curve.max_gy == pytest.approx(60.0, abs=1e-3)
    assert curve.min_gy == pytest.approx(20.0, abs=1e-3)


def test_near_max_doses_of_a_box_in_a_gradient() -> None:
    # a 10 x 10 x 10 voxel box on voxel faces: the hottest v cc lie in a slab at the +x face
    mask = np.zeros(GEOM.shape, bool)
    mask[10:20, 10:20, 10:20] = True
    dose = (0.2 * X).astype(np.float32)  # 0.5 Gy per voxel along x
    curve = dvh(dose, mask, GEOM)
    face_gy = 0.2 * (19.5 * SPACING)
    area_cm2 = (10 * SPACING / 10) ** 2
    for v in (0.03, 0.1, 2.0):
        assert curve.dose_at_volume_cc(v) == pytest.approx(face_gy - 0.2 * 10 * v / area_cm2,
                                                           abs=0.01)
    assert curve.max_gy == pytest.approx(face_gy, abs=1e-3)
    assert curve.volume_at_dose_cc(0.2 * 14.5 * SPACING) == pytest.approx(curve.volume_cc / 2,
                                                                         rel=1e-3)


def test_cumulative_and_differential_are_consistent() -> None:
    curve = dvh(GRADIENT, sphere(radius_for(8.0), True), GEOM)
    assert curve.cumulative_cc[0] == pytest.approx(curve.volume_cc)
    assert curve.cumulative_pct[0] == pytest.approx(100.0)
    assert np.all(np.diff(curve.cumulative_cc) <= 1e-12)
    centres, cc_per_gy = curve.differential()
    width = curve.dose_gy[1] - curve.dose_gy[0]
    assert np.all(cc_per_gy >= -1e-9)
    assert cc_per_gy.sum() * width == pytest.approx(curve.volume_cc, rel=1e-6)
    assert np.sum(centres * cc_per_gy) * width / curve.volume_cc == pytest.approx(curve.mean_gy,
                                                                                  rel=1e-3)
    assert curve.differential(relative=True)[1].sum() * width == pytest.approx(100.0)


def test_dose_grid_not_covering_the_structure_is_reported() -> None:
    s = sphere(radius_for(10.0), True)
    dose = GRADIENT.copy()
    dose[:, :, : int(CENTRE[2] / SPACING)] = np.nan  # no dose for x < about the centre
    curve = dvh(dose, s, GEOM)
    assert 0.4 < curve.coverage_fraction < 0.6
    assert curve.volume_cc == pytest.approx(curve.coverage_fraction * curve.total_volume_cc)
    assert any("outside the dose grid" in w for w in curve.warnings)
    assert curve.mean_gy > 30.0  # only the hot half is counted


def test_contours_off_the_grid_count_as_uncovered() -> None:
    r = radius_for(10.0)
    shifted = tuple(c + np.array([0.0, 0.0, 200.0]) for c in sphere(r, True).contours)
    half_off = tuple(c for c in shifted if c[0, 2] < GEOM.shape[0] * SPACING + 10)
    s = Structure("Edge", "oar", np.zeros(GEOM.shape, bool), contours=half_off)
    curve = dvh(GRADIENT, s, GEOM)
    assert curve.coverage_fraction < 0.9
    assert curve.warnings


def test_uncovered_structure_gives_nan_metrics_and_a_warning() -> None:
    curve = dvh(np.full(GEOM.shape, np.nan, np.float32), sphere(5.0, False), GEOM)
    assert curve.volume_cc == 0.0 and np.isnan(curve.mean_gy)
    assert np.isnan(curve.dose_at_volume_pct(95)) and curve.warnings


def test_one_pass_equals_one_by_one() -> None:
    structures = [sphere(radius_for(3.0), True), shell(9.0, 16.0, False),
                  Structure("Box", "oar", (X > 100) & (Y < 40))]
    together = compute_dvhs(GRADIENT, prepare(structures, GEOM))
    for s, c in zip(structures, together):
        alone = dvh(GRADIENT, s, GEOM)
        assert c.mean_gy == pytest.approx(alone.mean_gy, rel=1e-6)
        assert c.dose_at_volume_pct(95) == pytest.approx(alone.dose_at_volume_pct(95), abs=0.02)


def test_homogeneity_and_paddick_conformity() -> None:
    r_target = radius_for(10.0)
    target = Structure("PTV70", "target", R2 <= r_target**2, prescription_gy=70.0)
    body = Structure("Body", "external", np.ones(GEOM.shape, bool))
    uniform = np.where(R2 <= (r_target + 5.0) ** 2, 70.0, 10.0).astype(np.float32)
    curves, metrics = all_metrics(uniform, prepare([target, body], GEOM), GEOM)
    m = metrics[0]
    assert m.homogeneity_index == pytest.approx(0.0, abs=1e-3)
    piv = curves[1].volume_at_dose_cc(70.0)
    assert piv > curves[0].volume_cc
    assert m.paddick_ci == pytest.approx(curves[0].volume_cc / piv, rel=0.01)
    assert paddick_conformity_index(curves[0], 70.0, curves[0].volume_cc) == pytest.approx(
        1.0, abs=0.01)
    assert metrics[1].paddick_ci is None and metrics[1].homogeneity_index is None
    graded = dvh(GRADIENT + 40.0, target, GEOM)
    hi = homogeneity_index(graded)
    assert hi == pytest.approx((graded.dose_at_volume_pct(2) - graded.dose_at_volume_pct(98))
                               / graded.dose_at_volume_pct(50))
    assert hi > 0.05


def test_dose_metrics_fields() -> None:
    curve = dvh(GRADIENT, sphere(radius_for(20.0), True), GEOM)
    m = dose_metrics(curve)
    assert m.d98_gy < m.d95_gy < m.d50_gy < m.d2_gy < m.d0_1cc_gy < m.d0_03cc_gy <= m.max_gy
    assert m.min_gy <= m.d98_gy
    assert m.v20gy_pct == pytest.approx(100.0)


@pytest.mark.parametrize("spec, kind, value, unit", [
    ("Dmean", "mean", 0.0, "Gy"), ("max", "max", 0.0, "Gy"), ("D95", "dose_at_pct", 95, "Gy"),
    ("D2%", "dose_at_pct", 2, "Gy"), ("D0.03cc", "dose_at_cc", 0.03, "Gy"),
    ("V20Gy", "volume_pct_at", 20, "%"), ("V65Gy_cc", "volume_cc_at", 65, "cc"),
    ("v20gy%", "volume_pct_at", 20, "%"), ("HI", "hi", 0.0, ""),
])
def test_parse_metric(spec: str, kind: str, value: float, unit: str) -> None:
    m = parse_metric(spec)
    assert (m.kind, m.value, m.unit) == (kind, value, unit)


@pytest.mark.parametrize("spec", ["D", "V20", "Dfoo", "D95Gy", "mean dose", ""])
def test_parse_metric_rejects_nonsense(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metric(spec)


def test_metric_value_reads_the_dvh() -> None:
    curve = dvh(GRADIENT, sphere(radius_for(20.0), True), GEOM)
    assert metric_value(curve, "D95") == curve.dose_at_volume_pct(95)
    assert metric_value(curve, "V30Gy") == pytest.approx(50.0, abs=0.5)
    assert metric_value(curve, "V30Gy_cc") == pytest.approx(curve.volume_cc / 2, rel=0.01)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="not the grid"):
        compute_dvhs(np.zeros((2, 2, 2)), prepare([sphere(5.0, False)], GEOM))
    with pytest.raises(ValueError, match="mask shape"):
        dvh(GRADIENT, np.zeros((2, 2, 2), bool), GEOM)


def test_fine_grids_are_evaluated_on_blocks_with_exact_partial_volumes() -> None:
    fine = Geometry((40, 150, 150), (0.0, 0.0, 0.0), (2.5, 0.8, 0.8))
    assert evaluation_block(fine) == 3
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(fine.shape, fine.spacing)],
                          indexing="ij")
    c = (50.3, 60.1, 59.9)
    r = radius_for(10.0)
    mask = (x - c[2]) ** 2 + (y - c[1]) ** 2 + (z - c[0]) ** 2 <= r * r
    dose = (30.0 + 0.5 * (x - c[2])).astype(np.float32)
    coarse = dvh(dose, mask, fine)
    full = dvh(dose, mask, fine, block=1)
    assert coarse.volume_cc == pytest.approx(mask.sum() * fine.voxel_volume_cc, rel=1e-6)
    d95_true = 30.0 + 0.5 * r * brentq(lambda t: cap_fraction(t) - 0.95, -1, 1)
    for curve in (coarse, full):
        assert rel_err(curve.dose_at_volume_pct(95), d95_true) < 0.01
        assert rel_err(curve.mean_gy, 30.0) < 0.01


def test_block_mean_handles_ragged_edges() -> None:
    values = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    means = block_mean(values, 3)
    assert means.shape == (2, 2, 2)
    assert means[0, 0, 0] == pytest.approx(values[0, :3, :3].mean())
    assert means[1, 1, 1] == pytest.approx(values[1, 3:, 3:].mean())
    assert means[1, 0, 1] == pytest.approx(values[1, :3, 3:].mean())


def test_negative_predicted_doses_count_as_zero() -> None:
    dose = np.where(X < CENTRE[2], -0.5, 10.0).astype(np.float32)
    curve = dvh(dose, sphere(radius_for(5.0), False), GEOM)
    assert curve.cumulative_cc[0] == pytest.approx(curve.volume_cc)
    assert curve.min_gy == 0.0
    assert curve.dose_at_volume_pct(99) == pytest.approx(0.0, abs=0.01)
