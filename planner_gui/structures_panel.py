"""Structure list with colour swatches and visibility check boxes (drives every view).

ROIs of the structure set that have no mask on the CT (``Case.structures_not_on_ct``) are
listed after the others, greyed out and without a check box, with the reason as tooltip."""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets

from engine.case import Case
from planner_gui.session import Session
from planner_gui.views.display import structure_color


class StructuresPanel(QtWidgets.QListWidget):
    """One check box per structure: checked = shown in the slice, 3D and DVH views."""

    def __init__(self, session: Session, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self._updating = False
        session.case_changed.connect(self._on_case)
        session.visibility_changed.connect(self._on_visibility)
        self.itemChanged.connect(self._on_item)

    def _on_case(self, case: Case) -> None:
        self._updating = True
        self.clear()
        for i, s in enumerate(case.structures):
            label = s.name
            if s.prescription_gy:
                label += f"  ({s.prescription_gy:g} Gy)"
            item = QtWidgets.QListWidgetItem(f"{label}  [{s.role.value}]")
            item.setData(QtCore.Qt.ItemDataRole.UserRole, s.name)
            item.setFlags(item.flags() | QtCore.Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(QtCore.Qt.CheckState.Checked)
            pixmap = QtGui.QPixmap(12, 12)
            pixmap.fill(QtGui.QColor(*structure_color(i, s.color)))
            item.setIcon(QtGui.QIcon(pixmap))
            self.addItem(item)
        for s in case.structures_not_on_ct:
            item = QtWidgets.QListWidgetItem(f"{s.name}  [{s.role.value}]  not on the CT")
            item.setFlags(QtCore.Qt.ItemFlag.NoItemFlags)
            item.setToolTip(f"{s.name} is not on the CT: {s.reason}")
            self.addItem(item)
        self._updating = False

    def item_for(self, name: str) -> QtWidgets.QListWidgetItem:
        for row in range(self.count()):
            if self.item(row).data(QtCore.Qt.ItemDataRole.UserRole) == name:
                return self.item(row)
        raise KeyError(name)

    def _on_item(self, item: QtWidgets.QListWidgetItem) -> None:
        if not self._updating:
            self.session.set_visible(item.data(QtCore.Qt.ItemDataRole.UserRole),
                                     item.checkState() == QtCore.Qt.CheckState.Checked)

    def _on_visibility(self, name: str, visible: bool) -> None:
        self._updating = True
        state = QtCore.Qt.CheckState.Checked if visible else QtCore.Qt.CheckState.Unchecked
        self.item_for(name).setCheckState(state)
        self._updating = False
