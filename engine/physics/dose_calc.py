"""Physics reference dose: Case + plan -> optimised photon dose on the CT grid (Gy).

The engine is **pyRadPlan** (the Python port of matRad): a 6 MV photon SVD pencil beam with the
bundled ``photons_Generic`` machine data, and pyRadPlan's fluence optimisation (SciPy L-BFGS-B).
For a plan we

1. list the delivery angles: each static beam, and each arc sampled every ``arc_step_deg`` along
   its path (midpoints of equal segments, the usual static-beam approximation of an arc);
2. build the optimisation problem from the case, the objectives a head-and-neck planner uses
   (objectives version :data:`OBJECTIVES_VERSION`): per target coverage (underdose below its
   prescription) and a squared deviation to it, for the primary target also an overdose above
   103 %, and a hot-spot limit, optimised on the target grown by ``target_margin_mm`` (kept that
   far from the spinal cord and brainstem) so that the coarse dose grid covers its edge; per
   organ at risk overdose / mean-dose objectives scaled to the highest prescription, hard
   maxima on the serial organs and their 5 mm planning volumes; overdose and hot-spot objectives
   on a 15 mm ring around the targets and on the rest of the body (conformity). Overlaps go to
   the higher prescription, then targets before organs at risk, then the ring, as in matRad;
3. compute the dose-influence matrix on a ``dose_grid_mm`` grid, optimise the fluence, compute the
   dose on the CT grid (zero outside the body, like a clinical dose), and normalise it like a
   clinical plan: D95 of the primary (highest prescription) target = its prescription.

Isolation. pyRadPlan pins ``numpy<2.4``, breaks with ``pydantic>=2.13`` and pulls a large
dependency tree (pydantic-ai and its API clients), all at odds with the core environment. It
therefore lives in its own virtual environment (``.venv-physics`` at the repository root, made
by ``make physics-env`` / ``installer/physics-env.sh``) and runs in a **subprocess**
(``engine/physics/worker.py``). The two sides exchange plain files in a temporary directory:
a JSON request and an ``.npz`` of arrays written and read without pickle; nothing is ever
unpickled. The interpreter is ``$DOSEPILOT_PHYSICS_PYTHON`` or the default venv path. A
subprocess also keeps a long calculation from blocking the caller (the GUI's "verify with
physics" runs it in the background and may cancel it).

Conventions: LPS mm, arrays ``[z, y, x]`` with their :class:`~engine.case.Geometry`, dose in Gy,
IEC 61217 gantry angles in degrees. Grids must be axis aligned (any axis order or sign).
Patient positions HFS/FFS/HFP/FFP are mapped to the HFS-equivalent gantry angle.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from engine.case import (
    Case,
    Geometry,
    PatientPosition,
    Plan,
    Structure,
    Technique,
    Volume,
)
from engine.dose_grid import DoseGrid

PHYSICS_PYTHON_ENV = "DOSEPILOT_PHYSICS_PYTHON"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PHYSICS_PYTHON = REPO_ROOT / ".venv-physics" / "bin" / "python"
WORKER = Path(__file__).with_name("worker.py")

#: Version of the objectives below, recorded with every generated plan: bump it when they change
#: (1: the first 200 plans; 2: coverage, hot-spot limits, hard serial-organ limits and PRVs,
#: target margin kept away from serial organs, lower-dose targets held gently).
OBJECTIVES_VERSION = 2
#: Organ-at-risk objectives by name keyword: (kind, dose as a fraction of the highest
#: prescription, priority). The fractions are common head-and-neck limits for a 70 Gy
#: prescription: spinal cord max 45 Gy (objectives at 42 Gy and, hard, 45.5 Gy), brainstem max
#: 54 Gy (45.5 and, hard, 52.5 Gy), parotid mean < 26 Gy (0.35), larynx / oesophagus mean
#: < 45 Gy (0.55), mandible max 70 Gy (1.0); every OAR also has a mean-dose objective towards
#: 0 Gy (as low as reasonably achievable). pyRadPlan's objectives are means over a structure's
#: voxels, so a limit on the hottest few voxels needs a high priority to be felt: the "hard"
#: serial-organ limits and :data:`HOT_SPOT_OBJECTIVE` are weighted accordingly.
_ALARA = ("mean_dose", 0.0, 10.0)
OAR_OBJECTIVES: tuple[tuple[tuple[str, ...], tuple[tuple[str, float, float], ...]], ...] = (
    (("cord",), (("squared_overdosing", 0.60, 300.0), ("squared_overdosing", 0.65, 3000.0),
                 _ALARA)),
    (("brainstem", "brain_stem", "brain stem"), (("squared_overdosing", 0.65, 300.0),
                                                 ("squared_overdosing", 0.75, 3000.0), _ALARA)),
    (("parotid",), (("squared_overdosing", 0.35, 50.0), ("mean_dose", 0.0, 20.0))),
    (("larynx", "esophag", "oesophag"), (("squared_overdosing", 0.55, 50.0),
                                         ("mean_dose", 0.0, 20.0))),
    (("mandible",), (("squared_overdosing", 1.0, 100.0), _ALARA)),
)
#: Organs whose maximum dose is a hard limit (name keywords): the targets' optimisation margin
#: keeps its own width away from them.
SERIAL_OARS = ("cord", "brainstem", "brain_stem", "brain stem")
#: Planning organ-at-risk volume of the serial organs (grown by PRV_MM, outside the targets):
#: max 48 Gy at 70 Gy (the acceptance limit is 50 Gy; the normalisation lifts plans by a few
#: per cent). On a 5 mm dose grid a cord voxel's dose is interpolated from its neighbours too,
#: so a limit on the organ alone left its edge at 55-60 Gy.
PRV_MM = 5.0
PRV_OBJECTIVE: tuple[str, float, float] = ("squared_overdosing", 48.0 / 70.0, 3000.0)
DEFAULT_OAR_OBJECTIVES: tuple[tuple[str, float, float], ...] = (_ALARA,)
TARGET_PRIORITY = 1000.0
#: Coverage: an underdose objective at the prescription, so that the optimised D95 is close to
#: it and the normalisation (D95 = prescription) scales little; the symmetric deviation alone
#: left D95 at about 92 % and the normalisation then lifted the whole plan by 8-9 %, hot spots
#: included.
TARGET_COVERAGE_PRIORITY = 10000.0
#: A lower-dose target (PTV56 beside PTV70) is covered but only gently held at its own
#: prescription: a tight limit there (1.03 x 56 Gy within millimetres of the 70 Gy edge) pulled
#: the primary target's edge down.
SECONDARY_TARGET_PRIORITY = 100.0
TARGET_OVERDOSE_FRACTION = 1.03
#: Homogeneity: no target voxel above 105 % of the highest prescription before the normalisation
#: (clinical D2 <= 107 %); the hottest few voxels of a large target weigh little in a mean over
#: it, hence the priority (at 3,000 a 5-field plan kept a body maximum of 122 %, inside PTV70).
TARGET_HOT_SPOT_OBJECTIVE: tuple[str, float, float] = ("squared_overdosing", 1.05, 30000.0)
#: A hot-spot limit (fraction of the highest prescription) on every organ at risk, the ring and
#: the body: a planner accepts no voxel much above the prescription outside the targets (the
#: plans made without it had a body maximum above 130 % of the prescription in 69 of 200).
HOT_SPOT_OBJECTIVE: tuple[str, float, float] = ("squared_overdosing", 1.05, 3000.0)
#: Conformity: tissue within RING_MM of the targets (outside the grown targets) and the rest of
#: the body get overdose objectives at these fractions of the highest prescription; beyond the
#: ring a dose above BODY_HOT_FRACTION of it is a hot spot.
RING_MM = 15.0
RING_OBJECTIVE: tuple[str, float, float] = ("squared_overdosing", 0.85, 50.0)
BODY_OBJECTIVE: tuple[str, float, float] = ("squared_overdosing", 0.5, 30.0)
BODY_HOT_FRACTION = 0.8


class PhysicsUnavailableError(RuntimeError):
    """The isolated physics environment is missing (run ``make physics-env``)."""


class PhysicsError(RuntimeError):
    """The physics calculation failed (bad input for the engine, or the engine itself)."""


class PhysicsCancelled(RuntimeError):
    """The calculation was cancelled through its ``cancel`` event."""


@dataclass(frozen=True)
class PhysicsSettings:
    """Engine settings (lengths in mm, angles in degrees).

    Attributes:
        dose_grid_mm: isotropic dose-calculation grid; the dose is interpolated onto the CT grid.
        bixel_width_mm: beamlet size in the isocentre plane.
        max_iter: optimiser iteration cap.
        arc_step_deg: arcs are delivered as static beams every this many degrees.
        target_margin_mm: targets are grown by this much for the optimiser (not for the
            normalisation), so that the coarse dose grid still covers their edge; one dose-grid
            voxel by default (3 mm left PTV edges under-dosed: D50 - D95 of PTV70 went from
            6.9 to 4.9 Gy on OpenKBP pt_1 with 5 random beams).
        timeout_s: the calculation is stopped after this long.
        optimize: False gives open fields (every beamlet weight 1) shaped to the grown targets
            instead of an optimised fluence; for commissioning-style checks.
    """

    dose_grid_mm: float = 5.0
    bixel_width_mm: float = 5.0
    max_iter: int = 300
    arc_step_deg: float = 20.0
    target_margin_mm: float = 5.0
    timeout_s: float = 3600.0
    optimize: bool = True

    def __post_init__(self) -> None:
        for name in ("dose_grid_mm", "bixel_width_mm", "arc_step_deg", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_iter < 1 or self.target_margin_mm < 0:
            raise ValueError("max_iter must be >= 1 and target_margin_mm >= 0")


@dataclass(frozen=True)
class Objective:
    """One optimisation objective: ``kind`` in squared_deviation / squared_overdosing /
    squared_underdosing / mean_dose, its dose parameter in Gy and its priority (weight)."""

    kind: str
    dose_gy: float
    priority: float


@dataclass(frozen=True)
class OptimizationStructure:
    """A structure as the optimiser sees it: role, overlap priority (lower wins), objectives."""

    name: str
    kind: str  # "target" | "oar" | "helper" | "external"
    overlap_priority: int
    mask: np.ndarray
    objectives: tuple[Objective, ...]


@dataclass(frozen=True)
class PhysicsResult:
    """An optimised physics dose.

    Attributes:
        dose: dose in Gy on the CT grid, normalised (primary-target D95 = prescription).
        normalization: factor applied to the optimiser's dose.
        primary_target: name of the target the normalisation used.
        delivery_gantry_deg: the HFS-equivalent gantry angles computed (arcs sampled).
        settings: the engine settings used.
        info: engine name/version, timings (s), bixel count, optimiser iterations.
        dose_grid: the same normalised dose on the engine's coarse dose grid, before its
            interpolation onto the CT grid (canonical axes, see :mod:`engine.dose_grid`); not
            masked to the body.
    """

    dose: Volume
    normalization: float
    primary_target: str
    delivery_gantry_deg: tuple[float, ...]
    settings: PhysicsSettings
    info: dict = field(default_factory=dict)
    dose_grid: DoseGrid | None = None


def physics_python() -> Path:
    """The physics environment's interpreter, or :class:`PhysicsUnavailableError` saying how
    to create it."""
    configured = os.environ.get(PHYSICS_PYTHON_ENV)
    path = Path(configured) if configured else DEFAULT_PHYSICS_PYTHON
    if not path.is_file() or not os.access(path, os.X_OK):
        where = f"${PHYSICS_PYTHON_ENV}={configured}" if configured else str(path)
        raise PhysicsUnavailableError(
            f"the physics environment (pyRadPlan) is not installed: no interpreter at {where}; "
            "run `make physics-env` (or installer/physics-env.sh DIR and set "
            f"{PHYSICS_PYTHON_ENV}=DIR/bin/python)")
    return path


# ---------------------------------------------------------------- beams and angles


def hfs_gantry_deg(gantry_deg: float, position: PatientPosition) -> float:
    """The gantry angle that irradiates an HFS patient's LPS frame as ``gantry_deg`` irradiates
    a patient lying in ``position`` (couch 0). Decubitus positions are not supported."""
    position = PatientPosition(position)
    mapping = {
        PatientPosition.HFS: lambda g: g,
        PatientPosition.FFS: lambda g: -g,
        PatientPosition.HFP: lambda g: g + 180.0,
        PatientPosition.FFP: lambda g: 180.0 - g,
    }
    if position not in mapping:
        raise PhysicsError(f"patient position {position.value} is not supported by the physics "
                           "engine (HFS, FFS, HFP and FFP are)")
    return mapping[position](float(gantry_deg)) % 360.0


def arc_sample_angles(control_points_deg: Sequence[float], step_deg: float) -> tuple[float, ...]:
    """Static-beam angles approximating an arc: midpoints of equal segments of at most
    ``step_deg`` along the arc, which turns one way through its control points (delivery
    order; each step between consecutive control points taken the short way round)."""
    cps = np.asarray(control_points_deg, dtype=np.float64)
    steps = (np.diff(cps) + 180.0) % 360.0 - 180.0
    if (steps > 0).any() and (steps < 0).any():
        raise PhysicsError(f"arc control points {tuple(cps)} do not turn one way")
    span = float(steps.sum())
    if span == 0.0:
        return (float(cps[0] % 360.0),)
    n = max(1, math.ceil(abs(span) / step_deg - 1e-9))
    return tuple(float((cps[0] + (k + 0.5) * span / n) % 360.0) for k in range(n))


def delivery_angles(plan: Plan, arc_step_deg: float) -> tuple[tuple[float, float], ...]:
    """Distinct (gantry, couch) pairs in degrees, HFS-equivalent, that the plan delivers from."""
    if not plan.beams:
        raise PhysicsError(f"plan {plan.name!r} has no beams")
    out: list[tuple[float, float]] = []
    for beam in plan.beams:
        if beam.couch_deg % 360.0 != 0.0 and plan.patient_position is not PatientPosition.HFS:
            raise PhysicsError("non-zero couch angles are only supported for HFS patients")
        if beam.technique is Technique.ARC:
            gantries = arc_sample_angles(beam.control_point_gantry_deg, arc_step_deg)
        else:
            gantries = (beam.gantry_deg,)
        for g in gantries:
            pair = (round(hfs_gantry_deg(g, plan.patient_position), 3) % 360.0,
                    round(beam.couch_deg % 360.0, 3))
            if pair not in out:
                out.append(pair)
    return tuple(out)


def _check_isocenter(plan: Plan) -> tuple[float, float, float]:
    iso = plan.beams[0].isocenter_mm
    for beam in plan.beams[1:]:
        if not np.allclose(beam.isocenter_mm, iso, atol=0.5):
            raise PhysicsError("the physics engine needs one isocentre for all beams; beam "
                               f"{beam.name!r} is at {beam.isocenter_mm} mm, not {iso} mm")
    return iso


# ---------------------------------------------------------------- grid orientation


def _canonical_axes(geometry: Geometry) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How to transpose + flip a ``[z, y, x]`` array so its axes run along +z, +y, +x (LPS)."""
    d = np.asarray(geometry.direction)
    lps_axis = np.argmax(np.abs(d), axis=1)
    if not np.allclose(np.abs(d), np.eye(3)[lps_axis], atol=1e-4) or len(set(lps_axis)) != 3:
        raise PhysicsError("the physics engine needs an axis-aligned CT grid (oblique "
                           f"direction cosines {geometry.direction} are not supported)")
    perm = tuple(int(np.flatnonzero(lps_axis == 2 - c)[0]) for c in range(3))
    flips = tuple(bool(d[perm[c], 2 - c] < 0) for c in range(3))
    return perm, flips  # type: ignore[return-value]


