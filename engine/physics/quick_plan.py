"""A fast, approximate optimised plan: the physics objectives on a parallel pencil-beam model.

What the dose model misses when a beam moves is mostly the optimiser's response: the fluence
each beam gets so that the targets are covered and the organs spared from *those* directions.
No geometric beam input carries it (issue 15: the GDP-HMM beam plate and a depth-dose
projection both change with a correlation of about 0.24 to the physics change). This module
makes a plan the way :mod:`engine.physics.dose_calc` asks pyRadPlan to, with the same objectives
(:func:`engine.physics.dose_calc.optimization_structures`), but with a dose model simple enough
to optimise in seconds in numpy:

- each beam angle is a parallel beam (no divergence, no inverse square) split into square
  bixels of ``bixel_mm`` in its beam's-eye view, over the targets' projection;
- a bixel's dose at a voxel is its lateral profile (the bixel's square blurred by a Gaussian of
  ``sigma_mm``, separable: erf differences) times ``exp(-mu * radiological depth)``, the depth
  measured from where the ray enters the body through the CT (relative electron density
  ``(HU + 1000) / 1000``); no scatter beyond the penumbra, no build-up;
- the fluence is optimised (L-BFGS-B, weights >= 0) on a random sample of the structures'
  voxels, each objective a mean over its structure's sampled voxels (pyRadPlan's convention;
  overlapping voxels belong to the structure of the lowest overlap priority), then the whole
  dose is evaluated and normalised so that the highest-dose target's D95 is its prescription,
  as the physics plans are.

Coordinates: everything works in the case grid's index space (z, y, x) with square in-plane
pixels; a beam's frame is (z, u, v) with u along the beam's travel and v across it, in voxel
units. Coplanar beams only (couch 0). Units: mm, degrees, Gy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize, sparse
from scipy.special import erf

from engine.case import Case, Plan
from engine.features.beam_geometry import source_direction_lps
from engine.physics.dose_calc import (
    OptimizationStructure,
    PhysicsError,
    PhysicsSettings,
    body_mask,
    delivery_angles,
    optimization_structures,
    target_prescriptions,
)


@dataclass(frozen=True)
class QuickPlanSettings:
    """Dose model and optimiser settings (lengths in mm, angles in degrees).

    Attributes:
        bixel_mm: bixel size in the beam's-eye view (the physics plans use 7 mm).
        sigma_mm: lateral Gaussian spread of a bixel's edge (penumbra).
        mu_per_mm: effective attenuation per mm of water-equivalent depth (6 MV ~ 0.0045).
        arc_step_deg: arcs are delivered as static beams every this many degrees, as the
            physics plans are.
        samples: about this many voxels (outside the targets) take part in the optimisation;
            targets add up to ``target_samples`` of their own.
        target_samples: at most this many target voxels per target.
        min_samples: every structure keeps at least this many voxels (or all it has).
        max_iter: L-BFGS-B iteration cap.
        depth_grid_mm: the radiological depth is computed on the grid thinned to about this
            voxel size (it varies slowly; the lateral profile keeps the full resolution).
        reach: a voxel sees the bixels up to this many bixels away from the one over it in
            the beam's-eye view (1: a 3 x 3 neighbourhood, the profile's tail beyond it under
            1 % for the default sizes).
        seed: the voxel sample's random seed.
    """

    bixel_mm: float = 7.0
    sigma_mm: float = 4.0
    mu_per_mm: float = 0.0045
    arc_step_deg: float = 20.0
    samples: int = 12000
    target_samples: int = 4000
    min_samples: int = 300
    max_iter: int = 100
    depth_grid_mm: float = 8.0
    reach: int = 1
    seed: int = 0


@dataclass(frozen=True)
class _Beam:
    """One delivery angle: index -> frame rotation, its depth volume and its bixels."""

    rotation: np.ndarray     # (3, 3): frame (z, u, v) = rotation.T @ (index - centre_in) + centre
    depth_mm: np.ndarray     # radiological depth on the thinned frame grid
    bixel_z: np.ndarray      # bixel centres in the beam's-eye view, mm
    bixel_v: np.ndarray
    lookup: np.ndarray       # (n_bz, n_bv) bixel grid -> column index (-1: no bixel)
    origin_mm: tuple[float, float]   # (z, v) of the bixel grid's corner


class _Geometry:
    """Index <-> beam frame mapping shared by all beams of one case."""

    def __init__(self, case: Case, body: np.ndarray, depth_grid_mm: float) -> None:
        g = case.geometry
        self.dz, self.dxy = float(g.spacing[0]), float(g.spacing[1])
        if abs(float(g.spacing[2]) - self.dxy) > 1e-3 * self.dxy:
            raise PhysicsError(f"the quick plan needs square pixels, got {g.spacing[1:]} mm")
        self.direction = np.asarray(g.direction, dtype=np.float64)
        self.step = max(1, round(depth_grid_mm / self.dxy))
        self.step_z = max(1, round(depth_grid_mm / self.dz))
        density = np.where(body, np.clip((case.ct.array.astype(np.float32) + 1000.0) / 1000.0,
                                         0.0, 3.0), 0.0).astype(np.float32)
        self.density = density[::self.step_z, ::self.step, ::self.step]
        n_z, n_y, n_x = self.density.shape
        self.side = int(math.ceil(math.hypot(n_y, n_x))) + 2
        self.centre_in = np.array([0.0, (n_y - 1) / 2, (n_x - 1) / 2])
        self.centre_out = np.array([0.0, (self.side - 1) / 2, (self.side - 1) / 2])

    def rotation(self, gantry_deg: float) -> np.ndarray:
        to_source = self.direction @ source_direction_lps(gantry_deg, 0.0, "HFS")
        travel = -to_source[1:] / np.linalg.norm(to_source[1:])   # (y, x), index space
        normal = np.array([-travel[1], travel[0]])
        return np.array([[1.0, 0.0, 0.0],
                         [0.0, travel[0], normal[0]],
                         [0.0, travel[1], normal[1]]])

    def depth_volume(self, rotation: np.ndarray) -> np.ndarray:
        """Radiological depth (mm) at each thinned-frame voxel's centre, from the body's edge."""
        offset = self.centre_in - rotation @ self.centre_out
        dens = ndimage.affine_transform(self.density, rotation, offset, order=1,
                                        output_shape=(self.density.shape[0], self.side,
                                                      self.side))
        pixel = self.dxy * self.step
        return (np.cumsum(dens, axis=1) - 0.5 * dens) * np.float32(pixel)

    def to_frame(self, zyx: np.ndarray, rotation: np.ndarray) -> np.ndarray:
        """Full-resolution index coordinates (N, 3) -> thinned frame coordinates (N, 3)."""
        thinned = zyx / np.array([self.step_z, self.step, self.step], dtype=np.float64)
        return (thinned - self.centre_in) @ rotation + self.centre_out

    def bev_mm(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(z, v) of frame coordinates in mm: the beam's-eye view."""
        return frame[:, 0] * self.dz * self.step_z, frame[:, 2] * self.dxy * self.step


