"""File > Open from PACS: search a node for studies, retrieve one with progress, then open it.

The search is a study-level C-FIND (:func:`engine.pacs.query.find`); the retrieve
(:func:`engine.pacs.retrieve.retrieve_study`, C-MOVE or C-GET as the settings say) fills the
local study store, and only a study that arrived whole is handed on (``study_ready``): an
interrupted or cancelled retrieve adds nothing to the store and says how far it got.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6 import QtCore, QtWidgets

from engine.errors import UserError
from engine.pacs.query import FindQuery
from planner_gui.pacs_nodes import NodePicker
from planner_gui.pacs_work import BackgroundJob

COLUMNS = (("PatientID", "Patient ID"), ("PatientName", "Name"), ("StudyDate", "Date"),
           ("StudyDescription", "Description"), ("ModalitiesInStudy", "Modalities"),
           ("NumberOfStudyRelatedInstances", "Objects"))


class OpenFromPacsDialog(QtWidgets.QDialog):
    """Search, pick a study, retrieve it into ``store_root``; ``study_ready(folder)`` then."""

    study_ready = QtCore.Signal(str)

    def __init__(self, store_root: str | Path, settings: Path | None = None,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Open from PACS")
        self.resize(900, 520)
        self.store_root = Path(store_root)
        self.results: list[dict[str, Any]] = []
        self.last_error = ""
        self.picker = NodePicker(settings)
        self.picker.changed.connect(self._update_buttons)
        self.id_edit = QtWidgets.QLineEdit()
        self.id_edit.setPlaceholderText("e.g. 12345 or 123*")
        self.name_edit = QtWidgets.QLineEdit()
        self.name_edit.setPlaceholderText("e.g. DOE* (DICOM wildcards * and ?)")
        self.date_edit = QtWidgets.QLineEdit()
        self.date_edit.setPlaceholderText("YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYY-MM-DD..YYYY-MM-DD")
        self.search_button = QtWidgets.QPushButton("Search")
        self.search_button.setDefault(True)
        self.search_button.clicked.connect(self.search)
        for edit in (self.id_edit, self.name_edit, self.date_edit):
            edit.returnPressed.connect(self.search)
        self.table = QtWidgets.QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([h for _, h in COLUMNS])
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.table.itemDoubleClicked.connect(lambda _: self.retrieve_selected())
        self.retrieve_button = QtWidgets.QPushButton("Retrieve and open")
        self.retrieve_button.clicked.connect(self.retrieve_selected)
        self.cancel_button = QtWidgets.QPushButton("Cancel retrieve")
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QtWidgets.QProgressBar()
        self.progress.setVisible(False)
        self.status = QtWidgets.QLabel()
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)

        form = QtWidgets.QFormLayout()
        form.addRow("Patient ID", self.id_edit)
        form.addRow("Patient name", self.name_edit)
        form.addRow("Study date", self.date_edit)
        search_row = QtWidgets.QHBoxLayout()
        search_row.addLayout(form, 1)
        search_row.addWidget(self.search_button, 0, QtCore.Qt.AlignmentFlag.AlignBottom)
        bottom = QtWidgets.QHBoxLayout()
        bottom.addWidget(self.progress, 1)
        bottom.addWidget(self.cancel_button)
        bottom.addWidget(self.retrieve_button)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(self.picker)
        layout.addLayout(search_row)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.status)
        layout.addLayout(bottom)

        self.find_job = BackgroundJob(self)
        self.find_job.done.connect(self._found)
        self.retrieve_job = BackgroundJob(self)
        self.retrieve_job.progressed.connect(self._progressed)
        self.retrieve_job.done.connect(self._retrieved)
        self._update_buttons()
        if not self.picker.settings.nodes:
            self._say(self.picker.problem or "No PACS node is set up yet: add one with "
                      "Nodes…", error=bool(self.picker.problem))

    # ---- state ----------------------------------------------------------------------------
    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #a33;" if error else "")
        if error:
            self.last_error = text

    def _busy(self) -> bool:
        return self.find_job.running or self.retrieve_job.running

    def _update_buttons(self) -> None:
        has_node = self.picker.node() is not None
        busy = self._busy()
        self.search_button.setEnabled(has_node and not busy)
        self.retrieve_button.setEnabled(has_node and not busy and self.selected() is not None)
        self.cancel_button.setVisible(self.retrieve_job.running)

    def _client(self) -> Any:
        from engine.pacs.association import Client

        return Client.from_settings(self.picker.settings)

    def selected(self) -> dict[str, Any] | None:
        """The study row selected in the table, or None."""
        rows = {i.row() for i in self.table.selectedIndexes()}
        return self.results[rows.pop()] if len(rows) == 1 else None

    # ---- search ---------------------------------------------------------------------------
    def search(self) -> None:
        """Start a study-level C-FIND with the fields as typed."""
        from engine.pacs.query import find

        node = self.picker.node()
        if node is None or self._busy():
            return
        try:
            query = FindQuery(level="STUDY", patient_id=self.id_edit.text().strip(),
                              patient_name=self.name_edit.text().strip(),
                              study_date=self.date_edit.text().strip())
        except UserError as exc:
            self._say(str(exc), error=True)
            return
        client = self._client()
        self._say(f"Searching {node} …")
        self.find_job.start(lambda: find(node, client, query))
        self._update_buttons()

    def _found(self, rows: Any, error: Any) -> None:
        self._update_buttons()
        if error is not None:
            self._say(f"Search failed: {error}", error=True)
            return
        self.results = list(rows)
        self.table.setRowCount(0)
        for r, row in enumerate(self.results):
            self.table.insertRow(r)
            for c, (key, _) in enumerate(COLUMNS):
                value = row.get(key)
                text = "" if value is None else str(value).replace("\\", "/")
                self.table.setItem(r, c, QtWidgets.QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        self._say(f"{len(self.results)} stud{'y' if len(self.results) == 1 else 'ies'} found"
                  + ("" if self.results else ": try a wider search"))
        if len(self.results) == 1:
            self.table.selectRow(0)
        self._update_buttons()

    # ---- retrieve -------------------------------------------------------------------------
    def retrieve_selected(self) -> None:
        """Retrieve the selected study into the store (off the UI thread)."""
        from engine.pacs.retrieve import retrieve_study
        from engine.pacs.store import StudyStore

        study, node = self.selected(), self.picker.node()
        if study is None or node is None or self._busy():
            return
        settings = self.picker.settings
        client = self._client()
        expected = study.get("NumberOfStudyRelatedInstances")
        self.progress.setRange(0, expected or 0)
        self.progress.setValue(0)
        self.progress.setFormat(f"%v of {expected} objects" if expected else "%v objects")
        self.progress.setVisible(True)
        self._say(f"Retrieving {study['PatientID']} from {node} "
                  f"({settings.retrieve_method.upper()}) …")
        job = self.retrieve_job

        def work() -> Any:
            store = StudyStore(self.store_root)
            return retrieve_study(node, client, store, str(study["PatientID"]),
                                  str(study["StudyInstanceUID"]), expected,
                                  settings.retrieve_method, settings.local_port,
                                  progress=job.report, cancel=job.cancel)

        job.start(work)
        self._update_buttons()

    def cancel(self) -> None:
        """Stop the running retrieve (nothing of it is kept)."""
        self.retrieve_job.cancel.set()
        self._say("Cancelling …")

    def _progressed(self, received: Any) -> None:
        self.progress.setValue(int(received))

    def _retrieved(self, study: Any, error: Any) -> None:
        self._update_buttons()
        if error is not None:
            self.progress.setVisible(False)
            self._say(str(error), error=True)
            return
        self.progress.setValue(study.total if self.progress.maximum() else 0)
        self._say(f"{study.total} objects in {study.folder}; opening …")
        self.study_ready.emit(str(study.folder))
        self.accept()