def to_canonical(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``array`` on ``geometry`` re-ordered so its axes run along +z, +y, +x (a view)."""
    perm, flips = _canonical_axes(geometry)
    out = np.transpose(array, perm)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=axis)
    return out


def from_canonical(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Inverse of :func:`to_canonical`: back onto ``geometry``'s array order."""
    perm, flips = _canonical_axes(geometry)
    out = array
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=axis)
    return np.transpose(out, np.argsort(perm))


def canonical_grid(geometry: Geometry) -> tuple[tuple[float, float, float],
                                                 tuple[float, float, float]]:
    """(origin LPS mm, spacing (z, y, x) mm) of the canonical re-ordering of ``geometry``."""
    perm, flips = _canonical_axes(geometry)
    corner = [0.0, 0.0, 0.0]
    for c, k in enumerate(perm):
        corner[k] = geometry.shape[k] - 1 if flips[c] else 0
    origin = tuple(float(v) for v in geometry.index_to_lps(corner))
    spacing = tuple(float(geometry.spacing[k]) for k in perm)
    return origin, spacing  # type: ignore[return-value]


# ---------------------------------------------------------------- optimisation problem


def body_mask(case: Case) -> np.ndarray:
    """The external/body structure, or (when the case has none) the largest connected region
    above -500 HU with its interior holes filled slice by slice."""
    external = case.external
    if external is not None and external.mask.any():
        return external.mask
    labels, n = ndimage.label(case.ct.array > -500.0)
    if n == 0:
        raise PhysicsError(f"case {case.name!r} has no body: no structure of role external and "
                           "no CT voxel above -500 HU")
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


