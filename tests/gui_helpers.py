"""Support for the GUI tests: a small in-memory head-and-neck-like phantom and a real
(non-AI) dose calculation to drive the GUI's inference plumbing with.

The dose model is a simple physics model, not a stand-in for results: each beam is a field
shaped to the targets' beam's-eye-view projection (plus margin, Gaussian penumbra), attenuated
exponentially with depth below the body surface on its central axis and with inverse-square
fall-off; the sum is normalised to the prescription over the targets. Different gantry angles
therefore give really different dose distributions and DVHs.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import erfc

from engine.case import Beam, Case, Geometry, Plan, Role, Structure, Volume
from planner_gui.beam_geometry import source_position

MU_PER_MM = 0.005
PENUMBRA_SIGMA_MM = 3.0
FIELD_MARGIN_MM = 5.0


def make_phantom_case(shape: tuple[int, int, int] = (24, 48, 56),
                      spacing: tuple[float, float, float] = (4.0, 4.0, 4.0),
                      with_reference: bool = True) -> Case:
    """An elliptical 'neck' in air with a spine, a spherical PTV (60 Gy) and three OARs."""
    nz, ny, nx = shape
    origin = (-(nx - 1) * spacing[2] / 2, -(ny - 1) * spacing[1] / 2, 0.0)
    geometry = Geometry(shape=shape, origin=origin, spacing=spacing)
    zc, yc, xc = np.meshgrid(*geometry.axis_coordinates(), indexing="ij")
    zmid = (nz - 1) * spacing[0] / 2
    body = (xc / 90.0) ** 2 + (yc / 70.0) ** 2 <= 1.0
    spine = ((xc / 14.0) ** 2 + ((yc - 35.0) / 14.0) ** 2 <= 1.0)
    ct = np.where(body, 30.0, -1000.0).astype(np.float32)
    ct[spine] = 700.0
    ptv = (xc + 20.0) ** 2 + (yc + 10.0) ** 2 + (zc - zmid) ** 2 <= 24.0 ** 2
    cord = ((xc / 6.0) ** 2 + ((yc - 35.0) / 6.0) ** 2 <= 1.0)
    parotid_l = (xc - 45.0) ** 2 + (yc - 5.0) ** 2 + (zc - zmid) ** 2 <= 15.0 ** 2
    parotid_r = (xc + 55.0) ** 2 + (yc - 10.0) ** 2 + (zc - zmid) ** 2 <= 12.0 ** 2
    structures = (
        Structure("BODY", Role.EXTERNAL, body, color=(0, 200, 0), number=1),
        Structure("PTV60", Role.TARGET, ptv & body, prescription_gy=60.0, color=(255, 0, 0),
                  number=2),
        Structure("SpinalCord", Role.OAR, cord, color=(255, 255, 0), number=3),
        Structure("Parotid_L", Role.OAR, parotid_l & body, color=(0, 128, 255), number=4),
        Structure("Parotid_R", Role.OAR, parotid_r & body, color=(255, 0, 255), number=5),
    )
    iso_index = np.argwhere(ptv).mean(axis=0)
    iso = tuple(float(v) for v in geometry.index_to_lps(iso_index))
    beams = tuple(Beam(f"B{i + 1}", gantry_deg=a, isocenter_mm=iso, number=i + 1)
                  for i, a in enumerate((0.0, 72.0, 144.0, 216.0, 288.0)))
    plan = Plan(beams=beams, fractions=30, prescription_gy=60.0, name="Phantom5F")
    case = Case(name="GUI phantom", ct=Volume(ct, geometry), structures=structures, plan=plan)
    if with_reference:
        dose = PhysicsDose().dose(case, plan.with_gantry(0, 20.0))
        case = case.with_dose(Volume(dose, geometry))
    return case


@dataclass(frozen=True)
class SimpleDoseResult:
    """The engine runtime's result shape (DESIGN §5) for the physics model."""

    dose: Volume
    std: Volume | None
    dvh: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    scorecard: Any
    timings_s: dict[str, float]
    kind: str
    plan: Plan = field(repr=False, default=None)


