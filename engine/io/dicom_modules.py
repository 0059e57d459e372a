"""Building blocks for writing DICOM: file meta, and the patient/study/series/equipment modules.

Every writer starts from :func:`new_dataset` and fills the modules shared by CT, RTSTRUCT,
RTPLAN and RTDOSE from :class:`engine.case.DicomRefs`, so that everything written for one case
links to the same patient, study and frame of reference.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from engine.case import Case, DicomRefs
from engine.durable import replacing

MANUFACTURER = "DosePilot"
SOFTWARE_VERSION = "0.1.0"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.2"


def new_dataset(sop_class_uid: str, sop_instance_uid: str | None = None) -> Dataset:
    """An empty explicit-VR little-endian dataset with file meta and the SOP Common module."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    now = dt.datetime.now()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    return ds


def ensure_refs(case: Case) -> Case:
    """The case with every identifier an export needs (new UIDs for those it lacks)."""
    r = case.refs
    refs = dataclasses.replace(
        r,
        patient_id=r.patient_id or case.name or "DOSEPILOT",
        patient_name=r.patient_name or f"{case.name or 'DOSEPILOT'}^",
        study_instance_uid=r.study_instance_uid or generate_uid(),
        frame_of_reference_uid=r.frame_of_reference_uid or generate_uid(),
        ct_series_instance_uid=r.ct_series_instance_uid or generate_uid(),
    )
    nz = case.geometry.shape[0]
    if len(refs.ct_sop_instance_uids) != nz:
        refs = dataclasses.replace(refs, ct_sop_instance_uids=tuple(generate_uid()
                                                                    for _ in range(nz)))
    return dataclasses.replace(case, refs=refs)


def add_common_modules(ds: Dataset, refs: DicomRefs, modality: str, series_uid: str,
                       series_number: int, series_description: str) -> None:
    """Patient, General Study, (RT) Series, Frame of Reference and General Equipment modules."""
    add_patient_study_series(ds, refs, modality, series_uid, series_number, series_description)
    ds.OperatorsName = ""  # General Series; an Encapsulated Document Series has none
    ds.FrameOfReferenceUID = refs.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    add_equipment(ds)


def add_equipment(ds: Dataset) -> None:
    """The General Equipment module: DosePilot and its version."""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "DosePilot"
    ds.SoftwareVersions = SOFTWARE_VERSION


def add_patient_study_series(ds: Dataset, refs: DicomRefs, modality: str, series_uid: str,
                             series_number: int, series_description: str) -> None:
    """Patient and General Study modules and the series attributes every series module has
    (an Encapsulated PDF, which has no frame of reference, stops here)."""
    now = dt.datetime.now()
    ds.PatientName = refs.patient_name
    ds.PatientID = refs.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = refs.study_instance_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description


def ds_str(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters) for ``value``."""
    for digits in range(10, 0, -1):
        text = f"{float(value):.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot write {value!r} as a DICOM decimal string")


def ds_list(values: np.ndarray | list[float] | tuple[float, ...]) -> list[str]:
    return [ds_str(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def referenced(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def save(ds: Dataset, path: str | Path, batch: bool = False) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble + file meta); parent folders are created.

    All-or-nothing (:func:`engine.durable.replacing`, see there for ``batch``): ``path`` is
    never left half written, a full disk raises :class:`engine.durable.NoSpaceError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, batch) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path
