"""Predict the dose of each study a node receives, and send the results back.

:class:`PredictionWorker` runs on one thread (the engine predicts one case at a time); the node
hands it each completed study (:meth:`PredictionWorker.submit`). For a study that brought a
CT, a structure set or a plan and now holds all three, it opens the study folder
(:func:`engine.io.dicom.load_dicom_case`), predicts (the 1-step preview or an N-step
prediction), writes the RTDOSE and the DVH report (:func:`engine.pacs.results.write_prediction`)
under ``RESULTS/<patient>/<study>/<time>/`` and, when a return node is set, sends the RTDOSE and
the report there (C-STORE). A study that still lacks one of the three waits for it
("skipped"). Every outcome, a failure included, is reported through ``on_outcome`` and logged;
a study that cannot be predicted never stops the worker.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.pacs.association import Client
from engine.pacs.errors import PacsError
from engine.pacs.nodes import RemoteNode
from engine.pacs.store import CommittedStudy, patient_folder_name, study_folder_name

log = logging.getLogger(__name__)
TRIGGERS = ("CT", "RTSTRUCT", "RTPLAN")  # what a study needs, and what makes it worth redoing


@dataclass
class PredictionOutcome:
    """What happened to one study: status "sent", "written" (no return node), "failed" or
    "skipped", with the files, timings and the send report."""

    study: CommittedStudy
    status: str
    message: str = ""
    folder: Path | None = None
    files: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    sent: dict[str, Any] | None = None
    max_gy: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {"event": "prediction", "status": self.status, "message": self.message,
                "patient_id": self.study.patient_id,
                "study_instance_uid": self.study.study_uid,
                "folder": str(self.folder) if self.folder else None, "files": self.files,
                "timings_s": self.timings_s, "sent": self.sent, "max_gy": self.max_gy}


class PredictionWorker:
    """See the module docstring. ``engine`` is a :class:`engine.runtime.DoseEngine`."""

    def __init__(self, engine: Any, results_root: Path, steps: int = 10, preview: bool = False,
                 return_to: RemoteNode | None = None, client: Client | None = None,
                 report: bool = True,
                 on_outcome: Callable[[PredictionOutcome], None] | None = None) -> None:
        self.engine = engine
        self.results_root = Path(results_root)
        self.steps = steps
        self.preview = preview
        self.return_to = return_to
        self.client = client or Client()
        self.report = report
        self.on_outcome = on_outcome
        self._queue: queue.Queue[tuple[CommittedStudy, str, float] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="prediction", daemon=True)
        self._thread.start()

    def submit(self, study: CommittedStudy, sender: str = "") -> None:
        """Queue a completed study (returns at once)."""
        self._queue.put((study, sender, time.monotonic()))

    def stop(self, timeout: float | None = None) -> None:
        """Finish the study being predicted, drop the queued ones, end the thread."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            study, sender, queued = item
            started = time.monotonic()
            try:
                outcome = self.handle(study)
            except Exception as exc:  # noqa: BLE001 - the worker must keep running
                log.exception("prediction of study %s failed", study.study_uid)
                outcome = PredictionOutcome(study, "failed", f"{type(exc).__name__}: {exc}")
            outcome.timings_s["waited"] = started - queued
            outcome.timings_s["total"] = time.monotonic() - queued
            if outcome.status == "failed":
                log.error("study %s of patient %s: %s", study.study_uid, study.patient_id,
                          outcome.message)
            else:
                log.info("study %s of patient %s: %s", study.study_uid, study.patient_id,
                         outcome.message)
            if self.on_outcome is not None:
                try:
                    self.on_outcome(outcome)
                except Exception:  # noqa: BLE001
                    log.exception("outcome callback failed")

    def handle(self, study: CommittedStudy) -> PredictionOutcome:
        """Predict, write and send back one study (on the caller's thread)."""
        from engine.io.dicom import DicomImportError, load_dicom_case
        from engine.pacs.results import write_prediction

        if not any(m in study.added_modalities for m in TRIGGERS):
            return PredictionOutcome(study, "skipped", "no new CT, RTSTRUCT or RTPLAN: "
                                     "nothing to predict")
        lacking = [m for m in TRIGGERS if not study.modalities.get(m)]
        if lacking:
            return PredictionOutcome(study, "skipped", f"the study has no {' or '.join(lacking)} "
                                     "yet; it is predicted when that arrives")
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        try:
            case = load_dicom_case(study.folder)
        except DicomImportError as exc:
            return PredictionOutcome(study, "failed", f"cannot open the study: {exc}")
        timings["load"] = time.monotonic() - t0
        if case.plan is None or not case.plan.beams:
            return PredictionOutcome(study, "failed", "the study has no RTPLAN with treatment "
                                     "beams (send the plan too)", timings_s=timings)
        if not case.targets:
            return PredictionOutcome(study, "failed", "the structure set has no target (PTV)",
                                     timings_s=timings)
        t1 = time.monotonic()
        result = (self.engine.preview(case) if self.preview
                  else self.engine.predict(case, steps=self.steps))
        timings["predict"] = time.monotonic() - t1
        t2 = time.monotonic()
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        folder = (self.results_root / patient_folder_name(study.patient_id)
                  / study_folder_name(study.study_uid) / stamp)
        model = getattr(getattr(self.engine, "model", None), "path", None)
        files = write_prediction(case, result, folder, str(model) if model else None,
                                 report=self.report)
        timings["write"] = time.monotonic() - t2
        outcome = PredictionOutcome(study, "written", "", folder,
                                    sorted(p.name for p in folder.iterdir()), timings,
                                    max_gy=float(result.dose.array.max()))
        kind = "preview" if self.preview else f"{self.steps}-step prediction"
        outcome.message = f"{kind}, max {outcome.max_gy:.1f} Gy, written to {folder}"
        if self.return_to is not None:
            from engine.pacs.send import collect_files, send_files

            t3 = time.monotonic()
            items, _ = collect_files(files.dicom)
            try:
                report = send_files(self.return_to, self.client, items)
            except PacsError as exc:
                outcome.status = "failed"
                outcome.message += f"; sending it to {self.return_to} failed: {exc}"
                return outcome
            timings["send"] = time.monotonic() - t3
            outcome.sent = report.to_json()
            if report.failed:
                outcome.status = "failed"
                outcome.message += (f"; {self.return_to} refused "
                                    + ", ".join(f"{r.item.path.name} ({r.message})"
                                                for r in report.failed))
            else:
                outcome.status = "sent"
                outcome.message += f"; sent to {self.return_to}"
        return outcome
