"""The window's PACS menu entries: Open from PACS…, Send to PACS… (the last export) and PACS
nodes…, added to a menu by :func:`install_pacs_actions` so the main window needs one line.

A study retrieved by "Open from PACS" opens like any folder (``MainWindow.open_path``);
"Send to PACS" becomes available once something was exported (``MainWindow.exported``) and sends
that export's DICOM files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6 import QtCore, QtGui, QtWidgets

from planner_gui.pacs_dialog import OpenFromPacsDialog
from planner_gui.pacs_nodes import NodeSettingsDialog
from planner_gui.pacs_send import SendToPacsDialog


def default_store_root() -> Path:
    """Where the GUI keeps retrieved studies (the application's data folder)."""
    base = QtCore.QStandardPaths.writableLocation(
        QtCore.QStandardPaths.StandardLocation.AppDataLocation)
    return Path(base or ".") / "pacs-studies"


class PacsActions(QtCore.QObject):
    """The three actions and the dialogs they open (kept as attributes while open)."""

    def __init__(self, window: Any, menu: QtWidgets.QMenu) -> None:
        super().__init__(window)
        self.window = window
        self.settings_path: Path | None = None  # None: engine.pacs.nodes.settings_path()
        self.store_root = default_store_root()
        self.last_export: Any = None
        self.open_dialog_: OpenFromPacsDialog | None = None
        self.send_dialog_: SendToPacsDialog | None = None
        self.open_action = QtGui.QAction("Open from PACS…", window)
        self.open_action.setToolTip("Search a PACS or TPS, retrieve a study and open it")
        self.open_action.triggered.connect(lambda _=False: self.open_dialog())
        self.send_action = QtGui.QAction("Send to PACS…", window)
        self.send_action.setToolTip("Send the last export (RTPLAN + RTDOSE) to a PACS or TPS")
        self.send_action.setEnabled(False)
        self.send_action.triggered.connect(lambda _=False: self.send_dialog())
        self.nodes_action = QtGui.QAction("PACS nodes…", window)
        self.nodes_action.triggered.connect(lambda _=False: self.nodes_dialog())
        menu.addSeparator()
        for action in (self.open_action, self.send_action, self.nodes_action):
            menu.addAction(action)
        window.exported.connect(self._exported)

    def open_dialog(self) -> OpenFromPacsDialog:
        """Show the search-and-retrieve dialog; a retrieved study opens in the window."""
        dialog = OpenFromPacsDialog(self.store_root, self.settings_path, self.window)
        dialog.setAttribute(QtCore.Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.study_ready.connect(self.window.open_path)
        dialog.open()
        self.open_dialog_ = dialog
        return dialog

    def _exported(self, files: Any) -> None:
        self.last_export = files
        self.send_action.setEnabled(True)
        self.window.statusBar().showMessage(
            f"Exported to {files.folder}; File > Send to PACS… sends it to a PACS or TPS")

    def export_paths(self) -> list[Path]:
        """The DICOM files of the last export."""
        files = self.last_export
        if files is None:
            return []
        if files.whole_case:
            return [files.folder]
        return [p for p in (files.rtplan, files.rtdose) if p is not None]

    def send_dialog(self, paths: list[Path] | None = None) -> SendToPacsDialog | None:
        """Show the send dialog for ``paths`` (default: the last export)."""
        paths = paths or self.export_paths()
        if not paths:
            return None
        dialog = SendToPacsDialog(paths, self.settings_path, self.window)
        dialog.setAttribute(QtCore.Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.sent.connect(lambda report: self.window.statusBar().showMessage(
            f"Sent {len(report.results) - len(report.failed)} file(s) to {report.node}"))
        dialog.open()
        self.send_dialog_ = dialog
        return dialog

    def nodes_dialog(self) -> NodeSettingsDialog:
        """Show the node settings dialog."""
        dialog = NodeSettingsDialog(self.settings_path, self.window)
        dialog.setAttribute(QtCore.Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()
        return dialog


def install_pacs_actions(window: Any, menu: QtWidgets.QMenu) -> PacsActions:
    """Add the PACS actions to ``menu`` of ``window`` (a :class:`MainWindow`)."""
    return PacsActions(window, menu)
