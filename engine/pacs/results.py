"""What DosePilot sends back after predicting a received study: the RTDOSE and a DVH report.

* the RTDOSE (:func:`engine.io.dicom_export.write_rtdose`) is in the patient's study and frame
  of reference and refers to the RTPLAN it was predicted for;
* the report (dose slices with contours and the DVHs, :func:`engine.reports.write_report_figure`
  as a PDF) travels as an Encapsulated PDF object (DICOM PS3.3 A.45.1) in the same study, with
  the RTDOSE as its source instance, so any PACS or TPS can show it;
* ``dvh.csv`` and ``metrics.json`` stay next to them for the physicist.

:func:`write_prediction` writes them into a new folder that appears only when complete.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from engine.case import Case
from engine.durable import remove_stale_temporaries, replacing, write_text
from engine.io.dicom_export import write_rtdose
from engine.io.dicom_modules import (
    RT_DOSE_STORAGE,
    add_equipment,
    add_patient_study_series,
    ensure_refs,
    new_dataset,
    referenced,
    save,
)
from engine.pacs.sop import ENCAPSULATED_PDF_STORAGE

if TYPE_CHECKING:  # the runtime (torch) is not needed to write results
    from engine.runtime import DoseResult


def encapsulated_pdf(case: Case, pdf: bytes, title: str,
                     source_sop_instance_uid: str | None = None) -> Dataset:
    """An Encapsulated PDF object holding ``pdf``, in the case's patient and study."""
    refs = ensure_refs(case).refs
    uid = generate_uid()
    ds = new_dataset(ENCAPSULATED_PDF_STORAGE, uid)
    now = dt.datetime.now()
    add_patient_study_series(ds, refs, "DOC", generate_uid(), 5, "DosePilot DVH report")
    add_equipment(ds)
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = Sequence([])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    if source_sop_instance_uid:
        ds.SourceInstanceSequence = Sequence([referenced(RT_DOSE_STORAGE,
                                                         source_sop_instance_uid)])
    data = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocument = data
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds


@dataclass(frozen=True)
class PredictionFiles:
    """What :func:`write_prediction` wrote, and the UIDs of the DICOM objects."""

    folder: Path
    rtdose: Path
    rtdose_uid: str
    report: Path | None
    report_uid: str | None

    @property
    def dicom(self) -> list[Path]:
        """The DICOM files to send back."""
        return [p for p in (self.rtdose, self.report) if p is not None]


def write_prediction(case: Case, result: DoseResult, folder: Path, model: str | None = None,
                     report: bool = True) -> PredictionFiles:
    """Write ``RTDOSE.dcm`` (referring to the case's plan), ``REPORT.dcm`` (Encapsulated PDF,
    unless ``report`` is False), ``report.pdf``, ``dvh.csv`` and ``metrics.json`` into
    ``folder``, which must not exist yet and appears only when everything is written."""
    from engine.reports import metrics_document, write_dvh_csv, write_report_figure

    case = ensure_refs(case)
    plan_uid = case.refs.plan_sop_instance_uid
    if not plan_uid:
        raise ValueError(f"{case.name}: no RTPLAN to refer the dose to")
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists already")
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder.parent)
    what = "preview (1 step)" if result.kind == "preview" else f"prediction ({result.steps} steps)"
    report_uid = None
    with replacing(folder) as tmp:
        tmp.mkdir()
        dose_uid = write_rtdose(result.dose, case, tmp / "RTDOSE.dcm",
                                plan_sop_instance_uid=plan_uid,
                                description=f"DosePilot {what}")
        write_dvh_csv(result, tmp / "dvh.csv")
        write_text(tmp / "metrics.json", json.dumps(metrics_document(case, result, model),
                                                    indent=2))
        if report:
            pdf = write_report_figure(case, result, tmp / "report.pdf")
            ds = encapsulated_pdf(case, pdf.read_bytes(), f"DosePilot DVH report, {what}",
                                  dose_uid)
            report_uid = str(ds.SOPInstanceUID)
            save(ds, tmp / "REPORT.dcm")
    return PredictionFiles(folder, folder / "RTDOSE.dcm", dose_uid,
                           folder / "REPORT.dcm" if report else None, report_uid)