def grow_mask(mask: np.ndarray, spacing_mm: Sequence[float], margin_mm: float) -> np.ndarray:
    """``mask`` grown by an isotropic margin in mm (voxel-centre distance <= margin)."""
    if margin_mm <= 0 or not mask.any():
        return mask.copy()
    pad = [int(math.ceil(margin_mm / s)) + 1 for s in spacing_mm]
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    dist = ndimage.distance_transform_edt(~mask[box], sampling=spacing_mm)
    out = np.zeros_like(mask, dtype=bool)
    out[box] = dist <= margin_mm + 1e-6
    return out


def target_prescriptions(case: Case, plan: Plan | None) -> list[tuple[Structure, float]]:
    """Targets with their prescriptions (Gy), highest first. A single target without its own
    prescription takes the plan's."""
    targets = [t for t in case.targets if t.mask.any()]
    if not targets:
        raise PhysicsError(f"case {case.name!r} has no non-empty target structure to optimise")
    out = []
    for t in targets:
        rx = t.prescription_gy
        if rx is None and len(targets) == 1 and plan is not None:
            rx = plan.prescription_gy
        if rx is None or rx <= 0:
            raise PhysicsError(f"target {t.name!r} has no prescription dose; set one to "
                               "optimise a physics plan")
        out.append((t, float(rx)))
    return sorted(out, key=lambda p: -p[1])


