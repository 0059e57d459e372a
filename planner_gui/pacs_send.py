"""File > Send to PACS: C-STORE the last export (the edited RTPLAN and the predicted RTDOSE, or
a whole study) to a node, with progress and a result per file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6 import QtCore, QtWidgets

from planner_gui.pacs_nodes import NodePicker
from planner_gui.pacs_work import BackgroundJob


class SendToPacsDialog(QtWidgets.QDialog):
    """Send ``paths`` (files or folders) to the chosen node; ``sent(report)`` when done."""

    sent = QtCore.Signal(object)

    def __init__(self, paths: list[Path], settings: Path | None = None,
                 parent: QtWidgets.QWidget | None = None) -> None:
        from engine.pacs.send import collect_files

        super().__init__(parent)
        self.setWindowTitle("Send to PACS")
        self.resize(640, 360)
        self.items, skipped = collect_files(paths)
        self.report: Any = None
        self.last_error = ""
        self.picker = NodePicker(settings)
        self.picker.changed.connect(self._update_buttons)
        self.files = QtWidgets.QListWidget()
        for item in self.items:
            self.files.addItem(f"{item.modality or '?'}  {item.path.name}  ({item.path.parent})")
        self.progress = QtWidgets.QProgressBar()
        self.progress.setRange(0, max(len(self.items), 1))
        self.progress.setValue(0)
        self.progress.setFormat("%v of %m files")
        self.status = QtWidgets.QLabel(
            f"{len(self.items)} DICOM file(s) to send"
            + (f"; {len(skipped)} other file(s) left out" if skipped else ""))
        self.status.setWordWrap(True)
        self.send_button = QtWidgets.QPushButton("Send")
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.send)
        close = QtWidgets.QPushButton("Close")
        close.clicked.connect(self.reject)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.progress, 1)
        row.addWidget(self.send_button)
        row.addWidget(close)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(self.picker)
        layout.addWidget(self.files, 1)
        layout.addWidget(self.status)
        layout.addLayout(row)
        self.job = BackgroundJob(self)
        self.job.progressed.connect(lambda n: self.progress.setValue(int(n)))
        self.job.done.connect(self._done)
        self._update_buttons()

    def _update_buttons(self) -> None:
        self.send_button.setEnabled(bool(self.items) and self.picker.node() is not None
                                    and not self.job.running)

    def send(self) -> None:
        """C-STORE the files to the chosen node (off the UI thread)."""
        from engine.pacs.association import Client
        from engine.pacs.send import send_files

        node = self.picker.node()
        if node is None or not self.items or self.job.running:
            return
        client = Client.from_settings(self.picker.settings)
        done = [0]

        def progress(_result: Any) -> None:
            done[0] += 1
            self.job.report(done[0])

        self.status.setStyleSheet("")
        self.status.setText(f"Sending to {node} …")
        self.job.start(lambda: send_files(node, client, self.items, progress))
        self._update_buttons()

    def _done(self, report: Any, error: Any) -> None:
        self._update_buttons()
        if error is not None:
            self.last_error = str(error)
            self.status.setStyleSheet("color: #a33;")
            self.status.setText(f"Not sent: {error}")
            return
        self.report = report
        failed = report.failed
        self.progress.setValue(len(report.results))
        if failed:
            self.last_error = "; ".join(f"{r.item.path.name}: {r.message}" for r in failed)
            self.status.setStyleSheet("color: #a33;")
            self.status.setText(f"{len(failed)} of {len(self.items)} file(s) were refused: "
                                + self.last_error)
        else:
            self.status.setStyleSheet("color: #3a3;")
            self.status.setText(f"All {len(self.items)} file(s) stored on {report.node}")
        self.sent.emit(report)