def _profile(x_mm: np.ndarray, centres_mm: np.ndarray, width: float, sigma: float
             ) -> np.ndarray:
    """Lateral profile of a bixel of ``width`` centred at ``centres_mm`` at ``x_mm``."""
    s = math.sqrt(2.0) * sigma
    d = x_mm - centres_mm
    return 0.5 * (erf((d + width / 2) / s) - erf((d - width / 2) / s))


def _sample(structures: list[OptimizationStructure], body: np.ndarray,
            settings: QuickPlanSettings) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Voxel indices (flat) for the optimisation and, per structure, (structure, start, count)
    into them; overlapping voxels go to the lowest overlap priority."""
    owner = np.full(body.size, -1, np.int32)
    for i, s in sorted(enumerate(structures), key=lambda p: -p[1].overlap_priority):
        owner[s.mask.ravel()] = i
    rng = np.random.default_rng(settings.seed)
    n_body = max(int(body.sum()), 1)
    picks, groups, start = [], [], 0
    for i, s in enumerate(structures):
        voxels = np.flatnonzero(owner == i)
        if voxels.size == 0:
            continue
        if s.kind == "target":
            k = settings.target_samples
        else:
            k = max(settings.min_samples, round(settings.samples * voxels.size / n_body))
        if k < voxels.size:
            voxels = np.sort(rng.choice(voxels, k, replace=False))
        picks.append(voxels)
        groups.append((i, start, voxels.size))
        start += voxels.size
    return np.concatenate(picks), groups


def _beams(geo: _Geometry, plan: Plan, aperture: np.ndarray,
           settings: QuickPlanSettings) -> list[_Beam]:
    """Every delivery angle with its depth volume and the bixels over the aperture's
    projection (the grown targets, one bixel of margin)."""
    b = settings.bixel_mm
    pts = np.argwhere(aperture).astype(np.float64)
    beams, column = [], 0
    for gantry, couch in delivery_angles(plan, settings.arc_step_deg):
        if couch != 0.0:
            raise PhysicsError("the quick plan supports coplanar beams only (couch 0)")
        rot = geo.rotation(gantry)
        z, v = geo.bev_mm(geo.to_frame(pts, rot))
        z0, v0 = math.floor(z.min() / b) * b - b, math.floor(v.min() / b) * b - b
        occupied = np.zeros((int((z.max() - z0) // b) + 2, int((v.max() - v0) // b) + 2), bool)
        occupied[((z - z0) // b).astype(int), ((v - v0) // b).astype(int)] = True
        occupied = ndimage.binary_dilation(occupied)
        lookup = np.full(occupied.shape, -1, np.int64)
        iz, iv = np.nonzero(occupied)
        lookup[iz, iv] = np.arange(column, column + iz.size)
        column += iz.size
        beams.append(_Beam(rot, geo.depth_volume(rot), z0 + (iz + 0.5) * b, v0 + (iv + 0.5) * b,
                           lookup, (z0, v0)))
    return beams


def _attenuation(geo: _Geometry, beam: _Beam, frame: np.ndarray, mu: float) -> np.ndarray:
    depth = ndimage.map_coordinates(beam.depth_mm, frame.T, order=1, mode="nearest")
    return np.exp(-mu * depth).astype(np.float32)


def _influence(geo: _Geometry, beams: list[_Beam], zyx: np.ndarray,
               settings: QuickPlanSettings) -> sparse.csr_matrix:
    """Sparse dose-influence matrix (voxels x bixels) of the sampled voxels, Gy per unit
    weight: each voxel sees the bixels within ``reach`` of its beam's-eye position in every beam."""
    b, sigma, reach = settings.bixel_mm, settings.sigma_mm, settings.reach
    rows, cols, vals = [], [], []
    index = np.arange(len(zyx))
    for beam in beams:
        frame = geo.to_frame(zyx, beam.rotation)
        att = _attenuation(geo, beam, frame, settings.mu_per_mm)
        z, v = geo.bev_mm(frame)
        cz = np.floor((z - beam.origin_mm[0]) / b).astype(np.int64)
        cv = np.floor((v - beam.origin_mm[1]) / b).astype(np.int64)
        n_bz, n_bv = beam.lookup.shape
        for dz in range(-reach, reach + 1):
            jz = cz + dz
            pz = _profile(z, beam.origin_mm[0] + (jz + 0.5) * b, b, sigma)
            for dv in range(-reach, reach + 1):
                jv = cv + dv
                ok = (jz >= 0) & (jz < n_bz) & (jv >= 0) & (jv < n_bv)
                col = np.full(len(zyx), -1, np.int64)
                col[ok] = beam.lookup[jz[ok], jv[ok]]
                ok &= col >= 0
                pv = _profile(v[ok], beam.origin_mm[1] + (jv[ok] + 0.5) * b, b, sigma)
                rows.append(index[ok])
                cols.append(col[ok])
                vals.append((att[ok] * pz[ok] * pv).astype(np.float32))
    n_cols = sum(int((beam.lookup >= 0).sum()) for beam in beams)
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(len(zyx), n_cols))