def _objectives(specs: Sequence[tuple[str, float, float]], rx_max: float
                ) -> tuple[Objective, ...]:
    return tuple(Objective(kind, frac * rx_max, prio) for kind, frac, prio in specs)


def _oar_objectives(name: str, rx_max: float) -> tuple[Objective, ...]:
    lower = name.lower()
    specs = next((specs for keywords, specs in OAR_OBJECTIVES
                  if any(k in lower for k in keywords)), DEFAULT_OAR_OBJECTIVES)
    return _objectives((*specs, HOT_SPOT_OBJECTIVE), rx_max)


def optimization_structures(case: Case, plan: Plan | None,
                            settings: PhysicsSettings) -> list[OptimizationStructure]:
    """The optimisation problem for ``case``: targets (grown by the margin, inside the body,
    but not to within the margin of a serial organ: the margin is an aid to the coarse dose
    grid, and a margin asking for the prescription 2 mm from a spinal cord left the cord's
    limit unreachable), organs at risk and the body, with objectives and overlap priorities."""
    body = body_mask(case)
    targets = target_prescriptions(case, plan)
    rx_max = targets[0][1]
    serial_organs = np.zeros(body.shape, bool)
    for s in case.oars:
        if any(k in s.name.lower() for k in SERIAL_OARS):
            serial_organs |= s.mask
    serial = grow_mask(serial_organs, case.geometry.spacing, settings.target_margin_mm)
    out = []
    for priority, (t, rx) in enumerate(targets, start=1):
        grown = grow_mask(t.mask, case.geometry.spacing, settings.target_margin_mm) & body & ~serial
        hot_spot = Objective(TARGET_HOT_SPOT_OBJECTIVE[0],
                             TARGET_HOT_SPOT_OBJECTIVE[1] * rx_max, TARGET_HOT_SPOT_OBJECTIVE[2])
        coverage = Objective("squared_underdosing", rx, TARGET_COVERAGE_PRIORITY)
        if priority == 1:
            objectives = (Objective("squared_deviation", rx, TARGET_PRIORITY), coverage,
                          Objective("squared_overdosing", TARGET_OVERDOSE_FRACTION * rx,
                                    TARGET_PRIORITY), hot_spot)
        else:
            objectives = (Objective("squared_deviation", rx, SECONDARY_TARGET_PRIORITY),
                          coverage, hot_spot)
        out.append(OptimizationStructure(t.name, "target", priority, grown | t.mask,
                                         objectives))
    oar_priority = len(targets) + 1
    for s in case.oars:
        if s.mask.any():
            out.append(OptimizationStructure(s.name, "oar", oar_priority, s.mask,
                                              _oar_objectives(s.name, rx_max)))
    union = np.any([t.mask for t, _ in targets], axis=0)
    if serial_organs.any():
        prv = grow_mask(serial_organs, case.geometry.spacing, PRV_MM) & body & ~union
        out.append(OptimizationStructure("SerialPRV", "helper", oar_priority, prv,
                                         _objectives((PRV_OBJECTIVE,), rx_max)))
    ring = grow_mask(union, case.geometry.spacing, RING_MM) & body
    out.append(OptimizationStructure("Ring", "helper", oar_priority + 1, ring,
                                     _objectives((RING_OBJECTIVE, HOT_SPOT_OBJECTIVE), rx_max)))
    body_hot = (HOT_SPOT_OBJECTIVE[0], BODY_HOT_FRACTION, HOT_SPOT_OBJECTIVE[2])
    out.append(OptimizationStructure("Body", "external", oar_priority + 2, body,
                                     _objectives((BODY_OBJECTIVE, body_hot), rx_max)))
    return out


