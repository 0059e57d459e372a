"""A fast, approximate optimised plan: the physics objectives on the physics' own pencil beam.

What the dose model misses when a beam moves is mostly the optimiser's response: the fluence
each beam gets so that the targets are covered and the organs spared from *those* directions.
No geometric beam input carries it (issue 15: the GDP-HMM beam plate and a depth-dose
projection both change with a correlation of about 0.24 to the physics change). This module
makes a plan the way :mod:`engine.physics.dose_calc` asks pyRadPlan to, with the same objectives
(:func:`engine.physics.dose_calc.optimization_structures`) and the same pencil-beam kernel
(:mod:`engine.physics.photon_kernel`), cut short enough to optimise in a fraction of a second in
numpy:

- each beam angle is split into square bixels of ``bixel_mm`` in its isocentre plane, centred
  on multiples of ``bixel_mm`` from the isocentre (as pyRadPlan places them), over the targets'
  projection from the source;
- a bixel's dose at a voxel is pyRadPlan's: the inverse square of the voxel's distance from the
  source times the sum over the kernel's three components of the depth factor at the voxel's
  radiological depth and the bixel's lateral response at the voxel's offset projected onto the
  isocentre plane. Two cuts: the radiological depth is traced along parallel rays (measured
  from where the ray enters the body through the CT, relative electron density
  ``(HU + 1000) / 1000``), and a voxel gets dose from the bixels within ``reach`` of the one
  over it only (the rest of the 50 mm kernel, about a sixth of a broad field's dose at 10 cm
  depth, is left out: on the held-out beam set, adding it back changed the correlation of the
  quick plan's dose change with physics by under 0.01);
- the fluence is optimised (L-BFGS on the square roots of the weights, so weights >= 0) on a
  random sample of the structures' voxels, each objective a mean over its structure's sampled
  voxels (pyRadPlan's convention; overlapping voxels belong to the structure of the lowest
  overlap priority), then the whole dose is evaluated and normalised so that the highest-dose
  target's D95 is its prescription, as the physics plans are.

Coordinates: everything works in the case grid's index space (z, y, x) with square in-plane
pixels; a beam's frame is (z, u, v) with u along the beam's travel and v across it, in voxel
units; its isocentre plane's coordinates are (z, v) in mm from the isocentre. Coplanar beams
only (couch 0). Units: mm, degrees, Gy.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage, optimize, sparse
from torch.nn import functional

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
from engine.physics.photon_kernel import bixel_response, depth_factors, photon_kernel

# the dose model this module computes; a dose refiner records the one it was fitted on
# (engine.models.dose_refiner.RefinerConfig.quick_plan_model). Change it with the dose model.
DOSE_MODEL = "pyradplan-svd-pencil-beam-6mv"


@dataclass(frozen=True)
class QuickPlanSettings:
    """Dose model and optimiser settings (lengths in mm, angles in degrees).

    Attributes:
        bixel_mm: bixel size in the isocentre plane (the physics plans use 7 mm).
        arc_step_deg: arcs are delivered as static beams every this many degrees, as the
            physics plans are.
        samples: about this many voxels (outside the targets) take part in the optimisation;
            targets add up to ``target_samples`` of their own.
        target_samples: at most this many target voxels per target.
        min_samples: every structure keeps at least this many voxels (or all it has).
        max_iter: the optimiser's iteration cap. The defaults are what fits a preview: on the
            held-out beam set the quick plan's own dose change correlates 0.63 with physics;
            12,000 / 4,000 samples 0.66 and, with 100 iterations, 0.67, at 1.3x and 1.8x a
            moved beam's time (``python -m benchmarks.quick_plan_settings``).
        depth_grid_mm: the radiological depth is computed on the grid thinned to about this
            voxel size (it varies slowly; the lateral profile keeps the full resolution).
        reach: a voxel sees the bixels up to this many bixels away from the one over it in
            the isocentre plane (1: a 3 x 3 neighbourhood).
        seed: the voxel sample's random seed.
    """

    bixel_mm: float = 7.0
    arc_step_deg: float = 20.0
    samples: int = 6000
    target_samples: int = 2000
    min_samples: int = 300
    max_iter: int = 50
    depth_grid_mm: float = 8.0
    reach: int = 1
    seed: int = 0


@dataclass(frozen=True)
class _Beam:
    """One delivery angle: index -> frame rotation, its depth volume and its bixels."""

    rotation: np.ndarray     # (3, 3): frame (z, u, v) = rotation.T @ (index - centre_in) + centre
    depth_mm: np.ndarray     # radiological depth on the thinned frame grid
    isocentre: np.ndarray    # the isocentre's frame coordinates
    lookup: np.ndarray       # (n_bz, n_bv) bixel grid -> column index (-1: no bixel)
    origin_mm: tuple[float, float]   # (z, v) of the bixel grid's corner in the isocentre plane


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
        self.frame_mm = np.array([self.dz * self.step_z, self.dxy * self.step,
                                  self.dxy * self.step])
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
        """Radiological depth (mm) at each thinned-frame voxel's centre, from the body's edge.

        The density is rotated slice by slice with torch's bilinear ``grid_sample`` (zeros
        outside): the values of ``scipy.ndimage.affine_transform(order=1)`` to 2e-5, 5-10x
        faster on one core, which is the difference between a preview and a wait."""
        offset = self.centre_in - rotation @ self.centre_out
        n_z, n_y, n_x = self.density.shape
        u, v = np.meshgrid(np.arange(self.side, dtype=np.float64),
                           np.arange(self.side, dtype=np.float64), indexing="ij")
        y = rotation[1, 1] * u + rotation[1, 2] * v + offset[1]
        x = rotation[2, 1] * u + rotation[2, 2] * v + offset[2]
        grid = np.stack([2.0 * x / max(n_x - 1, 1) - 1.0, 2.0 * y / max(n_y - 1, 1) - 1.0],
                        axis=-1).astype(np.float32)
        dens = functional.grid_sample(
            torch.from_numpy(self.density)[:, None],
            torch.from_numpy(grid)[None].expand(n_z, -1, -1, -1),
            mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0].numpy()
        pixel = self.dxy * self.step
        return (np.cumsum(dens, axis=1) - 0.5 * dens) * np.float32(pixel)

    def to_frame(self, zyx: np.ndarray, rotation: np.ndarray) -> np.ndarray:
        """Full-resolution index coordinates (N, 3) -> thinned frame coordinates (N, 3)."""
        thinned = zyx / np.array([self.step_z, self.step, self.step], dtype=np.float64)
        return (thinned - self.centre_in) @ rotation + self.centre_out

    def isocentre_plane(self, frame: np.ndarray, isocentre: np.ndarray, sad_mm: float
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frame coordinates -> (z, v) mm in the isocentre plane, projected from the source
        ``sad_mm`` before the isocentre, and the inverse-square factor ``(SAD / r)^2``."""
        rel = (frame - isocentre) * self.frame_mm
        from_source = sad_mm + rel[:, 1]
        scale = sad_mm / from_source
        inverse_square = sad_mm ** 2 / (from_source ** 2 + rel[:, 0] ** 2 + rel[:, 2] ** 2)
        return rel[:, 0] * scale, rel[:, 2] * scale, inverse_square


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


