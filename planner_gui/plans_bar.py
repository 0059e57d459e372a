"""The patient's plans: pick the active one, duplicate, rename, delete (a thin view of
:class:`planner_gui.session.Session`'s plan list)."""

from __future__ import annotations

from PySide6 import QtCore, QtWidgets

from planner_gui.session import Session


class PlansBar(QtWidgets.QWidget):
    """A plan selector with Duplicate / Rename / Delete. Input problems (an empty or taken
    name, deleting the last plan) are reported through ``message``, never raised at the user."""

    message = QtCore.Signal(str)

    def __init__(self, session: Session, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.combo = QtWidgets.QComboBox()
        self.combo.setToolTip("The patient's plans: each keeps its beams, undo history and dose")
        self.duplicate_button = QtWidgets.QPushButton("Duplicate")
        self.duplicate_button.setToolTip("Copy this plan to try an alternative")
        self.rename_button = QtWidgets.QPushButton("Rename…")
        self.delete_button = QtWidgets.QPushButton("Delete")
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QtWidgets.QLabel("Plan"))
        layout.addWidget(self.combo, 1)
        for button in (self.duplicate_button, self.rename_button, self.delete_button):
            layout.addWidget(button)
        self._updating = False
        self.combo.currentIndexChanged.connect(self._on_pick)
        self.duplicate_button.clicked.connect(self._duplicate)
        self.rename_button.clicked.connect(self._ask_rename)
        self.delete_button.clicked.connect(self.delete_current)
        session.plans_changed.connect(self._on_plans)
        self._on_plans(session.plan_names(), session.active_plan)

    def _on_plans(self, names: list[str], active: int) -> None:
        self._updating = True
        try:
            self.combo.clear()
            self.combo.addItems(names)
            self.combo.setCurrentIndex(active)
        finally:
            self._updating = False
        has_plans = bool(names)
        self.duplicate_button.setEnabled(has_plans)
        self.rename_button.setEnabled(has_plans)
        self.delete_button.setEnabled(len(names) > 1)

    def _on_pick(self, index: int) -> None:
        if not self._updating and index >= 0:
            self.session.switch_plan(index)

    def _duplicate(self) -> None:
        self.session.duplicate_plan()

    def _ask_rename(self) -> None:
        name, ok = QtWidgets.QInputDialog.getText(
            self, "Rename plan", "Plan name:", text=self.session.plan.name)
        if ok:
            self.rename_current(name)

    def rename_current(self, name: str) -> bool:
        """Rename the active plan; False (with a message) when the name is empty or taken."""
        try:
            self.session.rename_plan(self.session.active_plan, name)
        except ValueError as exc:
            self.message.emit(f"Not renamed: {exc}")
            return False
        return True

    def delete_current(self) -> bool:
        """Delete the active plan; False (with a message) when it is the only one."""
        try:
            self.session.delete_plan(self.session.active_plan)
        except ValueError as exc:
            self.message.emit(f"Not deleted: {exc}")
            return False
        return True