def normalize_to_d95(dose: np.ndarray, target: np.ndarray,
                     prescription_gy: float) -> tuple[np.ndarray, float]:
    """Scale ``dose`` so that D95 of ``target`` (the dose covering 95 % of it) equals the
    prescription; returns (scaled dose, factor)."""
    values = dose[target]
    if values.size == 0:
        raise PhysicsError("cannot normalise: the target is empty")
    d95 = float(np.percentile(values, 5.0))
    if not d95 > 0:
        raise PhysicsError("cannot normalise: the target receives no dose (are the beams aimed "
                           "at it?)")
    factor = prescription_gy / d95
    return (dose * factor).astype(np.float32), factor


# ---------------------------------------------------------------- subprocess


def write_request(job: Path, case: Case, plan: Plan, settings: PhysicsSettings,
                  structures: Sequence[OptimizationStructure],
                  angles: Sequence[tuple[float, float]]) -> None:
    """Write ``request.json`` + ``arrays.npz`` (no pickle) for the worker, canonically oriented."""
    geometry = case.geometry
    origin, spacing = canonical_grid(geometry)
    ct = np.ascontiguousarray(to_canonical(case.ct.array, geometry), dtype=np.float32)
    masks = np.stack([to_canonical(s.mask, geometry) for s in structures]).astype(np.uint8)
    np.savez(job / "arrays.npz", ct_hu=ct, masks=masks)
    request = {
        "grid": {"origin_lps_mm": list(origin), "spacing_zyx_mm": list(spacing)},
        "beams": {"gantry_deg": [a[0] for a in angles], "couch_deg": [a[1] for a in angles],
                  "isocenter_lps_mm": list(_check_isocenter(plan))},
        "settings": asdict(settings),
        "structures": [{"name": s.name, "kind": s.kind, "overlap_priority": s.overlap_priority,
                        "objectives": [{"type": o.kind, "dose_gy": o.dose_gy,
                                        "priority": o.priority} for o in s.objectives]}
                       for s in structures],
    }
    (job / "request.json").write_text(json.dumps(request, indent=1))


