"""Beams drawn in the axial view as rays from the isocentre towards their sources, each with a
handle that the planner drags to turn the gantry."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtGui

from engine.features.beam_geometry import source_direction_lps
from planner_gui.beam_geometry import gantry_from_axial_direction
from planner_gui.session import Session


class BeamRay(pg.GraphicsObject):
    """One beam in an axial view (item coordinates = LPS x, y in mm): a ray from the isocentre
    to a round handle; the view places the handle (``beam_geometry.handle_point``).

    Dragging anywhere on the ray or its handle turns beam ``index`` about the isocentre: the
    gantry angle follows the mouse. The whole drag is one undoable edit in the session.
    """

    def __init__(self, session: Session, index: int) -> None:
        super().__init__()
        self.session = session
        self.index = index
        self.selected = False
        self._iso = np.zeros(2)
        self._end = np.zeros(2)
        self._radius = 1.0
        self._color = QtGui.QColor(255, 215, 0)
        self.setZValue(20)
        self.setCursor(QtCore.Qt.CursorShape.OpenHandCursor)

    def set_beam(self, iso_xy: np.ndarray, handle_xy: np.ndarray, handle_radius_mm: float,
                 selected: bool) -> None:
        """Draw the ray from ``iso_xy`` to the handle at ``handle_xy`` (LPS x, y mm), the handle
        of radius ``handle_radius_mm`` (the view keeps it a constant number of pixels)."""
        self.prepareGeometryChange()
        self._iso = np.asarray(iso_xy, dtype=float)
        self._end = np.asarray(handle_xy, dtype=float)
        self._radius = float(handle_radius_mm)
        self.selected = selected
        self.update()

    @property
    def handle_xy(self) -> np.ndarray:
        """LPS (x, y) mm of the drag handle at the outer end of the ray."""
        return self._end.copy()

    def _handle_radius(self) -> float:
        return self._radius

    def boundingRect(self) -> QtCore.QRectF:  # noqa: N802 - Qt API
        r = self._handle_radius() * 1.5
        x0, x1 = sorted((self._iso[0], self._end[0]))
        y0, y1 = sorted((self._iso[1], self._end[1]))
        return QtCore.QRectF(x0 - r, y0 - r, x1 - x0 + 2 * r, y1 - y0 + 2 * r)

    def shape(self) -> QtGui.QPainterPath:
        path = QtGui.QPainterPath(QtCore.QPointF(*self._iso))
        path.lineTo(QtCore.QPointF(*self._end))
        stroker = QtGui.QPainterPathStroker()
        stroker.setWidth(self._handle_radius() * 1.2)
        out = stroker.createStroke(path)
        out.addEllipse(QtCore.QPointF(*self._end), self._handle_radius() * 1.5,
                       self._handle_radius() * 1.5)
        return out

    def paint(self, painter: QtGui.QPainter, *args: object) -> None:
        color = QtGui.QColor(255, 255, 255) if self.selected else self._color
        pen = QtGui.QPen(color, 3 if self.selected else 2)
        pen.setCosmetic(True)
        painter.setPen(pen)
        painter.drawLine(QtCore.QPointF(*self._iso), QtCore.QPointF(*self._end))
        painter.setBrush(QtGui.QBrush(color))
        r = self._handle_radius()
        painter.drawEllipse(QtCore.QPointF(*self._end), r, r)

    def mouseDragEvent(self, ev) -> None:  # noqa: N802 - pyqtgraph API
        if ev.button() != QtCore.Qt.MouseButton.LeftButton:
            ev.ignore()
            return
        ev.accept()
        plan = self.session.plan
        if plan is None or self.index >= len(plan.beams):
            return
        if ev.isStart():
            self.session.select_beam(self.index)
            self.session.begin_edit()
        pos = ev.pos()
        angle = gantry_from_axial_direction(pos.x() - self._iso[0], pos.y() - self._iso[1],
                                            plan.patient_position)
        if not math.isclose(angle, plan.beams[self.index].gantry_deg, abs_tol=0.05):
            self.session.set_gantry(self.index, round(angle, 1), transient=True)
        if ev.isFinish():
            self.session.commit_edit()

    def mouseClickEvent(self, ev) -> None:  # noqa: N802 - pyqtgraph API
        if ev.button() == QtCore.Qt.MouseButton.LeftButton:
            ev.accept()
            self.session.select_beam(self.index)


def axial_direction(session: Session, index: int) -> np.ndarray:
    """LPS (x, y) of beam ``index``'s source direction, projected on the axial plane."""
    plan = session.plan
    beam = plan.beams[index]
    return source_direction_lps(beam.gantry_deg, beam.couch_deg, plan.patient_position)[:2]
