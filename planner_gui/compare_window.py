"""The "Compare plans" window: two of the patient's plans (or a plan and the reference dose)
side by side, a thin view over :func:`engine.plan_compare.compare_doses`.

* Three synced image panes of one orientation: dose A, dose B (one colour scale, Gy) and
  A − B (diverging map symmetric about 0, colour bar in Gy), all on the slice of the session's
  cursor with one CT window; the wheel in any pane scrolls all (it moves the cursor), pan and
  zoom are linked.
* The DVHs of both (A solid, B dashed, one colour per structure, as the DVH panel's).
* Both scorecards with each objective's A − B (the sign of the map).

A plan without a current dose (never predicted, or edited since) is named in the window; the
Compute button predicts it off the UI thread with the window's engine, kept here by plan value
(the session's results are left alone). The comparison itself and the report run off the UI
thread as well; the window follows plan, result and reference changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtGui, QtWidgets

from engine.case import Case, Plan, Volume
from engine.compare_report import diff_limit_gy, write_comparison_report
from engine.plan_compare import PlanComparison, compare_doses
from planner_gui.dvh_panel import dvh_plot_widget
from planner_gui.metrics_panel import FAIL_COLOR, NOT_EVALUATED_COLOR, PASS_COLOR, _item
from planner_gui.session import Session
from planner_gui.views.display import (
    ORIENTATIONS,
    WINDOW_PRESETS,
    OrthoGrid,
    difference_colormap,
    dose_colormap,
    outline,
    structure_color,
)
from planner_gui.views.slice_view import SliceViewBox

PANES = ("A", "B", "A-B")
REFERENCE_KEY = -1
TABLE_COLUMNS = ("Objective", "A", "B", "A − B", "A result", "B result")
_NORMAL_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}


class ComparePane(QtWidgets.QWidget):
    """One image pane: CT, a colour wash and the structure outlines, with a title."""

    def __init__(self, title: str, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = QtWidgets.QLabel(title)
        self.title.setStyleSheet("color: #ddd; background: #222; padding: 2px 6px;")
        self.view_box = SliceViewBox(lockAspect=True, invertY=True, enableMenu=False)
        self.plot = pg.PlotWidget(viewBox=self.view_box, background="k")
        self.plot.hideAxis("left")
        self.plot.hideAxis("bottom")
        self.ct_item = pg.ImageItem()
        self.dose_item = pg.ImageItem()
        self.contour_item = pg.ImageItem()
        for z, item in enumerate((self.ct_item, self.dose_item, self.contour_item)):
            item.setZValue(z)
            self.view_box.addItem(item)
        self.dose_item.setOpacity(0.55)
        self.color_bar = pg.ColorBarItem(values=(0.0, 1.0), colorMap=dose_colormap(0.1),
                                         interactive=False, width=12)
        self.color_bar.setImageItem(self.dose_item, insert_in=self.plot.getPlotItem())
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.title)
        layout.addWidget(self.plot)
        self.setMinimumWidth(180)

    def shown_overlay(self) -> np.ndarray | None:
        """The colour wash's 2-D array as set (rows vertical, columns horizontal), or None."""
        return self.dose_item.image


