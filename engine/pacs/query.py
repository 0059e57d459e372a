"""C-FIND at patient, study and series level.

:func:`find` returns plain dicts (keyword -> str or int), one per match, sorted; patient level
uses the Patient Root information model, study and series level the Study Root one. A series
query first finds the matching studies, then asks for each one's series.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass
from typing import Any

from engine.errors import UserError
from engine.pacs.association import Client, associate, response_error
from engine.pacs.errors import OperationFailed
from engine.pacs.nodes import RemoteNode

LEVELS = ("PATIENT", "STUDY", "SERIES")
RETURN_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies"),
    "STUDY": ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyTime",
              "StudyDescription", "AccessionNumber", "StudyID", "ModalitiesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
               "SeriesDescription", "NumberOfSeriesRelatedInstances"),
}
_COUNTS = {"NumberOfPatientRelatedStudies", "NumberOfStudyRelatedSeries",
           "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances", "SeriesNumber"}
_DICOM_DATE = re.compile(r"^\d{8}$")


def _date(text: str) -> str:
    text = text.strip()
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(text, fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    raise UserError(f"{text!r} is not a date: use YYYYMMDD or YYYY-MM-DD")


def parse_date_range(text: str) -> str:
    """A study date or range as DICOM writes it: ``20240101``, ``20240101-20240131``,
    ``20240101-`` (from), ``-20240131`` (until); ISO dates with ``..`` work too
    (``2024-01-01..2024-01-31``, ``2024-01-01..``)."""
    text = (text or "").strip()
    if not text:
        return ""
    if ".." in text:
        lo, _, hi = text.partition("..")
    elif "-" in text and not re.match(r"^\d{4}-\d{2}-\d{2}$", text):
        lo, _, hi = text.partition("-")
    else:
        return _date(text)
    lo = _date(lo) if lo.strip() else ""
    hi = _date(hi) if hi.strip() else ""
    if not lo and not hi:
        raise UserError(f"{text!r} is not a date range")
    if lo and hi and lo > hi:
        raise UserError(f"date range {text!r} ends before it starts")
    return f"{lo}-{hi}"


@dataclass(frozen=True)
class FindQuery:
    """What to look for. Empty fields match anything; ``patient_id`` and ``patient_name``
    take DICOM wildcards (``*``, ``?``), ``study_date`` a date or range (see
    :func:`parse_date_range`)."""

    level: str = "STUDY"
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    study_uid: str = ""
    modality: str = ""

    def __post_init__(self) -> None:
        level = self.level.upper()
        if level not in LEVELS:
            raise UserError(f"query level must be one of {', '.join(LEVELS).lower()}, "
                            f"got {self.level!r}")
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "study_date", parse_date_range(self.study_date))


def _identifier(query: FindQuery, level: str, study_uid: str = "") -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key in RETURN_KEYS[level]:
        setattr(ds, key, "" if key not in _COUNTS else None)
    if level in ("PATIENT", "STUDY"):
        ds.PatientID = query.patient_id
        ds.PatientName = query.patient_name
    if level == "STUDY":
        ds.StudyDate = query.study_date
        ds.StudyInstanceUID = study_uid or query.study_uid
        if query.modality:
            ds.ModalitiesInStudy = query.modality
    if level == "SERIES":
        ds.StudyInstanceUID = study_uid
        ds.Modality = query.modality
    return ds


def _value(ds: Any, key: str) -> str | int | None:
    if key not in ds or ds[key].value in (None, ""):
        return None if key in _COUNTS else ""
    value = ds[key].value
    if key in _COUNTS:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _run(assoc: Any, node: RemoteNode, client: Client, model: Any, identifier: Any,
         level: str) -> list[dict[str, Any]]:
    from engine.pacs.sop import is_failure, status_text

    out = []
    t0 = time.monotonic()
    for status, ds in assoc.send_c_find(identifier, model):
        if "Status" not in status:
            raise response_error(assoc, node, client, f"the {level.lower()}-level C-FIND",
                                 time.monotonic() - t0)
        code = int(status.Status)
        if code in (0xFF00, 0xFF01) and ds is not None:
            out.append({k: _value(ds, k) for k in RETURN_KEYS[level]})
        elif is_failure(code):
            raise OperationFailed(f"{node} refused the {level.lower()}-level C-FIND: "
                                  f"{status_text(code)}"
                                  + (f" ({status.ErrorComment})" if "ErrorComment" in status
                                     else ""))
        t0 = time.monotonic()
    return out


def find(node: RemoteNode, client: Client, query: FindQuery) -> list[dict[str, Any]]:
    """The matches of ``query`` on ``node`` (see the module docstring)."""
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import (
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
    )

    patient_root = PatientRootQueryRetrieveInformationModelFind
    study_root = StudyRootQueryRetrieveInformationModelFind
    contexts = [build_context(patient_root), build_context(study_root)]
    with associate(node, client, contexts) as assoc:
        if query.level == "PATIENT":
            rows = _run(assoc, node, client, patient_root, _identifier(query, "PATIENT"),
                        "PATIENT")
            return sorted(rows, key=lambda r: (r["PatientID"], r["PatientName"]))
        if query.level == "STUDY":
            rows = _run(assoc, node, client, study_root, _identifier(query, "STUDY"), "STUDY")
            return sorted(rows, key=lambda r: (r["PatientID"], r["StudyDate"],
                                               r["StudyTime"], r["StudyInstanceUID"]))
        # strictly hierarchical: the studies first, then each study's series (its UID the
        # only key above series level); the rows get the study's Patient ID
        studies = _run(assoc, node, client, study_root, _identifier(query, "STUDY"), "STUDY")
        rows = []
        for study in studies:
            for row in _run(assoc, node, client, study_root,
                            _identifier(query, "SERIES", study["StudyInstanceUID"]), "SERIES"):
                rows.append({"PatientID": study["PatientID"], **row})
        return sorted(rows, key=lambda r: (r["PatientID"], r["StudyInstanceUID"],
                                           r["SeriesNumber"] or 0, r["SeriesInstanceUID"]))
