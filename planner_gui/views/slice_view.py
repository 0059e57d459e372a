"""One CT slice view (axial, coronal or sagittal) with contour outlines, a dose colour-wash with
isodose lines and a colour bar in Gy, a linked crosshair and, in the axial view, draggable beams.

A label above each view says which dose the colour wash shows (:class:`DoseDisplay`). Views open
zoomed to the body's outline on the shown slice; beam handles sit on the ray at the edge of
what is visible, a constant size on screen, so they can be grabbed at any zoom.

Mouse: wheel scrolls slices (Ctrl+wheel zooms), a click moves the linked crosshair, dragging a
beam turns its gantry. Keys: Up/Down or PageUp/PageDown scroll; the window's R (View > Reset
zoom and pan) fits the views to the body again.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtGui, QtWidgets

from engine.case import Case
from planner_gui.beam_geometry import handle_point
from planner_gui.dose_display import OVERLAY_MODES, PREDICTED, DoseDisplay
from planner_gui.session import Session
from planner_gui.views.beam_items import BeamRay, axial_direction
from planner_gui.views.display import (
    ISODOSE_PERCENT,
    WINDOW_PRESETS,
    OrthoGrid,
    difference_colormap,
    dose_colormap,
    isodose_color,
    outline,
    structure_color,
)

__all__ = ["OVERLAY_MODES", "SliceView"]

HANDLE_RADIUS_PX = 7.0
MIN_WIDTH_PX = 160
BODY_HU = -400.0       # without a body contour, the body is the CT above this
FIT_MARGIN = 0.1       # fitting the body leaves this fraction of its larger side on each side
_BADGE_STYLE = "padding: 2px 6px; border-radius: 3px; color: {fg}; background: {bg};"


class SliceViewBox(pg.ViewBox):
    """A view box whose wheel scrolls slices; Ctrl+wheel zooms as usual."""

    scrolled = QtCore.Signal(int)

    def wheelEvent(self, ev, axis=None) -> None:  # noqa: N802 - Qt API
        if ev.modifiers() & QtCore.Qt.KeyboardModifier.ControlModifier:
            super().wheelEvent(ev, axis)
            return
        delta = ev.delta() if hasattr(ev, "delta") else ev.angleDelta().y()
        self.scrolled.emit(1 if delta > 0 else -1)
        ev.accept()


class SliceView(QtWidgets.QWidget):
    """A tri-planar view pane following a :class:`Session`; its colour wash shows what
    ``display`` says."""

    def __init__(self, session: Session, orientation: str, display: DoseDisplay,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.orientation = orientation
        self.display = display
        self.grid: OrthoGrid | None = None
        self.slice_index = 0
        self.dose_opacity = 0.45
        self.window = WINDOW_PRESETS["Soft tissue"]
        self._ct: np.ndarray | None = None
        self._structures: list[tuple[str, np.ndarray, tuple[int, int, int]]] = []
        self._body: np.ndarray | None = None
        self._overlay: np.ndarray | None = None
        self._overlay_levels = (0.0, 1.0)
        self._reference_gy = 1.0
        self.beam_rays: list[BeamRay] = []
        self._rect = QtCore.QRectF(0, 0, 1, 1)

        self.view_box = SliceViewBox(lockAspect=True, invertY=orientation == "axial",
                                     enableMenu=False)
        self.plot = pg.PlotWidget(viewBox=self.view_box, background="k")
        self.plot.hideAxis("left")
        self.plot.hideAxis("bottom")
        self.plot_item = self.plot.getPlotItem()
        self.ct_item = pg.ImageItem()
        self.contour_item = pg.ImageItem()
        self.dose_item = pg.ImageItem()
        self.contour_item.setZValue(5)
        self.dose_item.setZValue(2)
        for item in (self.ct_item, self.dose_item, self.contour_item):
            self.view_box.addItem(item)
        self.isodose_item = pg.ImageItem()
        self.isodose_item.setZValue(3)
        self.view_box.addItem(self.isodose_item)
        self.color_bar = pg.ColorBarItem(values=(0.0, 1.0), colorMap=dose_colormap(0.1),
                                         interactive=False, width=12)
        self.overlay_label = "Dose (Gy)"
        self.color_bar.setImageItem(self.dose_item, insert_in=self.plot_item)
        pen = pg.mkPen((0, 200, 255, 160), width=1, style=QtCore.Qt.PenStyle.DashLine)
        self.h_line = pg.InfiniteLine(angle=0, pen=pen, movable=False)
        self.v_line = pg.InfiniteLine(angle=90, pen=pen, movable=False)
        for line in (self.h_line, self.v_line):
            line.setZValue(10)
            self.view_box.addItem(line, ignoreBounds=True)
        self.label = QtWidgets.QLabel(orientation.capitalize())
        self.label.setStyleSheet("color: #ddd; padding: 2px 6px;")
        self.dose_label = QtWidgets.QLabel()
        self.dose_label.setObjectName("dose_label")
        self.hint_label = QtWidgets.QLabel(self.plot)  # floats over the image's bottom edge
        self.hint_label.setWordWrap(True)
        self.hint_label.setStyleSheet("color: black; background: rgba(255, 221, 85, 215); "
                                      "padding: 4px 8px; border-radius: 4px;")
        self.hint_label.setAttribute(QtCore.Qt.WidgetAttribute.WA_TransparentForMouseEvents)
        self.hint_label.setVisible(False)

        header = QtWidgets.QWidget()
        header.setStyleSheet("background: #222;")
        row = QtWidgets.QHBoxLayout(header)
        row.setContentsMargins(0, 1, 4, 1)
        row.addWidget(self.label)
        row.addStretch(1)
        row.addWidget(self.dose_label)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(header)
        layout.addWidget(self.plot)
        self.setFocusPolicy(QtCore.Qt.FocusPolicy.StrongFocus)
        # an explicit minimum: a long label is clipped instead of widening the pane (and
        # squeezing its neighbours) whenever it changes
        self.setMinimumWidth(MIN_WIDTH_PX)

        self.view_box.scrolled.connect(self.scroll)
        self.view_box.sigTransformChanged.connect(lambda _vb: self._draw_beams())
        display.changed.connect(lambda _mode: self._refresh_overlay())
        self.plot.scene().sigMouseClicked.connect(self._on_click)
        session.case_changed.connect(self._on_case)
        session.cursor_changed.connect(self._on_cursor)
        session.result_changed.connect(lambda _r: self._refresh_overlay())
        session.reference_changed.connect(lambda _c: self._refresh_overlay())
        session.visibility_changed.connect(lambda *_: self._draw_contours())
        session.plan_changed.connect(lambda *_: self._draw_beams())
        session.selection_changed.connect(lambda _i: self._draw_beams())

    # ---- data ---------------------------------------------------------------------------------
    def _on_case(self, case: Case) -> None:
        self.grid = OrthoGrid.from_geometry(case.geometry)
        self._ct = self.grid.orient(case.ct.array)
        self._structures = [(s.name, self.grid.orient(s.mask), structure_color(i, s.color))
                            for i, s in enumerate(case.structures)]
        self._body = self.grid.orient(case.external.mask) if case.external else None
        _, horizontal, vertical = self.grid.axes(self.orientation)
        x0, w = OrthoGrid.extent(horizontal)
        y0, h = OrthoGrid.extent(vertical)
        self._rect = QtCore.QRectF(x0, y0, w, h)
        self._reference_gy = self._reference_dose(case)
        self._refresh_overlay(draw=False)
        self._on_cursor(self.session.cursor_mm, force=True)
        self.fit_to_body()

    @staticmethod
    def _reference_dose(case: Case) -> float:
        """Dose (Gy) that isodose percentages refer to: the plan's or the targets' prescription."""
        rx = [s.prescription_gy for s in case.targets if s.prescription_gy]
        if rx:
            return float(max(rx))
        if case.plan is not None and case.plan.prescription_gy:
            return float(case.plan.prescription_gy)
        return 0.0

    @property
    def overlay_mode(self) -> str:
        """What the colour wash shows (one of :data:`OVERLAY_MODES`), as the display says."""
        return self.display.mode

    def _overlay_volume(self) -> tuple[np.ndarray | None, tuple[float, float], str, float]:
        """(oriented volume, display levels, colour-bar label, transparent-below fraction)."""
        case, result = self.session.case, self.session.result
        predicted = result.dose.array if result is not None else None
        reference = case.dose.array if case is not None and case.dose is not None else None
        mode = self.overlay_mode
        if mode == OVERLAY_MODES[0] and predicted is not None:
            volume, label, below = predicted, "Dose (Gy)", 0.1
        elif mode == OVERLAY_MODES[1] and reference is not None:
            volume, label, below = reference, "Reference dose (Gy)", 0.1
        elif mode == OVERLAY_MODES[2] and predicted is not None and reference is not None:
            diff = predicted.astype(np.float32) - reference.astype(np.float32)
            span = float(max(np.percentile(np.abs(diff), 99.9), 0.1))
            return self.grid.orient(diff), (-span, span), "Predicted - reference (Gy)", -1.0
        elif mode == OVERLAY_MODES[3] and result is not None and result.std is not None:
            volume, label, below = result.std.array, "Uncertainty, std (Gy)", 0.05
        else:
            return None, (0.0, 1.0), "Dose (Gy)", 0.1
        top = max(float(volume.max()), self._reference_gy * 1.1 if "std" not in label else 0.0,
                  1e-3)
        return self.grid.orient(volume), (0.0, top), label, below

    def _refresh_overlay(self, draw: bool = True) -> None:
        if self.grid is None:
            return
        volume, levels, label, below = self._overlay_volume()
        self._overlay = volume
        self._overlay_levels = levels
        cmap = difference_colormap() if below < 0 else dose_colormap(below)
        self.color_bar.setColorMap(cmap)
        self.color_bar.setLevels(levels)
        self.overlay_label = label
        self.color_bar.setVisible(volume is not None)
        if draw:
            self._update_label()
            self._draw_overlay()

    def _on_cursor(self, point_mm: tuple[float, float, float], force: bool = False) -> None:
        if self.grid is None:
            return
        index = self.grid.nearest(self.orientation, point_mm)
        h = {"axial": 0, "coronal": 0, "sagittal": 1}[self.orientation]
        v = {"axial": 1, "coronal": 2, "sagittal": 2}[self.orientation]
        self.v_line.setPos(point_mm[h])
        self.h_line.setPos(point_mm[v])
        if force or index != self.slice_index:
            self.slice_index = index
            self._draw_slice()

    # ---- drawing ----------------------------------------------------------------------------
    def _slice(self, oriented: np.ndarray) -> np.ndarray:
        return self.grid.slice(oriented, self.orientation, self.slice_index)

    def _draw_slice(self) -> None:
        width, level = self.window
        self.ct_item.setImage(self._slice(self._ct), autoLevels=False,
                              levels=(level - width / 2, level + width / 2), rect=self._rect)
        self._update_label()
        self._draw_contours()
        self._draw_overlay()
        self._draw_beams()

    def _update_label(self) -> None:
        normal = self.grid.axes(self.orientation)[0]
        self.label.setText(f"{self.orientation.capitalize()}  {normal[self.slice_index]:.1f} mm"
                           f"  ({self.slice_index + 1}/{len(normal)})")
        self.dose_label.setText(self.display.describe())
        self.dose_label.setToolTip(f"Colour wash: {self.overlay_label}" if self._overlay
                                   is not None else "Nothing to show in this mode yet")
        if self._overlay is None:
            fg, bg = "#aaa", "#444"
        elif self.overlay_mode == PREDICTED:
            fg, bg = "black", "#5dd6c9"
        else:
            fg, bg = "black", "#ccc"
        self.dose_label.setStyleSheet(_BADGE_STYLE.format(fg=fg, bg=bg))

    def _draw_contours(self) -> None:
        if self.grid is None:
            return
        shape = self._slice(self._ct).shape
        rgba = np.zeros(shape + (4,), dtype=np.uint8)
        for name, mask, color in self._structures:
            if not self.session.is_visible(name):
                continue
            edge = outline(self._slice(mask))
            rgba[edge] = (*color, 255)
        self.contour_item.setImage(rgba, autoLevels=False, levels=(0, 255), rect=self._rect)

    def _draw_overlay(self) -> None:
        if self.grid is None:
            return
        if self._overlay is None:
            self.dose_item.clear()
            self.isodose_item.clear()
            return
        data = self._slice(self._overlay)
        self.dose_item.setImage(data, autoLevels=False, levels=self._overlay_levels,
                                rect=self._rect)
        self.dose_item.setOpacity(self.dose_opacity)
        show_iso = self.overlay_mode in OVERLAY_MODES[:2] and self._reference_gy > 0
        self.isodose_item.setVisible(show_iso)
        if show_iso:
            self.isodose_item.setImage(self._isodose_lines(data), autoLevels=False,
                                       levels=(0, 255), rect=self._rect)

    def _isodose_lines(self, dose2d: np.ndarray) -> np.ndarray:
        """RGBA image of the isodose lines (pixel outlines of each level's region)."""
        rgba = np.zeros(dose2d.shape + (4,), dtype=np.uint8)
        for pct in ISODOSE_PERCENT:
            edge = outline(dose2d >= self._reference_gy * pct / 100.0)
            rgba[edge] = (*isodose_color(pct / 100.0), 255)
        return rgba

    def _draw_beams(self) -> None:
        """Rays from the isocentre with their handles at the edge of the visible area (redrawn
        whenever the plan, the zoom, the pan or the view's size changes). With the isocentre
        panned out of view, the beams whose rays miss the view are not drawn (R brings
        them back)."""
        if self.orientation != "axial" or self.grid is None or self.session.plan is None:
            return
        plan = self.session.plan
        while len(self.beam_rays) < len(plan.beams):
            ray = BeamRay(self.session, len(self.beam_rays))
            self.view_box.addItem(ray, ignoreBounds=True)
            self.beam_rays.append(ray)
        while len(self.beam_rays) > len(plan.beams):
            self.view_box.removeItem(self.beam_rays.pop())
        view = self.view_box.viewRect()
        mm_per_px = view.width() / max(self.view_box.width(), 1.0)
        radius = HANDLE_RADIUS_PX * mm_per_px
        inset = radius + 3.0 * mm_per_px
        visible = (view.left() + inset, view.top() + inset, view.right() - inset,
                   view.bottom() - inset)
        for i, ray in enumerate(self.beam_rays):
            iso = np.asarray(plan.beams[i].isocenter_mm[:2])
            handle = handle_point(iso, axial_direction(self.session, i), visible)
            ray.setVisible(handle is not None)  # None: its ray misses what is shown
            if handle is not None:
                ray.set_beam(iso, handle, radius, i == self.session.selected_beam)

    # ---- controls -----------------------------------------------------------------------------
    def set_window(self, width: float, level: float) -> None:
        """Display window in HU (width, centre)."""
        self.window = (float(width), float(level))
        if self.grid is not None:
            self._draw_slice()

    def set_dose_opacity(self, opacity: float) -> None:
        self.dose_opacity = float(np.clip(opacity, 0.0, 1.0))
        self.dose_item.setOpacity(self.dose_opacity)

    def set_hint(self, text: str) -> None:
        """Show ``text`` floating over the bottom of the image ("" hides it). It lets the mouse
        through and moves nothing when it comes or goes."""
        self.hint_label.setText(text)
        self.hint_label.setVisible(bool(text))
        self._place_hint()

    def _place_hint(self) -> None:
        width = max(self.plot.width() - 16, 50)
        height = self.hint_label.heightForWidth(width)
        self.hint_label.setGeometry(8, self.plot.height() - height - 8, width, height)

    def resizeEvent(self, event: QtGui.QResizeEvent) -> None:  # noqa: N802 - Qt API
        super().resizeEvent(event)
        self._place_hint()  # the layout has resized the plot already

    def body_rect(self) -> QtCore.QRectF:
        """The body's bounding box on the shown slice (view mm) with a margin of
        :data:`FIT_MARGIN`; the whole image when the slice shows no body."""
        if self.grid is None:
            return self._rect
        body = (self._slice(self._body) if self._body is not None
                else self._slice(self._ct) > BODY_HU)
        rows, cols = np.nonzero(body)
        if rows.size == 0:
            return self._rect
        _, horizontal, vertical = self.grid.axes(self.orientation)
        half_h = abs(float(horizontal[1] - horizontal[0])) / 2 if len(horizontal) > 1 else 0.5
        half_v = abs(float(vertical[1] - vertical[0])) / 2 if len(vertical) > 1 else 0.5
        x0, x1 = horizontal[cols.min()] - half_h, horizontal[cols.max()] + half_h
        y0, y1 = vertical[rows.min()] - half_v, vertical[rows.max()] + half_v
        margin = FIT_MARGIN * max(x1 - x0, y1 - y0)
        return QtCore.QRectF(x0 - margin, y0 - margin, x1 - x0 + 2 * margin,
                             y1 - y0 + 2 * margin)

    def fit_to_body(self) -> None:
        """Zoom and pan so that the body on the shown slice fills the view."""
        self.view_box.setRange(self.body_rect(), padding=0.0)

    def scroll(self, steps: int) -> None:
        """Move the slice by ``steps`` voxels along the view's normal (moves the crosshair)."""
        if self.grid is None:
            return
        normal = self.grid.axes(self.orientation)[0]
        index = int(np.clip(self.slice_index + steps, 0, len(normal) - 1))
        point = list(self.session.cursor_mm)
        point[{"axial": 2, "coronal": 1, "sagittal": 0}[self.orientation]] = float(normal[index])
        self.session.set_cursor(tuple(point))

    def point_mm(self, horizontal: float, vertical: float) -> tuple[float, float, float]:
        """LPS point (mm) of view coordinates on the current slice."""
        point = list(self.session.cursor_mm)
        h, v = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[self.orientation]
        point[h], point[v] = horizontal, vertical
        return tuple(point)

    def view_to_widget(self, horizontal: float, vertical: float) -> QtCore.QPoint:
        """Widget pixel of the plot's viewport at view coordinates (mm) — for tests and tools."""
        scene = self.view_box.mapViewToScene(QtCore.QPointF(horizontal, vertical))
        return self.plot.mapFromScene(scene)

    def _on_click(self, ev) -> None:
        if ev.button() != QtCore.Qt.MouseButton.LeftButton or ev.isAccepted() or self.grid is None:
            return
        pos = self.view_box.mapSceneToView(ev.scenePos())
        if self.view_box.sceneBoundingRect().contains(ev.scenePos()):
            self.session.set_cursor(self.point_mm(pos.x(), pos.y()))

    def keyPressEvent(self, ev) -> None:  # noqa: N802 - Qt API
        key = ev.key()
        if key in (QtCore.Qt.Key.Key_Up, QtCore.Qt.Key.Key_PageUp):
            self.scroll(1)
        elif key in (QtCore.Qt.Key.Key_Down, QtCore.Qt.Key.Key_PageDown):
            self.scroll(-1)
        else:
            super().keyPressEvent(ev)
