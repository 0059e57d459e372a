"""The local study store: what DosePilot receives or retrieves, one folder per patient and study.

Layout::

    STORE/<patient>/<study>/<MODALITY>_<SOPInstanceUID>.dcm
    STORE/<patient>/<study>/study.json        (who, what, and a SHA-256 per object)

``<patient>`` is the Patient ID made safe for a file name (with a short hash of the real ID
when it had to be changed, so two IDs never share a folder); ``<study>`` is the Study Instance
UID. Patient folders never start with ``.`` or ``_``: those names are left to DosePilot.

Objects of a study arrive into a :class:`Staging` folder, a hidden temporary that the DICOM
loader never reads (:func:`engine.durable.is_temporary`); :meth:`Staging.commit` moves them
into the study folder once the study is complete (a retrieve that finished, a sender that went
quiet). So a half-received study is never opened as a complete patient: it is not in the
store. A study folder that does not exist yet appears in one rename; objects added to an
existing one are moved in one by one and its ``study.json`` is rewritten last.

Nothing is ever overwritten: the same object received twice (same name, same bytes) is kept
once; a different object under a name that is taken (a SOP Instance UID reused for different
content) is stored under a new name (``..._2.dcm``) and reported.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.durable import TEMP_MARK, file_sha256, fsync_path, remove_stale_temporaries, write_text
from engine.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "study.json"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_counter = itertools.count(1)


class RejectedObject(Exception):
    """A received object the store does not take; ``status`` is the DIMSE failure status to
    answer with (0xA900 data set does not match, 0xC000 cannot understand, 0xA700 out of
    resources)."""

    def __init__(self, reason: str, status: int = 0xC000) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class StoreConflict(UserError):
    """A study cannot be committed: its folder belongs to another patient."""


def _safe(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:limit]


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def patient_folder_name(patient_id: str) -> str:
    """The folder name of a patient (see the module docstring)."""
    safe = _safe(patient_id)
    if safe == patient_id and safe:
        return safe
    return f"{safe or 'patient'}_{_short_hash(patient_id)}"


def study_folder_name(study_uid: str) -> str:
    """The folder name of a study: its UID when it is a well-formed one."""
    if _UID.match(study_uid) and len(study_uid) <= 64:
        return study_uid
    return f"{_safe(study_uid) or 'study'}_{_short_hash(study_uid)}"


@dataclass(frozen=True)
class ObjectInfo:
    """The identifiers of one stored object."""

    sop_class_uid: str
    sop_instance_uid: str
    modality: str
    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    study_date: str
    study_description: str
    sha256: str

    @property
    def file_name(self) -> str:
        """``<MODALITY>_<SOPInstanceUID>.dcm``."""
        return f"{_safe(self.modality, 16) or 'OBJ'}_{_safe(self.sop_instance_uid, 80)}.dcm"



ObjectCheck = Callable[[Any], "str | None"]


def inspect_object(path: Path, check: ObjectCheck | None = None) -> ObjectInfo:
    """The identifiers of the DICOM file ``path``; :class:`RejectedObject` when it is not
    DICOM, is truncated or corrupt, lacks the identifiers a store needs, or ``check`` (given
    the pydicom data set) returns a reason to refuse it."""
    from pydicom.uid import UID

    from engine.io.dicom_scan import read_object

    obj = read_object(path)
    if obj is None:
        raise RejectedObject("not a DICOM data set", 0xC000)
    if isinstance(obj, str):
        raise RejectedObject(obj, 0xC000)
    ds = obj.ds
    sop_class = str(ds.get("SOPClassUID", "") or "")
    missing = [k for k, v in (("SOPClassUID", sop_class),
                              ("SOPInstanceUID", obj.sop_instance_uid),
                              ("StudyInstanceUID", obj.study_uid),
                              ("SeriesInstanceUID", obj.series_uid)) if not v]
    if missing:
        raise RejectedObject(f"lacks {', '.join(missing)}", 0xA900)
    bad = [k for k, v in (("SOPClassUID", sop_class), ("SOPInstanceUID", obj.sop_instance_uid),
                          ("StudyInstanceUID", obj.study_uid),
                          ("SeriesInstanceUID", obj.series_uid))
           if not UID(v).is_valid]
    if bad:
        raise RejectedObject(f"invalid {', '.join(bad)}", 0xA900)
    if check is not None:
        try:
            problem = check(ds)
        except Exception as exc:  # noqa: BLE001 - a value pydicom cannot convert, ...
            problem = f"cannot be read ({type(exc).__name__}: {exc})"
        if problem:
            raise RejectedObject(problem, 0xA900)
    return ObjectInfo(
        sop_class_uid=sop_class, sop_instance_uid=obj.sop_instance_uid,
        modality=obj.modality or "", patient_id=str(ds.get("PatientID", "") or ""),
        patient_name=str(ds.get("PatientName", "") or ""), study_uid=obj.study_uid,
        series_uid=obj.series_uid, study_date=str(ds.get("StudyDate", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""), sha256=file_sha256(path))


@dataclass(frozen=True)
class AddResult:
    """What happened to an added object: "stored", "duplicate" (already there, same bytes) or
    "renamed" (its usual name held a different object)."""

    status: str
    name: str
    info: ObjectInfo


@dataclass(frozen=True)
class CommittedStudy:
    """A study now complete in the store."""

    folder: Path
    patient_id: str
    patient_name: str
    study_uid: str
    added: tuple[str, ...]
    duplicates: int
    renamed: tuple[tuple[str, str], ...]
    total: int
    modalities: dict[str, int] = field(default_factory=dict)
    added_modalities: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {"folder": str(self.folder), "patient_id": self.patient_id,
                "patient_name": self.patient_name, "study_instance_uid": self.study_uid,
                "added": len(self.added), "duplicates": self.duplicates,
                "renamed": [list(r) for r in self.renamed], "objects": self.total,
                "modalities": self.modalities, "added_modalities": self.added_modalities}


def _count(values: Iterator[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _free_name(name: str, taken: set[str]) -> str:
    stem, suffix = name.rsplit(".", 1)
    n = 2
    while f"{stem}_{n}.{suffix}" in taken:
        n += 1
    return f"{stem}_{n}.{suffix}"


def _entry(info: ObjectInfo) -> dict[str, str]:
    return {"sop_instance_uid": info.sop_instance_uid, "sop_class_uid": info.sop_class_uid,
            "modality": info.modality, "series_instance_uid": info.series_uid,
            "sha256": info.sha256}


class Staging:
    """The objects of one study while they arrive (thread-safe); see the module docstring."""

    def __init__(self, store: StudyStore, patient_id: str, study_uid: str) -> None:
        self.store = store
        self.patient_id = patient_id
        self.study_uid = study_uid
        name = f"{study_folder_name(study_uid)}-{next(_counter)}"
        self.folder = store.root / f".{name}{TEMP_MARK}{os.getpid()}"
        self.folder.mkdir(parents=True)
        self._lock = threading.Lock()
        self._objects: dict[str, ObjectInfo] = {}
        self.duplicates = 0
        self.renamed: list[tuple[str, str]] = []
        self.last_added = time.monotonic()
        self.closed = False

    @property
    def count(self) -> int:
        """Distinct objects received so far."""
        with self._lock:
            return len(self._objects)

    def add_bytes(self, data: bytes, check: ObjectCheck | None = None) -> AddResult:
        """Add a DICOM file's bytes (preamble and file meta included); :class:`RejectedObject`
        when it is not usable (see :func:`inspect_object`) or belongs to another patient or
        study."""
        tmp = self.folder / f".recv-{next(_counter)}{TEMP_MARK}{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise RejectedObject(f"cannot be written: {exc.strerror or exc}", 0xA700) from exc
        return self._add(tmp, check)

    def add_file(self, path: Path) -> AddResult:
        """Add a copy of the DICOM file ``path``."""
        return self.add_bytes(Path(path).read_bytes())

    def _add(self, tmp: Path, check: ObjectCheck | None) -> AddResult:
        try:
            info = inspect_object(tmp, check)
            if info.study_uid != self.study_uid:
                raise RejectedObject(f"belongs to study {info.study_uid}, not {self.study_uid}",
                                     0xA900)
            if info.patient_id != self.patient_id:
                raise RejectedObject(f"study {self.study_uid} is of patient "
                                     f"{self.patient_id!r}, this object says "
                                     f"{info.patient_id!r}", 0xA900)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            if self.closed:
                tmp.unlink(missing_ok=True)
                raise RejectedObject("the study was closed while this object arrived", 0xA700)
            name = info.file_name
            status = "stored"
            held = self._objects.get(name)
            if held is not None and held.sha256 == info.sha256:
                tmp.unlink()
                self.duplicates += 1
                status = "duplicate"
            else:
                if held is not None:
                    new = _free_name(name, set(self._objects))
                    log.warning("%s: a different object with the same name arrived; kept as %s",
                                name, new)
                    self.renamed.append((name, new))
                    name, status = new, "renamed"
                os.replace(tmp, self.folder / name)
                self._objects[name] = info
            self.last_added = time.monotonic()
        return AddResult(status, name, info)

    def discard(self) -> None:
        """Forget what arrived: the staging folder is removed, the store is unchanged."""
        with self._lock:
            self.closed = True
            shutil.rmtree(self.folder, ignore_errors=True)

    def commit(self, source: str = "") -> CommittedStudy:
        """Move the objects into the study folder (see the module docstring); an empty staging
        commits nothing and returns the study as it is."""
        with self._lock:
            self.closed = True
            objects = dict(self._objects)
        try:
            with self.store.locked():
                return self._commit(objects, source)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _commit(self, objects: dict[str, ObjectInfo], source: str) -> CommittedStudy:
        final = self.store.study_folder(self.patient_id, self.study_uid)
        manifest = self.store.manifest(final) if final.exists() else None
        if manifest is not None and manifest.get("patient_id") != self.patient_id:
            raise StoreConflict(f"{final} holds study {self.study_uid} of patient "
                                f"{manifest.get('patient_id')!r}; the objects received say "
                                f"{self.patient_id!r}: nothing was added")
        first = next(iter(objects.values()), None)
        held: dict[str, dict[str, str]] = dict((manifest or {}).get("objects", {}))
        added: list[str] = []
        renamed = list(self.renamed)
        duplicates = self.duplicates
        moves: list[tuple[str, str]] = []
        for name, info in sorted(objects.items()):
            entry = held.get(name)
            if entry is not None and entry.get("sha256") == info.sha256:
                duplicates += 1
                continue
            target = name
            if entry is not None or (final / name).exists():
                target = _free_name(name, set(held) | {p.name for p in final.glob("*")})
                log.warning("%s/%s holds a different object; the new one is kept as %s",
                            final.name, name, target)
                renamed.append((name, target))
            held[target] = _entry(info)
            moves.append((name, target))
            added.append(target)
        now = dt.datetime.now().isoformat(timespec="seconds")
        doc = dict(manifest or {})
        doc.update({
            "patient_id": self.patient_id,
            "patient_name": doc.get("patient_name") or (first.patient_name if first else ""),
            "study_instance_uid": self.study_uid,
            "study_date": doc.get("study_date") or (first.study_date if first else ""),
            "study_description": doc.get("study_description")
            or (first.study_description if first else ""),
            "updated": now,
            "objects": dict(sorted(held.items())),
        })
        if added:
            doc["history"] = list(doc.get("history", [])) + [
                {"time": now, "source": source, "added": len(added)}]
        if not final.exists() and added:
            # a new study: the whole folder appears at once
            for name, target in moves:
                if name != target:
                    os.replace(self.folder / name, self.folder / target)
            write_text(self.folder / MANIFEST, json.dumps(doc, indent=1))
            final.parent.mkdir(parents=True, exist_ok=True)
            fsync_path(self.folder)
            os.rename(self.folder, final)
            fsync_path(final.parent)
        elif added:
            for name, target in moves:
                os.replace(self.folder / name, final / target)
            fsync_path(final)
            write_text(final / MANIFEST, json.dumps(doc, indent=1))
        return CommittedStudy(final, self.patient_id, str(doc["patient_name"]), self.study_uid,
                              tuple(added), duplicates, tuple(renamed), len(held),
                              _count(e.get("modality", "") for e in held.values()),
                              _count(held[n].get("modality", "") for n in added))


class StudyStore:
    """The store rooted at ``root`` (created when missing); see the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root} is not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the study store {self.root}: "
                            f"{exc.strerror or exc}") from exc
        remove_stale_temporaries(self.root)  # what a killed receiver left half done

    def study_folder(self, patient_id: str, study_uid: str) -> Path:
        """Where a study of a patient lives (whether or not it is there yet)."""
        return self.root / patient_folder_name(patient_id) / study_folder_name(study_uid)

    def begin(self, patient_id: str, study_uid: str) -> Staging:
        """A new staging area for objects of one study."""
        return Staging(self, patient_id, study_uid)

    @staticmethod
    def manifest(folder: Path) -> dict[str, Any] | None:
        """A study folder's ``study.json`` (None when it has none or it is unreadable)."""
        try:
            return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def studies(self) -> list[dict[str, Any]]:
        """The manifest of every study in the store, with its ``folder``."""
        out = []
        for manifest_path in sorted(self.root.glob(f"*/*/{MANIFEST}")):
            doc = self.manifest(manifest_path.parent)
            if doc is not None:
                out.append({**doc, "folder": str(manifest_path.parent)})
        return out

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (one commit at a time, across processes)."""
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