class PhysicsDose:
    """Computes the simple physics dose described in the module docstring.

    ``delay_s`` adds wall time per beam (sleeping, like a GPU or a busy CPU would) so tests can
    observe work in flight; ``calls`` counts computations started.
    """

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0
        self._lock = threading.Lock()

    def dose(self, case: Case, plan: Plan, cancel: threading.Event | None = None,
             on_beam: Callable[[int, int], None] | None = None) -> np.ndarray:
        with self._lock:
            self.calls += 1
        g = case.geometry
        idx = np.indices(g.shape).reshape(3, -1).T
        points = g.index_to_lps(idx)
        body = case.external.mask.reshape(-1) if case.external else np.ones(len(points), bool)
        target = np.logical_or.reduce([s.mask for s in case.targets]).reshape(-1)
        total = np.zeros(len(points))
        for n, beam in enumerate(plan.beams):
            if cancel is not None and cancel.is_set():
                break
            total += self._beam(case, plan, beam, points, body, target)
            if self.delay_s:
                time.sleep(self.delay_s)
            if on_beam is not None:
                on_beam(n + 1, len(plan.beams))
        rx = max((s.prescription_gy or 0.0 for s in case.targets), default=60.0)
        mean_target = total[target].mean() if target.any() else total.max()
        scale = rx / mean_target if mean_target > 0 else 0.0
        return (total * scale * body).reshape(g.shape).astype(np.float32)

    @staticmethod
    def _beam(case: Case, plan: Plan, beam: Beam, points: np.ndarray, body: np.ndarray,
              target: np.ndarray) -> np.ndarray:
        src = source_position(beam, plan.patient_position)
        axis = (np.asarray(beam.isocenter_mm) - src) / beam.sad_mm
        rel = points - src
        along = rel @ axis
        perp = np.linalg.norm(rel - along[:, None] * axis, axis=1)
        r_iso = perp * beam.sad_mm / np.maximum(along, 1.0)
        radius = r_iso[target].max() + FIELD_MARGIN_MM if target.any() else 50.0
        lateral = 0.5 * erfc((r_iso - radius) / (math.sqrt(2.0) * PENUMBRA_SIGMA_MM))
        ray = src + np.arange(0.0, beam.sad_mm + 1.0, 2.0)[:, None] * axis
        inside = case.geometry.lps_to_index(ray)
        k = np.round(inside).astype(int)
        ok = np.all((k >= 0) & (k < np.asarray(case.geometry.shape)), axis=1)
        hit = np.zeros(len(ray), bool)
        hit[ok] = case.external.mask[tuple(k[ok].T)] if case.external else True
        entry = float(np.argmax(hit) * 2.0) if hit.any() else beam.sad_mm
        depth = np.maximum(along - entry, 0.0)
        return lateral * np.exp(-MU_PER_MM * depth) * (beam.sad_mm / np.maximum(along, 1.0)) ** 2


class PhysicsDoseEngine:
    """A dose engine (the GUI's ``DoseEngineLike``) over :class:`PhysicsDose`."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.physics = PhysicsDose(delay_s)
        self.kinds: list[str] = []

    def _result(self, case: Case, plan: Plan, dose: np.ndarray, kind: str,
                seconds: float, std: np.ndarray | None = None) -> SimpleDoseResult:
        from planner_gui.dvh_data import dvh_for_case  # the GUI's own DVH path

        volume = Volume(dose, case.geometry)
        self.kinds.append(kind)
        return SimpleDoseResult(
            dose=volume, std=None if std is None else Volume(std, case.geometry),
            dvh=dvh_for_case(case, volume), metrics={}, scorecard=None,
            timings_s={kind: seconds}, kind=kind, plan=plan)

    def preview(self, case: Case, plan: Plan) -> SimpleDoseResult:
        t0 = time.perf_counter()
        dose = self.physics.dose(case, plan)
        return self._result(case, plan, dose, "preview", time.perf_counter() - t0)

    def predict(self, case: Case, plan: Plan, steps: int = 10, seeds: tuple[int, ...] = (0,),
                progress: Callable[..., None] | None = None,
                cancel: threading.Event | None = None) -> SimpleDoseResult:
        t0 = time.perf_counter()

        def on_beam(done: int, total: int) -> None:
            if progress is not None:
                progress(round(steps * done / total), steps)

        dose = self.physics.dose(case, plan, cancel, on_beam)
        return self._result(case, plan, dose, "predict", time.perf_counter() - t0)
