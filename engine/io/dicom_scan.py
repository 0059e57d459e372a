"""Find the DICOM objects in a folder tree (any file names) and read them once.

Files are opened read-only and never written. Files that are not DICOM are skipped and counted,
so the user can be told (documents such as README.md or notes.txt quietly); DICOM files that
cannot be read (truncated, corrupt) are skipped with a note naming them. Files without the
Part 10 preamble (older RT exports) are read when they start like a DICOM data set. Temporary
files of an interrupted DosePilot write (:func:`engine.durable.is_temporary`) are not read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from engine.durable import is_temporary

_DICOMDIR = "1.2.840.10008.1.3.10"
# documents that often sit next to DICOM files; when they are not DICOM they are skipped quietly
_DOCUMENT_SUFFIXES = {".md", ".txt", ".pdf", ".htm", ".html", ".json", ".csv", ".xml", ".log"}


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's value-validation warnings (invalid UIDs, odd VRs) while reading.

    Clinical files often break VR rules in harmless ways; what matters to the user is reported
    in the case's warnings instead. Like ``warnings.catch_warnings`` it changes process-wide
    state for its duration.
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
            yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class DicomObject:
    """One DICOM file and the identifiers used to group it."""

    path: Path
    ds: Dataset
    modality: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str


@dataclass(frozen=True)
class ScanResult:
    objects: tuple[DicomObject, ...]
    notes: tuple[str, ...]
    non_dicom: int


def _looks_like_raw_dataset(path: Path) -> bool:
    """True when a file without preamble starts with a plausible group 0002/0008 element."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0


def _cut_short(ds: Dataset) -> str | None:
    """The tag where the file ends early, or None.

    pydicom reads a truncated file without complaint; the last element it read (following the
    last item of nested sequences) then holds fewer bytes than its declared length.
    """
    if not len(ds):
        return None
    tag = max(ds.keys())
    el = ds.get_item(tag)
    if isinstance(el, RawDataElement):
        if el.length != 0xFFFFFFFF and el.value is not None and len(el.value) < el.length:
            return str(tag)
        return None
    if el.VR == "SQ" and el.value:
        return _cut_short(el.value[-1])
    return None


def read_object(path: Path) -> DicomObject | str | None:
    """The file as a :class:`DicomObject`, a reason string when it is broken DICOM, or None
    when it is not DICOM at all."""
    with quiet_pydicom():
        try:
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:
                if not _looks_like_raw_dataset(path):
                    return None
                ds = pydicom.dcmread(path, force=True)
            cut = _cut_short(ds)
            if cut:
                return f"truncated (the file ends inside element {cut})"
            meta_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "")) \
                if hasattr(ds, "file_meta") else ""
            if meta_class == _DICOMDIR or "DirectoryRecordSequence" in ds:
                return None
            modality = str(ds.get("Modality", "") or "").upper()
            if not modality and "SOPClassUID" not in ds:
                return "no Modality or SOPClassUID"
            obj = DicomObject(
                path=path, ds=ds, modality=modality,
                sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
                study_uid=str(ds.get("StudyInstanceUID", "") or ""),
                series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""))
        except (OSError, EOFError) as exc:
            return f"truncated or unreadable ({exc.__class__.__name__}: {exc})"
        except Exception as exc:  # pydicom raises many types on corrupt input
            return f"corrupt ({exc.__class__.__name__}: {exc})"
    return obj


def scan_folder(root: Path) -> ScanResult:
    """Read every DICOM file below ``root`` (recursively, in a stable order)."""
    objects: list[DicomObject] = []
    notes: list[str] = []
    non_dicom = 0
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_temporary(d))
        paths.extend(Path(dirpath) / f for f in sorted(filenames) if not is_temporary(f))
    for path in paths:
        if not path.is_file():
            continue
        result = read_object(path)
        if result is None:
            non_dicom += path.suffix.lower() not in _DOCUMENT_SUFFIXES
        elif isinstance(result, str):
            notes.append(f"skipped {path.relative_to(root)}: {result}")
        else:
            objects.append(result)
    return ScanResult(objects=tuple(objects), notes=tuple(notes), non_dicom=non_dicom)