def _objective(influence: sparse.csr_matrix, terms: list[tuple[int, int, str, float, float]]):
    """f(w), grad f(w) of the weighted objectives over the sampled voxels."""
    transpose = influence.T.tocsr()

    def f_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        dose = influence @ w
        grad = np.zeros_like(dose)
        f = 0.0
        for start, n, kind, ref, priority in terms:
            seg = dose[start:start + n]
            if kind == "mean_dose":
                m = float(seg.mean()) - ref
                f += priority * m * m
                grad[start:start + n] += priority * 2.0 * m / n
                continue
            r = seg - ref
            if kind == "squared_overdosing":
                r = np.maximum(r, 0.0)
            elif kind == "squared_underdosing":
                r = np.minimum(r, 0.0)
            elif kind != "squared_deviation":
                raise PhysicsError(f"objective {kind!r} is not supported by the quick plan")
            f += priority * float(r @ r) / n
            grad[start:start + n] += priority * 2.0 * r / n
        return f, transpose @ grad

    return f_and_grad


@dataclass(frozen=True)
class QuickPlan:
    """An optimised quick plan: its beams, bixel weights and the factor that normalises it."""

    geometry: _Geometry
    beams: tuple[_Beam, ...]
    weights: np.ndarray
    settings: QuickPlanSettings
    scale: float = 1.0

    def dose_at(self, zyx: np.ndarray) -> np.ndarray:
        """Dose (Gy, float32) at points ``(N, 3)`` inside the body, in the case grid's
        (fractional) index space ``(z, y, x)`` (the model has no air: a point outside the body
        gets the dose of the depth its ray has reached there)."""
        return _full_dose(self.geometry, self.beams, np.asarray(zyx, np.float64), self.weights,
                          self.settings) * np.float32(self.scale)


