"""The live DVH plot (pyqtgraph): one curve per structure in its colour, the reference dose's
curves dashed when the case has one. Curves are cumulative, volume in % of the structure."""

from __future__ import annotations

import asyncio
from typing import Any

import pyqtgraph as pg
from PySide6 import QtCore, QtWidgets

from engine.case import Case
from engine.metrics.dvh import DVH, compute_dvhs, prepare
from planner_gui.session import Session
from planner_gui.views.display import structure_color


def _reference_dvhs(case: Case) -> dict[str, DVH]:
    curves = compute_dvhs(case.dose.array, prepare(case.structures, case.geometry))
    return {c.name: c for c in curves if c.volume_cc > 0}


def dvh_plot_widget() -> tuple[pg.PlotWidget, pg.LegendItem]:
    """An empty cumulative-DVH plot (dose in Gy, volume in %) and its legend, as every DVH view
    of the planner draws it."""
    plot = pg.PlotWidget(background="#15191d")
    plot.setLabel("bottom", "Dose", units="Gy")
    plot.setLabel("left", "Volume", units="%")
    plot.showGrid(x=True, y=True, alpha=0.25)
    plot.setYRange(0, 102, padding=0)
    return plot, plot.addLegend(offset=(-10, 10), labelTextSize="8pt")


class DvhPanel(QtWidgets.QWidget):
    """Cumulative DVHs of the latest result (solid) and of the reference dose (dashed)."""

    def __init__(self, session: Session, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.plot, self.legend = dvh_plot_widget()
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.reference_curves: dict[str, pg.PlotDataItem] = {}
        self._reference: dict[str, DVH] = {}
        self._colors: dict[str, tuple[int, int, int]] = {}
        self.reference_task: asyncio.Future | None = None
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plot)
        session.case_changed.connect(self._on_case)
        session.result_changed.connect(self._on_result)
        session.reference_changed.connect(self._load_reference)
        session.visibility_changed.connect(self._on_visibility)

    def _on_case(self, case: Case) -> None:
        self.plot.clear()
        self.legend.clear()
        self.curves.clear()
        self.reference_curves.clear()
        self._colors = {s.name: structure_color(i, s.color)
                        for i, s in enumerate(case.structures)}
        self._load_reference(case)

    def _load_reference(self, case: Case) -> None:
        for curve in self.reference_curves.values():
            self.plot.removeItem(curve)
        self.reference_curves.clear()
        self._reference = {}
        self.reference_task = None
        if case.dose is not None:
            # partial-volume DVHs of a large CT take seconds: compute them off the UI thread
            self.reference_task = asyncio.get_event_loop().run_in_executor(
                None, _reference_dvhs, case)
            self.reference_task.add_done_callback(lambda f: self._show_reference(case, f))

    def _show_reference(self, case: Case, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None or self.session.case is not case:
            return
        self._reference = future.result()
        for name, curve in self._reference.items():
            pen = pg.mkPen(self._colors[name], width=1.5, style=QtCore.Qt.PenStyle.DashLine)
            self.reference_curves[name] = self.plot.plot(curve.dose_gy, curve.cumulative_pct,
                                                         pen=pen)
            self.reference_curves[name].setVisible(self.session.is_visible(name))

    def _on_result(self, result: Any) -> None:
        dvhs: dict[str, DVH] = dict(result.dvhs) if result is not None else {}
        for name in list(self.curves):
            if name not in dvhs:
                self.plot.removeItem(self.curves.pop(name))
                self.legend.removeItem(name)
        for name, curve in dvhs.items():
            item = self.curves.get(name)
            if item is None:
                pen = pg.mkPen(self._colors.get(name, (200, 200, 200)), width=2)
                item = self.plot.plot(curve.dose_gy, curve.cumulative_pct, pen=pen, name=name)
                self.curves[name] = item
            else:
                item.setData(curve.dose_gy, curve.cumulative_pct)
            item.setVisible(self.session.is_visible(name))

    def _on_visibility(self, name: str, visible: bool) -> None:
        for items in (self.curves, self.reference_curves):
            if name in items:
                items[name].setVisible(visible)
