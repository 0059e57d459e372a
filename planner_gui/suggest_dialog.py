"""The "Suggest beam angles" dialog: a thin, non-modal Qt face over
:mod:`planner_gui.beam_suggestion`.

The planner picks the number of coplanar beams, forbidden gantry sectors (degrees IEC 61217,
clockwise, e.g. ``300-60, 150-210``), a time budget, how many suggestions to keep and the
objective's weights (its formula shown live); Start searches off the UI thread with progress
and Cancel. The best arrangements and the equispaced reference become new plans of the patient,
listed with their angles and the model's objective; "Verify with physics" makes the selected
one active and computes its physics dose (the window's ``verify_with_physics``), which becomes
the reference to compare against: the suggestion is the model's word until then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6 import QtCore, QtGui, QtWidgets

from engine.beam_search import SearchObjective, SearchResult, allowed
from engine.case import Case, Plan
from planner_gui.beam_suggestion import (
    SuggestionRun,
    SuggestRequest,
    add_to_session,
    no_arrangement_message,
    parse_sectors,
    suggested_plans,
)
from planner_gui.progress_bar import StepProgressBar
from planner_gui.session import PlanEntry, Session

TICK_MS = 200
FIXED_COLUMNS = ("Plan", "Gantry angles (deg)", "Objective (model)")
ERROR_STYLE = "color: #c33;"


class SuggestDialog(QtWidgets.QDialog):
    """Searches beam arrangements for the session's patient and adds the best as plans.

    ``engine()`` gives the dose engine now (None when there is none), ``verify()`` starts the
    physics dose of the active plan, ``busy()`` says the window's own dose work is running (the
    search waits for it). Signals: ``plans_added(names)`` after a search added its plans,
    ``idle()`` when a search ended in any way (finished, cancelled, failed)."""

    plans_added = QtCore.Signal(list)
    idle = QtCore.Signal()

    def __init__(self, session: Session, engine: Callable[[], Any],
                 verify: Callable[[], Any], busy: Callable[[], bool] | None = None,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Suggest beam angles")
        self.setModal(False)
        self.session = session
        self._engine, self._verify, self._busy = engine, verify, busy
        self.run = SuggestionRun()
        self.evaluated = 0
        self.best_value: float | None = None
        self.last_result: SearchResult | None = None
        self.rows: list[PlanEntry] = []
        self._closed = False

        self.beams_spin = QtWidgets.QSpinBox()
        self.beams_spin.setRange(1, 36)
        self.beams_spin.setValue(7)
        self.beams_spin.setToolTip("Coplanar static beams per arrangement")
        self.forbid_edit = QtWidgets.QLineEdit()
        self.forbid_edit.setPlaceholderText("e.g. 300-60, 150-210 (none: any angle)")
        self.forbid_edit.setToolTip("Gantry sectors no beam may enter, clockwise from the first "
                                    "angle to the second (degrees IEC 61217), comma-separated")
        self.forbid_error = QtWidgets.QLabel()
        self.forbid_error.setStyleSheet(ERROR_STYLE)
        self.forbid_error.setVisible(False)
        self.budget_spin = QtWidgets.QSpinBox()
        self.budget_spin.setRange(1, 3600)
        self.budget_spin.setValue(60)
        self.budget_spin.setSuffix(" s")
        self.budget_spin.setToolTip("Wall time the search may take")
        self.keep_spin = QtWidgets.QSpinBox()
        self.keep_spin.setRange(1, 10)
        self.keep_spin.setValue(3)
        self.keep_spin.setToolTip("How many of the best arrangements become plans")
        defaults = SearchObjective()
        self.scorecard_spin = self._weight(defaults.scorecard_weight,
                                           "per unit of (1 - scorecard total)")
        self.coverage_spin = self._weight(defaults.coverage_weight,
                                          "per Gy of target D95 below 95 % of prescription")
        self.oar_spin = self._weight(defaults.oar_weight, "per Gy of the organ figures")
        self.objective_label = QtWidgets.QLabel()
        self.objective_label.setWordWrap(True)
        self.objective_label.setTextInteractionFlags(
            QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)

        form = QtWidgets.QFormLayout()
        form.addRow("Beams", self.beams_spin)
        form.addRow("Forbidden sectors", self.forbid_edit)
        form.addRow("", self.forbid_error)
        form.addRow("Time budget", self.budget_spin)
        form.addRow("Keep best", self.keep_spin)
        weights = QtWidgets.QHBoxLayout()
        for label, spin in (("scorecard", self.scorecard_spin), ("coverage", self.coverage_spin),
                            ("OAR", self.oar_spin)):
            weights.addWidget(QtWidgets.QLabel(label))
            weights.addWidget(spin)
        form.addRow("Objective weights", weights)
        form.addRow("Minimised", self.objective_label)

        self.start_button = QtWidgets.QPushButton("Start")
        self.start_button.setToolTip("Search arrangements with the AI preview as the objective")
        self.cancel_button = QtWidgets.QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the search; no plan is added")
        self.cancel_button.setEnabled(False)
        buttons = QtWidgets.QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        buttons.addStretch(1)
        self.progress_bar = StepProgressBar()
        self.status_label = QtWidgets.QLabel("Not started")
        self.status_label.setWordWrap(True)
        self.error_label = QtWidgets.QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet(ERROR_STYLE)
        self.error_label.setVisible(False)
        self.table = QtWidgets.QTableWidget(0, len(FIXED_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(FIXED_COLUMNS))
        self.table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.resizeColumnsToContents()  # readable headers before the first results
        self.verify_button = QtWidgets.QPushButton("Verify with physics")
        self.verify_button.setToolTip(
            "Make the selected plan active and compute its physics dose (pyRadPlan, about a "
            "minute); it becomes the reference to compare the model's dose with")
        self.verify_button.setEnabled(False)
        note = QtWidgets.QLabel("Objective values are of the model's preview dose: verify a "
                                "suggestion with physics before trusting it. With the shipped "
                                "model, suggestions were worse than the equispaced plan in "
                                "physics on 5 of 5 validation patients (benchmarks/RESULTS.md).")
        note.setWordWrap(True)

        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(self.error_label)
        layout.addWidget(self.table, 1)
        layout.addWidget(note)
        layout.addWidget(self.verify_button)
        self.resize(760, 520)

        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._show_progress)
        self.forbid_edit.textChanged.connect(self._check_sectors)
        for spin in (self.scorecard_spin, self.coverage_spin, self.oar_spin):
            spin.valueChanged.connect(self._show_objective)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.verify_button.clicked.connect(self.verify_selected)
        self.table.itemSelectionChanged.connect(self._update_verify)
        self.run.progress.connect(self._on_progress)
        self.run.finished.connect(self._on_finished)
        self.run.failed.connect(self._on_failed)
        self.run.cancelled.connect(self._on_cancelled)
        session.case_changed.connect(self._on_case_changed)
        session.plans_changed.connect(self._on_plans_changed)
        self._show_objective()

    @staticmethod
    def _weight(value: float, tip: str) -> QtWidgets.QDoubleSpinBox:
        spin = QtWidgets.QDoubleSpinBox()
        spin.setDecimals(3)
        spin.setRange(0.0, 1000.0)
        spin.setSingleStep(0.1)
        spin.setValue(value)
        spin.setToolTip(tip)
        return spin

    # ---- the request --------------------------------------------------------------------------
    def objective(self) -> SearchObjective:
        """The objective the weight fields describe (the default organ figures)."""
        return SearchObjective(scorecard_weight=self.scorecard_spin.value(),
                               coverage_weight=self.coverage_spin.value(),
                               oar_weight=self.oar_spin.value())

    def request(self) -> SuggestRequest:
        """The search the form describes; ValueError (for the planner) on bad sectors."""
        return SuggestRequest(n_beams=self.beams_spin.value(),
                              forbid=parse_sectors(self.forbid_edit.text()),
                              budget_s=float(self.budget_spin.value()),
                              keep=self.keep_spin.value(), objective=self.objective())

    def _show_objective(self) -> None:
        self.objective_label.setText(self.objective().describe())

    def _check_sectors(self) -> bool:
        try:
            parse_sectors(self.forbid_edit.text())
        except ValueError as exc:
            self.forbid_error.setText(str(exc))
            self.forbid_error.setVisible(True)
            return False
        self.forbid_error.clear()
        self.forbid_error.setVisible(False)
        return True

    # ---- running ------------------------------------------------------------------------------
    def start(self) -> Any:
        """Start a search as the form says; returns its future, or None when it cannot start
        (the reason is shown in the dialog)."""
        if self.run.running:
            return None
        self._show_error("")
        if not self._check_sectors():
            self._show_error("Not started: fix the forbidden sectors.")
            return None
        case, plan, engine = self.session.case, self.session.plan, self._engine()
        if case is None or plan is None or not plan.beams:
            self._show_error("Open a patient first: the search needs its plan's isocentre.")
            return None
        if engine is None:
            self._show_error("No dose engine is loaded: the search judges each arrangement "
                             "with the AI preview.")
            return None
        request = self.request()
        self.evaluated, self.best_value = 0, None
        future = self.run.start(engine, case, plan, request, busy=self._busy)
        self._set_running(True)
        self._show_progress()
        return future

    def cancel(self) -> None:
        """Stop the running search; nothing is added to the session."""
        if self.run.running:
            self.status_label.setText("Cancelling …")
            self.run.cancel()

    def _set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        for widget in (self.beams_spin, self.forbid_edit, self.budget_spin, self.keep_spin,
                       self.scorecard_spin, self.coverage_spin, self.oar_spin):
            widget.setEnabled(not running)
        if running:
            self.timer.start()
        else:
            self.timer.stop()

    def _on_progress(self, evaluated: int, best: float) -> None:
        if self._closed:
            return
        self.evaluated, self.best_value = evaluated, best
        self._show_progress()

    def _show_progress(self) -> None:
        request = self.run.request
        if request is None or not self.run.running:
            return
        elapsed = self.run.elapsed_s()
        best = "—" if self.best_value is None else f"{self.best_value:.3f}"
        caption = f"{elapsed:.0f} s of {request.budget_s:g} s"
        self.progress_bar.set_progress(round(min(elapsed, request.budget_s) * 10),
                                       round(request.budget_s * 10), caption)
        self.status_label.setText(f"Searching: {self.evaluated} arrangements evaluated, best "
                                  f"objective {best}, {caption}")

    def _on_finished(self, result: SearchResult, case: Case, plan: Plan) -> None:
        if self._closed:
            return
        self._set_running(False)
        self.last_result = result
        if case is not self.session.case:
            self.status_label.setText("Search finished for a patient no longer open; "
                                      "nothing added.")
        elif not result.best:
            self.status_label.setText("Search finished without a suggestion.")
            self._show_error(no_arrangement_message(self.run.request))
        else:
            plans = suggested_plans(plan, result)
            entries = add_to_session(self.session, plans)
            self._fill_table(plans, entries)
            best, ref = result.best[0].value, result.equispaced.value
            self.progress_bar.set_progress(1, 1, f"{result.seconds:.1f} s")
            self.status_label.setText(
                f"{result.evaluated} arrangements in {result.seconds:.1f} s: best objective "
                f"{best:.3f}, equispaced {ref:.3f}. Added {len(entries)} plans.")
            self.plans_added.emit([entry.plan.name for entry in entries])
        self.idle.emit()

    def _on_failed(self, message: str) -> None:
        if self._closed:
            return
        self._set_running(False)
        self.status_label.setText("Search failed.")
        self._show_error(message)
        self.idle.emit()

    def _on_cancelled(self) -> None:
        if self._closed:
            return
        self._set_running(False)
        self.status_label.setText(f"Cancelled after {self.evaluated} arrangements; no plan "
                                  f"added.")
        self.progress_bar.set_progress(0, 1, "Cancelled")
        self.idle.emit()

    def _show_error(self, message: str) -> None:
        self.error_label.setText(message)
        self.error_label.setVisible(bool(message))

    # ---- results ------------------------------------------------------------------------------
    def _fill_table(self, plans: list, entries: list[PlanEntry]) -> None:
        terms = list(plans[0].candidate.terms) if plans else []
        self.table.clear()
        self.table.setColumnCount(len(FIXED_COLUMNS) + len(terms))
        self.table.setHorizontalHeaderLabels(list(FIXED_COLUMNS) + terms)
        self.table.setRowCount(len(plans))
        forbid = self.run.request.forbid if self.run.request is not None else ()
        reference_tip = "The equispaced class solution from 0 deg, for comparison" + (
            "; it enters a forbidden sector" if any(
                p.reference and not allowed(p.candidate.gantry_deg, forbid) for p in plans)
            else "")
        for row, (suggested, entry) in enumerate(zip(plans, entries)):
            candidate = suggested.candidate
            cells = [entry.plan.name, " ".join(f"{a:g}" for a in candidate.gantry_deg),
                     f"{candidate.value:.3f}"]
            cells += [f"{candidate.terms.get(t, float('nan')):g}" for t in terms]
            for column, text in enumerate(cells):
                item = QtWidgets.QTableWidgetItem(text)
                if suggested.reference:
                    item.setForeground(QtGui.QBrush(QtGui.QColor("#888")))
                    item.setToolTip(reference_tip)
                self.table.setItem(row, column, item)
        self.table.resizeColumnsToContents()
        self.rows = entries
        self._update_verify()

    def _row_index(self, row: int) -> int | None:
        """The session index of the plan in table ``row`` (None when it was deleted)."""
        if not 0 <= row < len(self.rows):
            return None
        entry = self.rows[row]
        return next((i for i, e in enumerate(self.session.plans) if e is entry), None)

    def _update_verify(self) -> None:
        row = self.table.currentRow() if self.table.selectedItems() else -1
        self.verify_button.setEnabled(self._row_index(row) is not None)

    def _on_plans_changed(self, _names: list[str], _active: int) -> None:
        for row, entry in enumerate(self.rows):  # renamed plans keep their rows
            item = self.table.item(row, 0)
            if item is not None and self._row_index(row) is not None:
                item.setText(entry.plan.name)
        self._update_verify()

    def verify_selected(self) -> Any:
        """Make the selected suggestion the active plan and start its physics dose (the
        window's verification; the dose becomes the reference). Returns what ``verify()``
        returned, or None when no existing plan is selected."""
        row = self.table.currentRow() if self.table.selectedItems() else -1
        index = self._row_index(row)
        if index is None:
            self._show_error("Select a suggested plan that still exists to verify it.")
            return None
        self._show_error("")
        self.session.switch_plan(index)
        self.status_label.setText(f"Verifying {self.session.plan.name} with physics …")
        return self._verify()

    def _on_case_changed(self, _case: Case) -> None:
        """Another patient: a running search is for the old one; its plans are gone."""
        self.run.cancel()
        self.rows = []
        self.table.setRowCount(0)
        self._update_verify()

    # ---- closing ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Cancel a running search and stop listening to the session (the window closes)."""
        if self._closed:
            return
        self._closed = True
        self.run.cancel()
        self.timer.stop()
        self.session.case_changed.disconnect(self._on_case_changed)
        self.session.plans_changed.disconnect(self._on_plans_changed)

    def reject(self) -> None:
        """Closing the dialog (its close button, Escape) cancels its search: nothing is added.
        The plans of finished searches stay in the session."""
        self.cancel()
        super().reject()