class CompareWindow(QtWidgets.QWidget):
    """A non-modal window comparing two doses of the session's patient.

    ``engine`` returns the dose engine to compute missing plan doses with (None: none);
    ``steps`` the sampler steps of such a prediction.
    """

    comparison_ready = QtCore.Signal(object)
    report_written = QtCore.Signal(object)

    def __init__(self, session: Session, engine: Callable[[], Any],
                 steps: Callable[[], int] = lambda: 10,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent, QtCore.Qt.WindowType.Window)
        self.setWindowTitle("Compare plans")
        self.resize(1300, 900)
        self.session = session
        self._engine = engine
        self._steps = steps
        self.comparison: PlanComparison | None = None
        self.grid: OrthoGrid | None = None
        self.orientation = "axial"
        self.window = WINDOW_PRESETS["Soft tissue"]
        self.slice_index = 0
        self.computed: dict[Plan, Any] = {}  # plan value -> result computed here
        self.compute_task: asyncio.Future | None = None
        self.compare_task: asyncio.Future | None = None
        self._compared_key: tuple | None = None
        self._pending = False
        self._oriented: dict[str, np.ndarray] = {}
        self._structures: list[tuple[str, np.ndarray, tuple[int, int, int]]] = []
        self._colors: dict[str, tuple[int, int, int]] = {}

        self.combo_a = QtWidgets.QComboBox()
        self.combo_b = QtWidgets.QComboBox()
        self.orientation_combo = QtWidgets.QComboBox()
        self.orientation_combo.addItems(list(ORIENTATIONS))
        self.compute_button = QtWidgets.QPushButton("Compute missing doses")
        self.compute_button.setToolTip("Predict the doses of the chosen plans that have none "
                                       "(in the background)")
        self.save_button = QtWidgets.QPushButton("Save report…")
        self.save_button.setToolTip("Write the comparison as a PDF or PNG report")
        self.message = QtWidgets.QLabel()
        self.message.setWordWrap(True)
        self.summary = QtWidgets.QLabel()
        self.summary.setWordWrap(True)
        top = QtWidgets.QHBoxLayout()
        for label, widget in (("A", self.combo_a), ("B", self.combo_b),
                              ("View", self.orientation_combo)):
            top.addWidget(QtWidgets.QLabel(label))
            top.addWidget(widget, 1 if label != "View" else 0)
        top.addWidget(self.compute_button)
        top.addWidget(self.save_button)

        self.panes = {key: ComparePane(key) for key in PANES}
        panes_row = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        for pane in self.panes.values():
            panes_row.addWidget(pane)
            pane.view_box.scrolled.connect(self.scroll)
        first = self.panes["A"].view_box
        for key in PANES[1:]:
            self.panes[key].view_box.setXLink(first)
            self.panes[key].view_box.setYLink(first)
        self.panes["A-B"].color_bar.setColorMap(difference_colormap())

        self.dvh_plot, self.dvh_legend = dvh_plot_widget()
        self.dvh_curves: dict[tuple[str, str], pg.PlotDataItem] = {}
        self.table = QtWidgets.QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(TABLE_COLUMNS)
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(20)
        bottom = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        bottom.addWidget(self.dvh_plot)
        table_box = QtWidgets.QWidget()
        table_layout = QtWidgets.QVBoxLayout(table_box)
        table_layout.setContentsMargins(0, 0, 0, 0)
        table_layout.addWidget(self.summary)
        table_layout.addWidget(self.table)
        bottom.addWidget(table_box)
        bottom.setSizes([720, 480])  # the table's five columns need about 2/5 of the width
        body = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        body.addWidget(panes_row)
        body.addWidget(bottom)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.message)
        layout.addWidget(body, 1)

        self._updating = False
        self.combo_a.currentIndexChanged.connect(lambda _i: self._on_pick())
        self.combo_b.currentIndexChanged.connect(lambda _i: self._on_pick())
        self.orientation_combo.currentTextChanged.connect(self.set_orientation)
        self.compute_button.clicked.connect(self.compute_missing)
        self.save_button.clicked.connect(self._save_dialog)
        session.case_changed.connect(self._on_case)
        session.plans_changed.connect(lambda *_: self._fill_combos())
        session.result_changed.connect(lambda _r: self.refresh())
        session.reference_changed.connect(lambda _c: self._fill_combos())
        session.cursor_changed.connect(lambda _p: self._on_cursor())
        if session.case is not None:
            self._on_case(session.case)

    # ---- sources ------------------------------------------------------------------------
    def _on_case(self, case: Case) -> None:
        self.computed.clear()
        self.grid = OrthoGrid.from_geometry(case.geometry)
        self._oriented = {"ct": self.grid.orient(case.ct.array)}
        self._structures = [(s.name, self.grid.orient(s.mask), structure_color(i, s.color))
                            for i, s in enumerate(case.structures)]
        self._colors = {s.name: structure_color(i, s.color)
                        for i, s in enumerate(case.structures)}
        self._fill_combos(defaults=True)
        self._on_cursor(force=True)
        self.fit()

    def _fill_combos(self, defaults: bool = False) -> None:
        """Plans, then the reference dose when the case has one. Picks are kept by name;
        the defaults are A = the active plan, B = another plan, else the reference."""
        session = self.session
        if session.case is None:
            return
        keep = (self.combo_a.currentText(), self.combo_b.currentText())
        items = [(entry.plan.name, i) for i, entry in enumerate(session.plans)]
        if session.case.dose is not None:
            items.append((session.reference_source or "Reference", REFERENCE_KEY))
        self._updating = True
        try:
            for combo in (self.combo_a, self.combo_b):
                combo.clear()
                for text, key in items:
                    combo.addItem(text, key)
            if defaults or self.combo_a.findText(keep[0]) < 0:
                self.combo_a.setCurrentIndex(max(session.active_plan, 0))
            else:
                self.combo_a.setCurrentText(keep[0])
            if defaults or self.combo_b.findText(keep[1]) < 0:
                others = [i for i in range(len(items)) if i != self.combo_a.currentIndex()]
                self.combo_b.setCurrentIndex(others[0] if others else 0)
            else:
                self.combo_b.setCurrentText(keep[1])
        finally:
            self._updating = False
        self.refresh()

    def _on_pick(self) -> None:
        if not self._updating:
            self.refresh()

    def pick(self, a: str, b: str) -> None:
        """Choose A and B by their names in the combos (plan names or the reference's)."""
        self._updating = True
        try:
            self.combo_a.setCurrentText(a)
            self.combo_b.setCurrentText(b)
        finally:
            self._updating = False
        self.refresh()

    def _side(self, combo: QtWidgets.QComboBox) -> tuple[str, Plan | None, Volume | None]:
        """(name, plan, dose) of a combo's pick; dose None when the plan has none yet."""
        key = combo.currentData()
        case = self.session.case
        if key == REFERENCE_KEY:
            return combo.currentText(), None, case.dose
        entry = self.session.plans[key]
        if entry.result is not None and entry.result_plan == entry.plan:
            return entry.plan.name, entry.plan, entry.result.dose
        result = self.computed.get(entry.plan)
        return entry.plan.name, entry.plan, result.dose if result is not None else None

    def missing(self) -> list[Plan]:
        """The chosen plans that have no current dose."""
        if self.session.case is None or self.combo_a.currentIndex() < 0:
            return []
        out = []
        for combo in (self.combo_a, self.combo_b):
            _, plan, dose = self._side(combo)
            if dose is None and plan is not None and plan not in out:
                out.append(plan)
        return out

    # ---- comparing ----------------------------------------------------------------------
    def refresh(self) -> None:
        """Compare the current picks (off the UI thread) when both have a dose. A hidden
        window does no work: it catches up when shown."""
        if self.session.case is None or self.combo_a.currentIndex() < 0 or not self.isVisible():
            return
        missing = self.missing()
        busy = self.compute_task is not None and not self.compute_task.done()
        self.compute_button.setEnabled(bool(missing) and not busy
                                       and self._engine() is not None)
        if missing:
            names = ", ".join(p.name for p in missing)
            how = ("computing …" if busy else "press Compute missing doses, or switch to it "
                   "and press Predict" if self._engine() is not None
                   else "no dose engine is available to compute it")
            self.message.setText(f"Plan {names} has no dose yet: {how}")
            self.message.setStyleSheet("color: black; background: #ffdd55; padding: 4px;")
            self._show(None)
            return
        self.message.setText("")
        self.message.setStyleSheet("")
        (name_a, plan_a, dose_a), (name_b, plan_b, dose_b) = (
            self._side(self.combo_a), self._side(self.combo_b))
        key = (id(dose_a), id(dose_b), name_a, name_b)
        if key == self._compared_key:
            return
        if self.compare_task is not None and not self.compare_task.done():
            self._pending = True  # compare again when the running one is done
            return
        self._compared_key = key
        case = self.session.case
        self.compare_task = asyncio.get_event_loop().run_in_executor(
            None, lambda: compare_doses(case, dose_a, dose_b, name_a, name_b, plan_a=plan_a,
                                        plan_b=plan_b, source_a=self._source(plan_a, name_a),
                                        source_b=self._source(plan_b, name_b)))
        self.compare_task.add_done_callback(lambda f: self._compared(f, case, key))

    def _source(self, plan: Plan | None, name: str) -> str:
        if plan is None:
            return name
        result = next((e.result for e in self.session.plans if e.plan == plan
                       and e.result_plan == plan and e.result is not None),
                      self.computed.get(plan))
        kind = getattr(result, "kind", "")
        return f"AI {kind}, {getattr(result, 'steps', '?')} steps" if kind else "AI dose"

    def _compared(self, future: asyncio.Future, case: Case, key: tuple) -> None:
        if future.cancelled() or self.session.case is not case:
            return
        pending, self._pending = self._pending, False
        if future.exception() is not None:
            self._compared_key = None
            self.message.setText(f"Comparison failed: {future.exception()}")
        elif key == self._compared_key:
            self._show(future.result())
        if pending:
            self.refresh()

    def compute_missing(self) -> asyncio.Future | None:
        """Predict the chosen plans that have no dose, off the UI thread (None: nothing to do
        or no engine)."""
        engine, case, plans = self._engine(), self.session.case, self.missing()
        if engine is None or case is None or not plans:
            return None
        steps = self._steps()

        def job() -> list[tuple[Plan, Any]]:
            return [(plan, engine.predict(case, plan, steps=steps)) for plan in plans]

        self.compute_task = asyncio.get_event_loop().run_in_executor(None, job)
        self.compute_task.add_done_callback(lambda f: self._computed(f, case))
        self.refresh()
        return self.compute_task

    def _computed(self, future: asyncio.Future, case: Case) -> None:
        if future.cancelled() or self.session.case is not case:
            return
        if future.exception() is not None:
            self.message.setText(f"Computing the dose failed: {future.exception()}")
            return
        for plan, result in future.result():
            self.computed[plan] = result
        self.refresh()

    # ---- showing ------------------------------------------------------------------------
    def _show(self, comparison: PlanComparison | None) -> None:
        self.comparison = comparison
        self._compared_key = None if comparison is None else self._compared_key
        self.save_button.setEnabled(comparison is not None)
        if comparison is None or self.grid is None:
            self._oriented = {"ct": self._oriented.get("ct")} if self._oriented else {}
            for pane in self.panes.values():
                pane.dose_item.clear()
            self._show_dvhs(None)
            self._show_table(None)
            return
        self._oriented.update(A=self.grid.orient(comparison.a.dose.array),
                              B=self.grid.orient(comparison.b.dose.array),
                              diff=self.grid.orient(comparison.difference.array))
        a, b = comparison.a, comparison.b
        self.panes["A"].title.setText(f"A: {a.name}")
        self.panes["B"].title.setText(f"B: {b.name}")
        self.panes["A-B"].title.setText(f"A − B: {a.name} − {b.name} (Gy)")
        top = max(float(a.dose.array.max()), float(b.dose.array.max()), 1e-3)
        limit = diff_limit_gy(comparison)
        for key, levels in (("A", (0.0, top)), ("B", (0.0, top)), ("A-B", (-limit, limit))):
            self.panes[key].color_bar.setLevels(levels)
        self._draw()
        self._show_dvhs(comparison)
        self._show_table(comparison)
        self.comparison_ready.emit(comparison)

    def _show_dvhs(self, comparison: PlanComparison | None) -> None:
        self.dvh_plot.clear()
        self.dvh_legend.clear()
        self.dvh_curves.clear()
        if comparison is None:
            return
        for side, style in ((comparison.a, QtCore.Qt.PenStyle.SolidLine),
                            (comparison.b, QtCore.Qt.PenStyle.DashLine)):
            tag = "A" if side is comparison.a else "B"
            for name, curve in side.dvhs.items():
                if curve.volume_cc <= 0:
                    continue
                pen = pg.mkPen(self._colors.get(name, (200, 200, 200)), width=2, style=style)
                item = self.dvh_plot.plot(curve.dose_gy, curve.cumulative_pct, pen=pen,
                                          name=name if tag == "A" else None)
                item.setVisible(self.session.is_visible(name))
                self.dvh_curves[(name, tag)] = item

    def _show_table(self, comparison: PlanComparison | None) -> None:
        rows = comparison.objectives if comparison is not None else ()
        self.table.setRowCount(len(rows))
        for row, r in enumerate(rows):
            values = (r.label, "—" if r.value_a is None else f"{r.value_a:.2f}",
                      "—" if r.value_b is None else f"{r.value_b:.2f}",
                      "—" if r.delta is None else f"{r.delta:+.2f}")
            for col, text in enumerate(values):
                self.table.setItem(row, col, _item(text))
            for col, passed in ((4, r.passed_a), (5, r.passed_b)):
                verdict, color = (("—", NOT_EVALUATED_COLOR) if passed is None else
                                  ("PASS", PASS_COLOR) if passed else ("FAIL", FAIL_COLOR))
                self.table.setItem(row, col, _item(verdict, color))
        self.table.resizeColumnsToContents()
        if comparison is None:
            self.summary.setText("")
            return
        text = (f"mean |A − B| {comparison.mean_abs_diff_gy:.2f} Gy, max |A − B| "
                f"{comparison.max_abs_diff_gy:.2f} Gy in the body")
        ca, cb = comparison.a.scorecard, comparison.b.scorecard
        if ca is not None and cb is not None:
            text = (f"Scorecard {comparison.template}: A {ca.total:.2f} ({ca.passed} passed), "
                    f"B {cb.total:.2f} ({cb.passed} passed), A − B "
                    f"{comparison.total_delta:+.2f}. " + text)
        self.summary.setText(text)

    def _on_cursor(self, force: bool = False) -> None:
        if self.grid is None:
            return
        index = self.grid.nearest(self.orientation, self.session.cursor_mm)
        if force or index != self.slice_index:
            self.slice_index = index
            self._draw()

    def _slice(self, oriented: np.ndarray) -> np.ndarray:
        return self.grid.slice(oriented, self.orientation, self.slice_index)

    def _draw(self) -> None:
        if self.grid is None or self._oriented.get("ct") is None:
            return
        _, horizontal, vertical = self.grid.axes(self.orientation)
        x0, w = OrthoGrid.extent(horizontal)
        y0, h = OrthoGrid.extent(vertical)
        rect = QtCore.QRectF(x0, y0, w, h)
        width, level = self.window
        ct = self._slice(self._oriented["ct"])
        contours = np.zeros(ct.shape + (4,), dtype=np.uint8)
        for name, mask, color in self._structures:
            if self.session.is_visible(name):
                contours[outline(self._slice(mask))] = (*color, 255)
        normal = self.grid.axes(self.orientation)[0]
        where = f"{self.orientation} {normal[self.slice_index]:.1f} mm"
        for key, pane in self.panes.items():
            pane.ct_item.setImage(ct, autoLevels=False, rect=rect,
                                  levels=(level - width / 2, level + width / 2))
            pane.contour_item.setImage(contours, autoLevels=False, levels=(0, 255), rect=rect)
            volume = self._oriented.get({"A-B": "diff"}.get(key, key))
            if volume is None:
                pane.dose_item.clear()
            else:
                pane.dose_item.setImage(self._slice(volume), autoLevels=False, rect=rect,
                                        levels=pane.color_bar.levels())
            pane.plot.setToolTip(where)

    def showEvent(self, event: QtGui.QShowEvent) -> None:  # noqa: N802 - Qt API
        super().showEvent(event)
        self.refresh()

    # ---- controls -----------------------------------------------------------------------
    def set_orientation(self, orientation: str) -> None:
        """Show axial, coronal or sagittal slices (through the cursor) in all three panes."""
        self.orientation = orientation
        if self.orientation_combo.currentText() != orientation:
            self.orientation_combo.setCurrentText(orientation)
        for pane in self.panes.values():
            pane.view_box.invertY(orientation == "axial")
        self._on_cursor(force=True)
        self.fit()

    def set_window(self, width: float, level: float) -> None:
        """The CT window (HU width, centre) of all three panes."""
        self.window = (float(width), float(level))
        self._draw()

    def fit(self) -> None:
        """Show the whole slice (the panes' pan and zoom are linked)."""
        self.panes["A"].view_box.autoRange(padding=0.02)

    def scroll(self, steps: int) -> None:
        """Move all panes ``steps`` slices along the normal (moves the session's cursor)."""
        if self.grid is None:
            return
        normal = self.grid.axes(self.orientation)[0]
        index = int(np.clip(self.slice_index + steps, 0, len(normal) - 1))
        point = list(self.session.cursor_mm)
        point[_NORMAL_AXIS[self.orientation]] = float(normal[index])
        self.session.set_cursor(tuple(point))

    # ---- report -------------------------------------------------------------------------
    def _save_dialog(self) -> None:
        path, _ = QtWidgets.QFileDialog.getSaveFileName(
            self, "Save the comparison report", "comparison.pdf", "PDF (*.pdf);;PNG (*.png)")
        if path:
            self.save_report(path)

    def save_report(self, path: str | Path) -> asyncio.Future | None:
        """Write the shown comparison as a PDF or PNG (by suffix) off the UI thread, slices
        through the session's cursor; None when there is nothing to report yet."""
        comparison, case = self.comparison, self.session.case
        if comparison is None or case is None:
            return None
        path = Path(path)
        if path.suffix.lower() not in (".pdf", ".png"):
            path = path.with_suffix(".pdf")
        point = self.session.cursor_mm
        future = asyncio.get_event_loop().run_in_executor(
            None, write_comparison_report, case, comparison, path, point)
        future.add_done_callback(self._report_done)
        return future

    def _report_done(self, future: asyncio.Future) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            self.message.setText(f"Report not written: {future.exception()}")
            return
        self.message.setText(f"Report written to {future.result()}")
        self.report_written.emit(future.result())