def _angle_beam(geo: _Geometry, gantry: float, aperture_zyx: np.ndarray,
                isocentre_zyx: np.ndarray, settings: QuickPlanSettings) -> _Beam:
    """One delivery angle: its depth volume and the bixels over the aperture's projection (the
    grown targets, one bixel of margin), numbered from 0."""
    b = settings.bixel_mm
    rot = geo.rotation(gantry)
    isocentre = geo.to_frame(isocentre_zyx[None], rot)[0]
    z, v, _ = geo.isocentre_plane(geo.to_frame(aperture_zyx, rot), isocentre,
                                  photon_kernel().sad_mm)
    z0 = (math.floor(z.min() / b + 0.5) - 1.5) * b
    v0 = (math.floor(v.min() / b + 0.5) - 1.5) * b
    occupied = np.zeros((int((z.max() - z0) // b) + 2, int((v.max() - v0) // b) + 2), bool)
    occupied[((z - z0) // b).astype(int), ((v - v0) // b).astype(int)] = True
    occupied = ndimage.binary_dilation(occupied)
    lookup = np.full(occupied.shape, -1, np.int64)
    iz, iv = np.nonzero(occupied)
    lookup[iz, iv] = np.arange(iz.size)
    return _Beam(rot, geo.depth_volume(rot), isocentre, lookup, (z0, v0))


def _influence_block(geo: _Geometry, beam: _Beam, zyx: np.ndarray, settings: QuickPlanSettings
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One beam's dose per unit bixel weight at the points ``zyx``, as ``(columns, values)``
    of shape ``(N, (2 reach + 1)^2)``: point ``n`` gets ``values[n, k]`` Gy per unit weight of
    the beam's bixel ``columns[n, k]`` (0 with value 0 where there is none). Each point sees the
    bixels within ``reach`` of the one over it in the isocentre plane."""
    b, reach = settings.bixel_mm, settings.reach
    kernel = photon_kernel()
    response = bixel_response(b)
    frame = geo.to_frame(zyx, beam.rotation)
    z, v, inverse_square = geo.isocentre_plane(frame, beam.isocentre, kernel.sad_mm)
    depth = ndimage.map_coordinates(beam.depth_mm, frame.T, order=1, mode="nearest")
    factors = depth_factors(kernel, depth) * inverse_square.astype(np.float32)[:, None]
    cz = np.floor((z - beam.origin_mm[0]) / b).astype(np.int64)
    cv = np.floor((v - beam.origin_mm[1]) / b).astype(np.int64)
    n_bz, n_bv = beam.lookup.shape
    width = 2 * reach + 1
    cols = np.zeros((len(zyx), width * width), np.int64)
    vals = np.zeros((len(zyx), width * width), np.float32)
    for k, (dz, dv) in enumerate(np.ndindex(width, width)):
        jz, jv = cz + dz - reach, cv + dv - reach
        ok = (jz >= 0) & (jz < n_bz) & (jv >= 0) & (jv < n_bv)
        col = np.full(len(zyx), -1, np.int64)
        col[ok] = beam.lookup[jz[ok], jv[ok]]
        ok &= col >= 0
        cols[ok, k] = col[ok]
        lateral = response.at(z[ok] - (beam.origin_mm[0] + (jz[ok] + 0.5) * b),
                              v[ok] - (beam.origin_mm[1] + (jv[ok] + 0.5) * b))
        vals[ok, k] = np.einsum("nc,nc->n", factors[ok], lateral)
    return cols, vals


def _sparse(cols: np.ndarray, vals: np.ndarray, n_bixels: int) -> sparse.csr_matrix:
    """An influence block (:func:`_influence_block`) as a sparse ``(N, n_bixels)`` matrix."""
    n, k = cols.shape
    return sparse.csr_matrix((vals.ravel(), cols.ravel(), np.arange(0, n * k + 1, k)),
                             shape=(n, n_bixels))


def _objective(influence: sparse.csr_matrix, terms: list[tuple[int, int, str, float, float]]):
    """f(w), grad f(w) of the weighted objectives over the sampled voxels (the dose and its
    gradient in the influence's float32; the optimiser gets float64)."""
    transpose = influence.T.tocsr()

    def f_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        dose = influence @ w.astype(influence.dtype)
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
        return f, (transpose @ grad).astype(np.float64)

    return f_and_grad


def _solve(f_and_grad, w0: np.ndarray, max_iter: int) -> np.ndarray:
    """Non-negative weights minimising ``f_and_grad`` from ``w0``: L-BFGS on ``x`` with
    ``w = x ** 2``. Unbounded, scipy's L-BFGS-B skips its per-variable Python loop over the
    bounds and the Cauchy point's breakpoints, ~30 ms of a moved beam's quick plan."""
    def squared(x: np.ndarray) -> tuple[float, np.ndarray]:
        f, grad = f_and_grad(x * x)
        return f, 2.0 * x * grad

    result = optimize.minimize(squared, np.sqrt(w0.astype(np.float64)), jac=True,
                               method="L-BFGS-B", options={"maxiter": max_iter})
    return result.x * result.x


@dataclass(frozen=True)
class _Problem:
    """What the quick plans of one case share (for one prescription and isocentre): the grid
    geometry, the targets' voxels that bixels cover, the sampled voxels with their objective
    terms, and the highest-dose target's voxels the normalisation reads."""

    geo: _Geometry
    isocentre_zyx: np.ndarray
    aperture_zyx: np.ndarray
    samples_zyx: np.ndarray
    terms: tuple[tuple[int, int, str, float, float], ...]
    in_target: np.ndarray
    top_zyx: np.ndarray
    rx_gy: float


@dataclass
class _Angle:
    """One gantry angle of a problem: its beam, its influence on the sampled voxels and, per
    named point set, its influence on the set's points (:func:`_influence_block`)."""

    beam: _Beam
    block: tuple[np.ndarray, np.ndarray]
    points: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def influence(self, geo: _Geometry, zyx: np.ndarray, key: str | None,
                  settings: QuickPlanSettings) -> tuple[np.ndarray, np.ndarray]:
        if key is not None and key in self.points:
            return self.points[key]
        out = _influence_block(geo, self.beam, zyx, settings)
        if key is not None:
            self.points[key] = out
        return out


@dataclass(frozen=True)
class QuickPlan:
    """An optimised quick plan: per delivery angle its bixel weights, and the factor that
    normalises it."""

    problem: _Problem
    angles: tuple[_Angle, ...]
    weights: tuple[np.ndarray, ...]
    settings: QuickPlanSettings
    scale: float = 1.0

    def dose_at(self, zyx: np.ndarray, key: str | None = None) -> np.ndarray:
        """Dose (Gy, float32) at points ``(N, 3)`` inside the body, in the case grid's
        (fractional) index space ``(z, y, x)`` (the model has no air: a point outside the body
        gets the dose of the depth its ray has reached there). ``key`` names a point set that
        is asked for again (e.g. a refiner's voxels): its per-angle influence is then kept."""
        zyx = np.asarray(zyx, np.float64)
        total = np.zeros(len(zyx), np.float32)
        for angle, weights in zip(self.angles, self.weights):
            cols, vals = angle.influence(self.problem.geo, zyx, key, self.settings)
            total += np.einsum("nk,nk->n", vals, weights.astype(np.float32)[cols])
        return total * np.float32(self.scale)


class QuickPlanner:
    """Quick plans of one case. What depends on the case alone (objectives, voxel sample,
    geometry) is built once; what depends on one gantry angle (depth volume, bixels, influence)
    once per angle and kept for ``max_angles`` angles, so that moving one beam recomputes one
    angle and the optimisation. The result equals :func:`optimise_quick_plan`'s. An angle with
    a named point set's influence kept (a refiner's 44,000 voxels: 3 MB) is the bulk of the
    memory ``max_angles`` bounds."""

    def __init__(self, case: Case, settings: QuickPlanSettings = QuickPlanSettings(),
                 max_angles: int = 48) -> None:
        self.case, self.settings, self.max_angles = case, settings, max_angles
        self._problems: dict[tuple, _Problem] = {}
        self._angles: OrderedDict[tuple, _Angle] = OrderedDict()

    @staticmethod
    def _key(plan: Plan) -> tuple:
        return plan.prescription_gy, tuple(round(c, 3) for c in plan.isocenter_mm)

    def _problem(self, plan: Plan) -> _Problem:
        key = self._key(plan)
        if key not in self._problems:
            case, settings = self.case, self.settings
            body = body_mask(case)
            physics = PhysicsSettings(bixel_width_mm=settings.bixel_mm,
                                      arc_step_deg=settings.arc_step_deg)
            structures = optimization_structures(case, plan, physics)
            top, rx = target_prescriptions(case, plan)[0]
            aperture = np.any([s.mask for s in structures if s.kind == "target"], axis=0)
            flat, groups = _sample(structures, body, settings)
            in_target = np.zeros(len(flat), bool)
            for i, start, n in groups:
                in_target[start:start + n] = structures[i].kind == "target"
            voxels = np.flatnonzero(top.mask)
            if voxels.size > settings.target_samples:
                voxels = np.random.default_rng(settings.seed).choice(
                    voxels, settings.target_samples, replace=False)
            self._problems[key] = _Problem(
                geo=_Geometry(case, body, settings.depth_grid_mm),
                isocentre_zyx=case.geometry.lps_to_index(np.asarray(plan.isocenter_mm)),
                aperture_zyx=np.argwhere(aperture).astype(np.float64),
                samples_zyx=np.stack(np.unravel_index(flat, body.shape), axis=1).astype(
                    np.float64),
                terms=tuple((start, n, o.kind, o.dose_gy, o.priority)
                            for i, start, n in groups for o in structures[i].objectives),
                in_target=in_target,
                top_zyx=np.stack(np.unravel_index(voxels, body.shape), axis=1).astype(
                    np.float64),
                rx_gy=rx)
        return self._problems[key]

    def _angle(self, plan: Plan, problem: _Problem, gantry: float) -> _Angle:
        key = (*self._key(plan), round(gantry, 6))
        angle = self._angles.get(key)
        if angle is None:
            beam = _angle_beam(problem.geo, gantry, problem.aperture_zyx, problem.isocentre_zyx,
                               self.settings)
            angle = _Angle(beam, _influence_block(problem.geo, beam, problem.samples_zyx,
                                                  self.settings))
            self._angles[key] = angle
            while len(self._angles) > self.max_angles:
                self._angles.popitem(last=False)
        self._angles.move_to_end(key)
        return angle

    def optimise(self, plan: Plan | None = None) -> QuickPlan:
        """The quick plan of ``plan`` (default: the case's own), optimised under the physics
        objectives and normalised so that the highest-dose target's D95 (over up to
        ``settings.target_samples`` of its voxels) is its prescription.

        Raises:
            PhysicsError: no plan or beams, no target with a prescription, non-square pixels
                or a non-zero couch angle.
        """
        plan = plan if plan is not None else self.case.plan
        if plan is None or not plan.beams:
            raise PhysicsError(f"case {self.case.name!r} has no plan with beams to optimise")
        delivered = delivery_angles(plan, self.settings.arc_step_deg)
        if any(couch != 0.0 for _, couch in delivered):
            raise PhysicsError("the quick plan supports coplanar beams only (couch 0)")
        problem = self._problem(plan)
        angles = tuple(self._angle(plan, problem, gantry) for gantry, _ in delivered)
        sizes = [int((a.beam.lookup >= 0).sum()) for a in angles]
        offsets = np.cumsum([0] + sizes)
        influence = sparse.hstack([_sparse(*a.block, size) for a, size in zip(angles, sizes)],
                                  format="csr")
        influence.eliminate_zeros()
        w0 = np.ones(influence.shape[1], np.float32)
        w0 *= problem.rx_gy / max(float((influence @ w0)[problem.in_target].mean()), 1e-6)
        w = _solve(_objective(influence, list(problem.terms)), w0, self.settings.max_iter)
        weights = tuple(w[a:b] for a, b in zip(offsets[:-1], offsets[1:]))
        unscaled = QuickPlan(problem, angles, weights, self.settings)
        d95 = float(np.percentile(unscaled.dose_at(problem.top_zyx, "__top__"), 5.0))
        if not d95 > 0:
            raise PhysicsError("the quick plan gives the target no dose (are the beams aimed "
                               "at it?)")
        return QuickPlan(problem, angles, weights, self.settings, scale=problem.rx_gy / d95)


def optimise_quick_plan(case: Case, plan: Plan | None = None,
                        settings: QuickPlanSettings = QuickPlanSettings()) -> QuickPlan:
    """:meth:`QuickPlanner.optimise` of a planner made for this one plan."""
    return QuickPlanner(case, settings).optimise(plan)


def quick_plan_dose(case: Case, plan: Plan | None = None,
                    settings: QuickPlanSettings = QuickPlanSettings()) -> np.ndarray:
    """The quick plan's dose (Gy, float32) on the case's whole grid; 0 outside the body."""
    quick = optimise_quick_plan(case, plan, settings)
    body = body_mask(case)
    dose = np.zeros(body.shape, np.float32)
    dose[body] = quick.dose_at(np.argwhere(body))
    return dose
