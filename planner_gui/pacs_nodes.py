"""The remote DICOM nodes in the GUI: a picker for the PACS dialogs and a dialog that edits the
nodes, DosePilot's own AE title and port, and the retrieve method.

Everything is read from and saved to the PACS settings file the command line uses
(:mod:`engine.pacs.nodes`), so a node added here is there for ``dosepilot pacs`` too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PySide6 import QtCore, QtWidgets

from engine.errors import UserError
from engine.pacs.nodes import (
    RETRIEVE_METHODS,
    PacsSettings,
    RemoteNode,
    check_aet,
    check_port,
    load_settings,
    save_settings,
    settings_path,
)
from planner_gui.pacs_work import BackgroundJob

COLUMNS = ("Name", "AE title", "Host", "Port", "TLS")


def load_or_default(path: Path | None) -> tuple[PacsSettings, str]:
    """The settings, or the defaults and the reason the file could not be used."""
    try:
        return load_settings(path), ""
    except UserError as exc:
        return PacsSettings(), str(exc)


class NodePicker(QtWidgets.QWidget):
    """A combo box of the saved nodes (the default first) and a "Nodes…" button."""

    changed = QtCore.Signal()

    def __init__(self, path: Path | None = None,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.path = settings_path(path)
        self.combo = QtWidgets.QComboBox()
        self.combo.setMinimumWidth(260)
        self.edit_button = QtWidgets.QPushButton("Nodes…")
        self.edit_button.clicked.connect(self.edit)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QtWidgets.QLabel("Node"))
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.edit_button)
        self.settings = PacsSettings()
        self.problem = ""
        self.reload()

    def reload(self) -> None:
        """Re-read the settings file."""
        self.settings, self.problem = load_or_default(self.path)
        self.combo.clear()
        names = sorted(self.settings.nodes, key=lambda n: (n != self.settings.default_node, n))
        for name in names:
            self.combo.addItem(f"{name}: {self.settings.nodes[name]}", name)
        self.changed.emit()

    def node(self) -> RemoteNode | None:
        """The chosen node, or None when none is saved."""
        name = self.combo.currentData()
        return self.settings.nodes.get(name) if name else None

    def edit(self) -> None:
        """Open the node settings; the list is re-read when it closes."""
        dialog = NodeSettingsDialog(self.path, self)
        dialog.finished.connect(lambda _: self.reload())
        dialog.open()
        self.editor = dialog


class NodeSettingsDialog(QtWidgets.QDialog):
    """Edit the remote nodes and DosePilot's own AE title; "Save" writes the settings file."""

    saved = QtCore.Signal(object)

    def __init__(self, path: Path | None = None,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("PACS and TPS nodes")
        self.resize(720, 380)
        self.path = settings_path(path)
        settings, problem = load_or_default(self.path)
        self.base = settings
        self.table = QtWidgets.QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        for name, node in sorted(settings.nodes.items()):
            self.add_row(node, name)
        self.default_combo = QtWidgets.QComboBox()
        self.local_aet = QtWidgets.QLineEdit(settings.local_aet)
        self.local_port = QtWidgets.QSpinBox()
        self.local_port.setRange(1, 65535)
        self.local_port.setValue(settings.local_port)
        self.method = QtWidgets.QComboBox()
        self.method.addItems([m.upper() for m in RETRIEVE_METHODS])
        self.method.setCurrentText(settings.retrieve_method.upper())
        self.status = QtWidgets.QLabel(problem)
        self.status.setWordWrap(True)
        add = QtWidgets.QPushButton("Add")
        add.clicked.connect(lambda: self.add_row(None, ""))
        remove = QtWidgets.QPushButton("Remove")
        remove.clicked.connect(self._remove_selected)
        self.echo_button = QtWidgets.QPushButton("Test (C-ECHO)")
        self.echo_button.clicked.connect(self.echo_selected)
        buttons = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.StandardButton.Save
                                             | QtWidgets.QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        row = QtWidgets.QHBoxLayout()
        for w in (add, remove, self.echo_button):
            row.addWidget(w)
        row.addStretch(1)
        form = QtWidgets.QFormLayout()
        form.addRow("Default node", self.default_combo)
        form.addRow("DosePilot's AE title", self.local_aet)
        form.addRow("DosePilot's port (C-MOVE destination)", self.local_port)
        form.addRow("Retrieve with", self.method)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addLayout(row)
        layout.addLayout(form)
        layout.addWidget(self.status)
        layout.addWidget(QtWidgets.QLabel(f"Saved in {self.path}"))
        layout.addWidget(buttons)
        self.table.itemChanged.connect(lambda _: self._refresh_defaults())
        self._refresh_defaults(settings.default_node)
        self.job = BackgroundJob(self)
        self.job.done.connect(self._echoed)

    def add_row(self, node: RemoteNode | None, name: str) -> int:
        """Append a row (empty for a new node); returns its index."""
        r = self.table.rowCount()
        self.table.insertRow(r)
        values = (name, node.aet if node else "", node.host if node else "",
                  str(node.port) if node else "104")
        for c, value in enumerate(values):
            self.table.setItem(r, c, QtWidgets.QTableWidgetItem(value))
        tls = QtWidgets.QTableWidgetItem()
        tls.setFlags(tls.flags() | QtCore.Qt.ItemFlag.ItemIsUserCheckable)
        tls.setCheckState(QtCore.Qt.CheckState.Checked if node is not None and node.tls
                          else QtCore.Qt.CheckState.Unchecked)
        self.table.setItem(r, 4, tls)
        return r

    def set_row(self, row: int, name: str, aet: str, host: str, port: int,
                tls: bool = False) -> None:
        """Fill a row (as a user would type it)."""
        for c, value in enumerate((name, aet, host, str(port))):
            self.table.item(row, c).setText(value)
        self.table.item(row, 4).setCheckState(
            QtCore.Qt.CheckState.Checked if tls else QtCore.Qt.CheckState.Unchecked)

    def _remove_selected(self) -> None:
        for r in sorted({i.row() for i in self.table.selectedIndexes()}, reverse=True):
            self.table.removeRow(r)
        self._refresh_defaults()

    def _names(self) -> list[str]:
        return [self.table.item(r, 0).text().strip() for r in range(self.table.rowCount())
                if self.table.item(r, 0) and self.table.item(r, 0).text().strip()]

    def _refresh_defaults(self, wanted: str | None = None) -> None:
        current = wanted if wanted is not None else self.default_combo.currentText()
        self.default_combo.blockSignals(True)
        self.default_combo.clear()
        self.default_combo.addItems(self._names())
        if current in self._names():
            self.default_combo.setCurrentText(current)
        self.default_combo.blockSignals(False)

    def _row_node(self, r: int) -> RemoteNode:
        text = [self.table.item(r, c).text().strip() for c in range(4)]
        name = text[0]
        if not name:
            raise UserError(f"row {r + 1}: the node needs a name")
        tls = self.table.item(r, 4).checkState() == QtCore.Qt.CheckState.Checked
        try:
            return RemoteNode(text[1], text[2], check_port(text[3]), tls, name=name)
        except UserError as exc:
            raise UserError(f"node {name!r}: {exc}") from None

    def settings(self) -> PacsSettings:
        """The settings as edited; a :class:`UserError` naming the bad field."""
        nodes = {}
        for r in range(self.table.rowCount()):
            node = self._row_node(r)
            if node.name in nodes:
                raise UserError(f"two nodes are named {node.name!r}")
            nodes[node.name] = node
        return dataclasses.replace(
            self.base, nodes=nodes, default_node=self.default_combo.currentText()
            if self.default_combo.currentText() in nodes else next(iter(nodes), ""),
            local_aet=check_aet(self.local_aet.text(), "DosePilot's AE title"),
            local_port=self.local_port.value(), retrieve_method=self.method.currentText().lower())

    def save(self) -> None:
        """Write the settings file and close, or say what is wrong and stay open."""
        try:
            settings = self.settings()
            save_settings(settings, self.path)
        except (UserError, OSError) as exc:
            self.status.setText(f"Not saved: {exc}")
            self.status.setStyleSheet("color: #a33;")
            return
        self.saved.emit(settings)
        self.accept()

    def echo_selected(self) -> None:
        """C-ECHO the selected node (off the UI thread); the result shows in the status line."""
        from engine.pacs.association import Client, echo

        rows = sorted({i.row() for i in self.table.selectedIndexes()}) or [0]
        try:
            node = self._row_node(rows[0])
            client = Client.from_settings(self.settings())
        except (UserError, IndexError, AttributeError) as exc:
            self.status.setText(str(exc) or "no node to test")
            return
        self.status.setStyleSheet("")
        self.status.setText(f"Testing {node} …")
        self.job.start(lambda: echo(node, client))

    def _echoed(self, result: object, error: object) -> None:
        if error is not None:
            self.status.setStyleSheet("color: #a33;")
            self.status.setText(str(error))
        else:
            self.status.setStyleSheet("color: #3a3;")
            self.status.setText(f"{result.node} answers ({result.seconds * 1000:.0f} ms)")