def optimise_quick_plan(case: Case, plan: Plan | None = None,
                        settings: QuickPlanSettings = QuickPlanSettings()) -> QuickPlan:
    """The quick plan of ``plan`` (default: the case's own) for ``case``, optimised under the
    physics objectives and normalised so that the highest-dose target's D95 (over up to
    ``settings.target_samples`` of its voxels) is its prescription.

    Raises:
        PhysicsError: no plan or beams, no target with a prescription, non-square pixels or a
            non-zero couch angle.
    """
    plan = plan if plan is not None else case.plan
    if plan is None or not plan.beams:
        raise PhysicsError(f"case {case.name!r} has no plan with beams to optimise")
    body = body_mask(case)
    physics = PhysicsSettings(bixel_width_mm=settings.bixel_mm,
                              arc_step_deg=settings.arc_step_deg)
    structures = optimization_structures(case, plan, physics)
    targets = target_prescriptions(case, plan)
    geo = _Geometry(case, body, settings.depth_grid_mm)
    aperture = np.any([s.mask for s in structures if s.kind == "target"], axis=0)
    beams = tuple(_beams(geo, plan, aperture, settings))

    flat, groups = _sample(structures, body, settings)
    zyx = np.stack(np.unravel_index(flat, body.shape), axis=1).astype(np.float64)
    influence = _influence(geo, list(beams), zyx, settings).astype(np.float64)
    terms = [(start, n, o.kind, o.dose_gy, o.priority)
             for i, start, n in groups for o in structures[i].objectives]
    in_target = np.zeros(len(flat), bool)
    for i, start, n in groups:
        in_target[start:start + n] = structures[i].kind == "target"
    w0 = np.ones(influence.shape[1])
    w0 *= targets[0][1] / max(float((influence @ w0)[in_target].mean()), 1e-6)
    result = optimize.minimize(_objective(influence, terms), w0, jac=True, method="L-BFGS-B",
                               bounds=[(0.0, None)] * len(w0),
                               options={"maxiter": settings.max_iter})
    plan_ = QuickPlan(geo, beams, result.x, settings)

    top, rx = targets[0]
    voxels = np.flatnonzero(top.mask)
    if voxels.size > settings.target_samples:
        voxels = np.random.default_rng(settings.seed).choice(voxels, settings.target_samples,
                                                             replace=False)
    d95 = float(np.percentile(plan_.dose_at(np.stack(np.unravel_index(voxels, body.shape),
                                                     axis=1)), 5.0))
    if not d95 > 0:
        raise PhysicsError("the quick plan gives the target no dose (are the beams aimed at it?)")
    return QuickPlan(geo, beams, result.x, settings, scale=rx / d95)


def quick_plan_dose(case: Case, plan: Plan | None = None,
                    settings: QuickPlanSettings = QuickPlanSettings()) -> np.ndarray:
    """The quick plan's dose (Gy, float32) on the case's whole grid; 0 outside the body."""
    quick = optimise_quick_plan(case, plan, settings)
    body = body_mask(case)
    dose = np.zeros(body.shape, np.float32)
    dose[body] = quick.dose_at(np.argwhere(body))
    return dose


def _full_dose(geo: _Geometry, beams: list[_Beam], zyx: np.ndarray, weights: np.ndarray,
               settings: QuickPlanSettings) -> np.ndarray:
    """Dose at every voxel of ``zyx``: per beam, the fluence (bixel weights blurred by the
    profile) on a 1 mm beam's-eye grid, read at each voxel, times its attenuation."""
    b, sigma = settings.bixel_mm, settings.sigma_mm
    total = np.zeros(len(zyx), np.float32)
    for beam in beams:
        grid_w = np.zeros(beam.lookup.shape)
        has = beam.lookup >= 0
        grid_w[has] = weights[beam.lookup[has]]
        frame = geo.to_frame(zyx, beam.rotation)
        z, v = geo.bev_mm(frame)
        n_bz, n_bv = beam.lookup.shape
        fz = np.arange(beam.origin_mm[0] - 3 * b, beam.origin_mm[0] + (n_bz + 3) * b, 1.0)
        fv = np.arange(beam.origin_mm[1] - 3 * b, beam.origin_mm[1] + (n_bv + 3) * b, 1.0)
        pz = _profile(fz[:, None], beam.origin_mm[0] + (np.arange(n_bz) + 0.5) * b, b, sigma)
        pv = _profile(fv[:, None], beam.origin_mm[1] + (np.arange(n_bv) + 0.5) * b, b, sigma)
        fluence = pz @ grid_w @ pv.T
        value = ndimage.map_coordinates(fluence, np.stack([z - fz[0], v - fv[0]]), order=1,
                                        mode="constant")
        total += value.astype(np.float32) * _attenuation(geo, beam, frame, settings.mu_per_mm)
    return total