def _run_worker(python: Path, job: Path, timeout_s: float,
                cancel: threading.Event | None) -> None:
    log_path = job / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(python), "-I", str(WORKER), str(job)],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "DOSEPILOT_PHYSICS_PARENT": str(os.getpid())})
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if cancel is not None and cancel.is_set():
                        raise PhysicsCancelled("physics calculation cancelled") from None
                    if time.monotonic() > deadline:
                        raise PhysicsError(
                            f"physics calculation exceeded its {timeout_s:.0f} s limit") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise PhysicsError(f"the physics engine failed (exit {rc}):\n" + "\n".join(tail))


def compute_physics_dose(case: Case, plan: Plan | None = None,
                         settings: PhysicsSettings | None = None, *,
                         cancel: threading.Event | None = None) -> PhysicsResult:
    """Optimise and compute the physics dose of ``plan`` (default: the case's) on ``case``.

    Runs pyRadPlan in its own environment (see the module docstring); raises
    :class:`PhysicsUnavailableError` when it is not installed, :class:`PhysicsError` for input
    the engine cannot plan and :class:`PhysicsCancelled` when ``cancel`` is set meanwhile.
    """
    settings = settings or PhysicsSettings()
    plan = plan or case.plan
    if plan is None:
        raise PhysicsError(f"case {case.name!r} has no plan: give the beams to compute")
    python = physics_python()
    angles = delivery_angles(plan, settings.arc_step_deg)
    structures = optimization_structures(case, plan, settings)
    primary, rx = target_prescriptions(case, plan)[0]
    with tempfile.TemporaryDirectory(prefix="dosepilot-physics-") as tmp:
        job = Path(tmp)
        write_request(job, case, plan, settings, structures, angles)
        _run_worker(python, job, settings.timeout_s, cancel)
        with np.load(job / "result.npz", allow_pickle=False) as result:
            raw = result["dose"]
            coarse = DoseGrid(result["dose_grid"],
                              tuple(float(v) for v in result["dose_grid_origin_lps_mm"]),
                              tuple(float(v) for v in result["dose_grid_spacing_xyz_mm"][::-1]))
        info = json.loads((job / "result.json").read_text())
    raw = np.ascontiguousarray(from_canonical(raw, case.geometry), dtype=np.float32)
    if raw.shape != case.geometry.shape:
        raise PhysicsError(f"the physics engine returned shape {raw.shape}, expected "
                           f"{case.geometry.shape}")
    raw[~body_mask(case)] = 0.0  # interpolation from the dose grid spills past the skin
    dose, factor = normalize_to_d95(raw, primary.mask, rx)
    return PhysicsResult(Volume(dose, case.geometry), factor, primary.name,
                         tuple(a[0] for a in angles), settings, info, coarse.scaled(factor))


def dose_comparison(case: Case, dose: np.ndarray, reference: np.ndarray,
                    region: np.ndarray | None = None) -> dict[str, float]:
    """How a physics dose compares with a reference dose (both Gy on the CT grid): mean absolute
    difference inside ``region`` (default: the body), D95 of each target and mean dose of each
    OAR as ``physics - reference``."""
    region = body_mask(case) if region is None else region
    out = {"mae_gy": float(np.abs(dose - reference)[region].mean())}
    for t in case.targets:
        if t.mask.any():
            out[f"{t.name}_D95_diff_gy"] = float(np.percentile(dose[t.mask], 5)
                                                 - np.percentile(reference[t.mask], 5))
    for s in case.oars:
        if s.mask.any():
            out[f"{s.name}_Dmean_diff_gy"] = float(dose[s.mask].mean() - reference[s.mask].mean())
    return out
