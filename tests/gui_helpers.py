"""Support for the GUI tests: the engine's phantom on a small grid, a real (non-AI) dose
calculation to drive the GUI's inference plumbing with, and reading a slice view's pixels.

The dose model is a simple physics model, not a stand-in for results: each beam is a field
shaped to the targets' beam's-eye-view projection (plus margin, Gaussian penumbra), attenuated
exponentially with depth below the body surface on its central axis and with inverse-square
fall-off; the sum is normalised to the prescription over the targets. Different gantry angles
therefore give really different dose distributions and DVHs.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import erfc

from engine.case import Beam, Case, Plan, Volume
from engine.features.beam_geometry import source_direction_lps
from engine.latest_wins import Cancelled
from engine.metrics.dvh import all_metrics, prepare
from engine.metrics.scorecard import BoundScorecard, builtin_template
from engine.phantom import PhantomSpec, make_phantom
from engine.runtime import DoseResult

if TYPE_CHECKING:
    from planner_gui.views.slice_view import SliceView

MU_PER_MM = 0.005
PENUMBRA_SIGMA_MM = 3.0
FIELD_MARGIN_MM = 5.0


def make_case(shape: tuple[int, int, int] = (24, 56, 64),
              spacing: tuple[float, float, float] = (4.0, 4.0, 4.0),
              with_dose: bool = True, n_beams: int = 5) -> Case:
    """The engine's synthetic head-and-neck phantom on a small grid (reference dose optional)."""
    return make_phantom(PhantomSpec(shape=shape, spacing=spacing, with_dose=with_dose,
                                    n_beams=n_beams))


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
                raise Cancelled("superseded")
            angles = beam.gantry_angles_deg
            for angle in angles:
                turned = dataclasses.replace(beam, gantry_deg=angle, control_point_gantry_deg=())
                total += self._beam(case, plan, turned, points, body, target) / len(angles)
            if self.delay_s:
                time.sleep(self.delay_s)
            if on_beam is not None:
                on_beam(n + 1, len(plan.beams))
        primary = max(case.targets, key=lambda s: s.prescription_gy or 0.0, default=None)
        rx = primary.prescription_gy if primary is not None and primary.prescription_gy else 60.0
        inside = primary.mask.reshape(-1) if primary is not None else target
        mean_target = total[inside].mean() if inside.any() else total.max()
        scale = rx / mean_target if mean_target > 0 else 0.0
        return (total * scale * body).reshape(g.shape).astype(np.float32)

    @staticmethod
    def _beam(case: Case, plan: Plan, beam: Beam, points: np.ndarray, body: np.ndarray,
              target: np.ndarray) -> np.ndarray:
        src = np.asarray(beam.isocenter_mm) + beam.sad_mm * source_direction_lps(
            beam.gantry_deg, beam.couch_deg, plan.patient_position)
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
    """A dose engine with the runtime's interface and result type over :class:`PhysicsDose`,
    with DVHs, metrics and the head-and-neck scorecard from ``engine.metrics``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.physics = PhysicsDose(delay_s)
        self.kinds: list[str] = []
        self._prepared: tuple[int, Any, Any] | None = None

    def _bound(self, case: Case) -> tuple[Any, Any]:
        if self._prepared is None or self._prepared[0] != id(case):
            self._prepared = (id(case), prepare(case.structures, case.geometry),
                              BoundScorecard(builtin_template("head_neck"), case.structures,
                                             case.geometry))
        return self._prepared[1], self._prepared[2]

    def _result(self, case: Case, dose: np.ndarray, kind: str, seconds: float,
                steps: int) -> DoseResult:
        structures, scorecard = self._bound(case)
        curves, metrics = all_metrics(dose, structures, case.geometry)
        self.kinds.append(kind)
        return DoseResult(kind=kind, dose=Volume(dose, case.geometry), std=None,
                          dvhs={c.name: c for c in curves}, metrics={m.name: m for m in metrics},
                          scorecard=scorecard.score(dose), timings_s={"total": seconds},
                          steps=steps)

    def preview(self, case: Case, plan: Plan,
                cancel: threading.Event | None = None) -> DoseResult:
        t0 = time.perf_counter()
        dose = self.physics.dose(case, plan, cancel)
        return self._result(case, dose, "preview", time.perf_counter() - t0, 1)

    def predict(self, case: Case, plan: Plan, steps: int = 10, seeds: tuple[int, ...] = (0,),
                progress: Callable[..., None] | None = None,
                cancel: threading.Event | None = None) -> DoseResult:
        t0 = time.perf_counter()

        def on_beam(done: int, total: int) -> None:
            if progress is not None:
                progress(round(steps * done / total), steps)

        dose = self.physics.dose(case, plan, cancel, on_beam)
        return self._result(case, dose, "predict", time.perf_counter() - t0, steps)


def grab_rgb(widget: Any) -> np.ndarray:
    """The widget as drawn on screen, ``[rows, columns, RGB]`` uint8."""
    from PySide6 import QtGui  # noqa: PLC0415 - only GUI tests read pixels

    image = widget.grab().toImage().convertToFormat(QtGui.QImage.Format.Format_RGB888)
    array = np.frombuffer(image.constBits(), np.uint8).reshape(
        image.height(), image.bytesPerLine())[:, :image.width() * 3]
    return array.reshape(image.height(), image.width(), 3).copy()


def image_pixels(view: SliceView, dose: bool = True) -> np.ndarray:
    """The pixels of a slice view's image area (its view box: no colour bar, no header) as
    drawn, with the beam rays, the crosshair and the hint hidden for the grab, so that what is
    left is the CT, the contours and (``dose``) the dose colour wash with its isodose lines."""
    from PySide6 import QtWidgets  # noqa: PLC0415

    QtWidgets.QApplication.processEvents()  # pending layout requests first, as on screen
    hidden = [*view.beam_rays, view.h_line, view.v_line, view.hint_label]
    if not dose:
        hidden += [view.dose_item, view.isodose_item]
    shown = [item.isVisible() for item in hidden]
    for item in hidden:
        item.setVisible(False)
    try:
        rgb = grab_rgb(view.plot)
    finally:
        for item, visible in zip(hidden, shown):
            item.setVisible(visible)
    box = view.view_box.sceneBoundingRect().toRect()
    return rgb[box.top():box.bottom() + 1, box.left():box.right() + 1]


def body_width_fraction(view: SliceView) -> float:
    """Share of the view box's width that the patient spans on screen: the columns between
    the first and the last that show the CT or a contour (not black background)."""
    pixels = image_pixels(view, dose=False)
    columns = np.nonzero((pixels.max(axis=2) > 40).sum(axis=0) >= 3)[0]
    return 0.0 if columns.size == 0 else (columns[-1] - columns[0] + 1) / pixels.shape[1]


def changed_pixels(before: np.ndarray, after: np.ndarray, tolerance: int = 8) -> int:
    """How many pixels differ by more than ``tolerance`` in some colour channel."""
    return int((np.abs(before.astype(int) - after.astype(int)).max(axis=2) > tolerance).sum())
