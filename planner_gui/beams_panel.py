"""The beam table (name, gantry, couch, technique) with editable angles, add/remove, and a
gantry dial for the selected beam. Every edit goes through the session (undoable)."""

from __future__ import annotations

from PySide6 import QtCore, QtWidgets

from engine.case import Plan, Technique
from planner_gui.session import Session

COLUMNS = ("Beam", "Gantry (°)", "Couch (°)", "Technique")
GANTRY_COLUMN, COUCH_COLUMN = 1, 2


class BeamsPanel(QtWidgets.QWidget):
    """Table of the plan's beams following a :class:`Session`."""

    message = QtCore.Signal(str)

    def __init__(self, session: Session, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self._updating = False
        self.table = QtWidgets.QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.horizontalHeader().setSectionResizeMode(
            QtWidgets.QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.SingleSelection)
        self.add_button = QtWidgets.QPushButton("Add beam")
        self.remove_button = QtWidgets.QPushButton("Remove beam")
        self.dial = QtWidgets.QDial()
        self.dial.setRange(0, 3599)
        self.dial.setWrapping(True)
        self.dial.setNotchesVisible(True)
        self.dial.setToolTip("Gantry angle of the selected beam (drag to turn)")
        self.dial.setFixedSize(90, 90)
        self.dial_label = QtWidgets.QLabel("—")
        self.dial_label.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)

        buttons = QtWidgets.QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        dial_box = QtWidgets.QVBoxLayout()
        dial_box.addWidget(self.dial, alignment=QtCore.Qt.AlignmentFlag.AlignCenter)
        dial_box.addWidget(self.dial_label)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.table, 1)
        row.addLayout(dial_box)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(row)
        layout.addLayout(buttons)

        self.table.itemChanged.connect(self._on_item_changed)
        self.table.itemSelectionChanged.connect(self._on_selection)
        self.add_button.clicked.connect(self._add)
        self.remove_button.clicked.connect(self._remove)
        self.dial.sliderPressed.connect(session.begin_edit)
        self.dial.valueChanged.connect(self._on_dial)
        self.dial.sliderReleased.connect(session.commit_edit)
        session.plan_changed.connect(self._on_plan)
        session.selection_changed.connect(self._on_selected)

    # ---- session -> table -------------------------------------------------------------------
    def _on_plan(self, plan: Plan, final: bool) -> None:
        self._updating = True
        try:
            if self.table.rowCount() != len(plan.beams):
                self.table.setRowCount(len(plan.beams))
            for row, beam in enumerate(plan.beams):
                values = (beam.name, f"{beam.gantry_deg:.1f}", f"{beam.couch_deg:.1f}",
                          "arc" if beam.technique is Technique.ARC else "static")
                for col, text in enumerate(values):
                    item = self.table.item(row, col)
                    if item is None:
                        item = QtWidgets.QTableWidgetItem()
                        editable = col in (GANTRY_COLUMN, COUCH_COLUMN)
                        flags = item.flags() | QtCore.Qt.ItemFlag.ItemIsEditable if editable \
                            else item.flags() & ~QtCore.Qt.ItemFlag.ItemIsEditable
                        item.setFlags(flags)
                        self.table.setItem(row, col, item)
                    if item.text() != text:
                        item.setText(text)
            self.remove_button.setEnabled(len(plan.beams) > 1)
        finally:
            self._updating = False
        self._on_selected(self.session.selected_beam)

    def _on_selected(self, index: int) -> None:
        self._updating = True
        try:
            if 0 <= index < self.table.rowCount():
                self.table.selectRow(index)
                if not self.dial.isSliderDown():
                    self.dial.setValue(int(round(self.session.plan.beams[index].gantry_deg * 10))
                                       % 3600)
                self.dial_label.setText(
                    f"{self.session.plan.beams[index].name}: "
                    f"{self.session.plan.beams[index].gantry_deg:.1f}°")
        finally:
            self._updating = False

    # ---- table -> session -------------------------------------------------------------------
    def _on_item_changed(self, item: QtWidgets.QTableWidgetItem) -> None:
        if self._updating or item.column() not in (GANTRY_COLUMN, COUCH_COLUMN):
            return
        row = item.row()
        try:
            value = float(item.text().replace("°", "").strip())
        except ValueError:
            self.message.emit(f"'{item.text()}' is not an angle in degrees")
            self._on_plan(self.session.plan, True)
            return
        if item.column() == GANTRY_COLUMN:
            self.session.set_gantry(row, value)
        else:
            self.session.set_couch(row, value)

    def _on_selection(self) -> None:
        if self._updating:
            return
        rows = {i.row() for i in self.table.selectedIndexes()}
        if rows:
            self.session.select_beam(min(rows))

    def _on_dial(self, value: int) -> None:
        index = self.session.selected_beam
        if self._updating or index < 0:
            return
        self.session.set_gantry(index, value / 10.0, transient=self.dial.isSliderDown())

    def _add(self) -> None:
        self.session.add_beam()

    def _remove(self) -> None:
        index = self.session.selected_beam
        if index < 0:
            return
        try:
            self.session.remove_beam(index)
        except ValueError as exc:
            self.message.emit(str(exc))
