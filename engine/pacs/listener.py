"""DosePilot as a DICOM node: a Storage SCP that takes planning studies from a TPS or PACS.

:class:`StorageNode` listens on a port under its AE title and

* accepts associations only from the configured senders (calling AE title, optionally from one
  host); anyone else gets an A-ASSOCIATE-RJ ("calling AE title not recognised"), logged with the
  calling AE title and address;
* answers C-ECHO, and C-STORE for CT, RTSTRUCT, RTPLAN and RTDOSE objects; other storage
  classes are refused with status 0x0122 (SOP class not supported), objects that are not
  usable (cannot be parsed, truncated, missing identifiers or the attributes DosePilot needs,
  identifiers that differ from the request's) with 0xA900 or 0xC000, each logged; the node keeps
  running through any of them;
* groups what arrives by study (:class:`engine.pacs.store.Staging`) and commits a study into
  the store once nothing of it has arrived for ``quiet_seconds`` (no object stored, and no data
  on an association that delivered objects of it, so a large object still in transfer keeps
  its study open): the study is then complete
  and ``on_study`` is called with it (e.g. to predict its dose, :mod:`engine.pacs.auto_predict`).

Optional TLS: pass ``tls`` files (certificate and key; with a CA, callers need a certificate
it signed).
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import UserError
from engine.pacs.association import no_delay
from engine.pacs.nodes import AllowedSender, TlsFiles, check_aet, check_port
from engine.pacs.sop import PLANNING_CLASSES, sop_name
from engine.pacs.store import CommittedStudy, RejectedObject, Staging, StoreConflict, StudyStore

log = logging.getLogger(__name__)

EventCallback = Callable[[dict[str, Any]], None]


def _uncompressed_pixels_short(ds: Any) -> str | None:
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    need = rows * cols * frames * int(ds.BitsAllocated) // 8
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        return None
    have = len(ds.PixelData)
    return f"pixel data holds {have} bytes, {need} expected" if have < need else None


def _missing(ds: Any, keywords: tuple[str, ...]) -> list[str]:
    return [k for k in keywords if k not in ds or ds[k].value in (None, "", b"")]


def planning_problem(ds: Any, modality_of_class: str) -> str | None:
    """Why a CT, RTSTRUCT, RTPLAN or RTDOSE data set cannot be used for planning, or None."""
    modality = str(ds.get("Modality", "") or "").upper()
    if modality and modality != modality_of_class:
        return f"Modality {modality} does not match its SOP class ({modality_of_class})"
    if modality_of_class == "CT":
        missing = _missing(ds, ("Rows", "Columns", "BitsAllocated", "PixelData",
                                "ImagePositionPatient", "ImageOrientationPatient",
                                "PixelSpacing", "FrameOfReferenceUID"))
        if missing:
            return f"CT image lacks {', '.join(missing)}"
        if len(ds.ImagePositionPatient) != 3 or len(ds.ImageOrientationPatient) != 6:
            return "CT image position or orientation is malformed"
        return _uncompressed_pixels_short(ds)
    if modality_of_class == "RTSTRUCT":
        missing = _missing(ds, ("StructureSetROISequence", "ROIContourSequence"))
        return f"RTSTRUCT lacks {', '.join(missing)}" if missing else None
    if modality_of_class == "RTPLAN":
        from engine.io.dicom_errors import DicomImportError
        from engine.io.dicom_rtplan import read_rtplan

        try:
            info = read_rtplan(ds)
        except DicomImportError as exc:
            return str(exc)
        return None if info.plan.beams else "RTPLAN has no treatment beam"
    if modality_of_class == "RTDOSE":
        missing = _missing(ds, ("Rows", "Columns", "BitsAllocated", "PixelData",
                                "ImagePositionPatient", "ImageOrientationPatient",
                                "PixelSpacing", "DoseGridScaling", "FrameOfReferenceUID"))
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            missing += _missing(ds, ("GridFrameOffsetVector",))
        if missing:
            return f"RTDOSE lacks {', '.join(missing)}"
        return _uncompressed_pixels_short(ds)
    return None


@dataclass(frozen=True)
class NodeConfig:
    """How the node presents itself and whom it accepts."""

    aet: str
    port: int
    allowed: tuple[AllowedSender, ...]
    bind: str = ""
    quiet_seconds: float = 10.0
    tls: TlsFiles | None = None
    max_associations: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "aet", check_aet(self.aet, "node AE title"))
        object.__setattr__(self, "port", check_port(self.port))
        if not self.allowed:
            raise UserError("no sender is allowed: give the calling AE titles to accept "
                            "(--allow AET or --allow AET@HOST, or listener.allowed in the "
                            "settings)")
        if self.quiet_seconds <= 0:
            raise UserError(f"the quiet period must be positive, got {self.quiet_seconds}")


@dataclass
class NodeStats:
    """Counts since the node started."""

    associations: int = 0
    rejected_associations: int = 0
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    studies: int = 0
    rejected_senders: list[str] = field(default_factory=list)


def _addresses(host: str) -> set[str]:
    """The IP addresses ``host`` stands for (itself when it is one)."""
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise UserError(f"allowed sender host {host!r} cannot be resolved: {exc.strerror}") \
            from None


class StorageNode:
    """The node; see the module docstring. ``start()`` returns at once, ``stop()`` ends it."""

    def __init__(self, config: NodeConfig, store: StudyStore,
                 on_study: Callable[[CommittedStudy, str], None] | None = None,
                 on_event: EventCallback | None = None) -> None:
        self.config = config
        self.store = store
        self.on_study = on_study
        self.on_event = on_event
        self.stats = NodeStats()
        self._allowed = [(a.aet, _addresses(a.host) if a.host else None)
                         for a in config.allowed]
        self._lock = threading.Lock()
        self._stagings: dict[str, Staging] = {}
        self._senders: dict[str, str] = {}
        self._in_flight: dict[str, int] = {}
        # per open association: when it last received data, and the studies it delivered to
        self._activity: dict[int, float] = {}
        self._delivered: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._server: Any = None
        self._watcher: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Listen; a :class:`UserError` when the port cannot be opened."""
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.presentation import build_context
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.aet)
        ae.supported_contexts = [build_context(Verification)] + list(
            AllStoragePresentationContexts)
        ae.maximum_associations = self.config.max_associations
        ae.require_called_aet = True
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 120
        ssl_context = None
        if self.config.tls is not None:
            from engine.pacs.tls import server_context

            ssl_context = server_context(self.config.tls)
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_CONN_OPEN, no_delay),
                    (evt.EVT_C_STORE, self._on_store), (evt.EVT_ESTABLISHED, self._on_established),
                    (evt.EVT_PDU_RECV, self._on_data), (evt.EVT_CONN_CLOSE, self._on_closed)]
        try:
            self._server = ae.start_server((self.config.bind, self.config.port), block=False,
                                           ssl_context=ssl_context, evt_handlers=handlers)
        except OSError as exc:
            raise UserError(f"cannot listen on port {self.config.port}: "
                            f"{exc.strerror or exc}") from exc
        self._watcher = threading.Thread(target=self._watch, name="study-completion",
                                         daemon=True)
        self._watcher.start()
        log.info("listening as %s on port %d (%s)", self.config.aet, self.config.port,
                 "TLS" if ssl_context else "no TLS")

    def stop(self) -> None:
        """Stop listening; studies still arriving are dropped (they were not complete)."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            for staging in self._stagings.values():
                staging.discard()
            self._stagings.clear()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` (True) or ``timeout`` (False)."""
        return self._stop.wait(timeout)

    # ---- events -----------------------------------------------------------------------------
    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a reporting problem must not stop the node
                log.exception("event callback failed")

    def _refusal(self, calling: str, address: str) -> tuple[int, str] | None:
        """(A-ASSOCIATE-RJ diagnostic, reason) when the caller is not allowed, else None."""
        by_aet = [hosts for aet, hosts in self._allowed if aet == calling]
        if not by_aet:
            return 0x03, "calling AE title not allowed"
        if any(hosts is None or address in hosts for hosts in by_aet):
            return None
        return 0x01, f"AE title {calling} is not allowed from {address}"

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        refusal = self._refusal(calling, address)
        if refusal is None:
            return
        diagnostic, reason = refusal
        with self._lock:
            self.stats.rejected_associations += 1
            self.stats.rejected_senders.append(f"{calling}@{address}")
        log.warning("rejected association from %s at %s:%s: %s", calling, address,
                    assoc.requestor.port, reason)
        self._emit({"event": "association_rejected", "calling_aet": calling,
                    "address": address, "reason": reason})
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    def _on_established(self, event: Any) -> None:
        with self._lock:
            self.stats.associations += 1
        log.debug("association from %s at %s", event.assoc.requestor.ae_title,
                  event.assoc.requestor.address)

    def _on_data(self, event: Any) -> None:
        self._activity[id(event.assoc)] = time.monotonic()

    def _on_closed(self, event: Any) -> None:
        with self._lock:
            self._activity.pop(id(event.assoc), None)
            self._delivered.pop(id(event.assoc), None)

    def _refuse(self, calling: str, sop_instance: str, status: int, reason: str) -> int:
        with self._lock:
            self.stats.refused += 1
        log.warning("refused object %s from %s: %s (status 0x%04X)", sop_instance or "?",
                    calling, reason, status)
        self._emit({"event": "object_refused", "calling_aet": calling,
                    "sop_instance_uid": sop_instance, "status": f"0x{status:04X}",
                    "reason": reason})
        return status

    def _on_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        request = event.request
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        try:
            return self._store(event, calling, sop_class, sop_instance)
        except RejectedObject as exc:
            return self._refuse(calling, sop_instance, exc.status, exc.reason)
        except Exception as exc:  # noqa: BLE001 - the node must keep running
            log.exception("storing %s failed", sop_instance)
            return self._refuse(calling, sop_instance, 0xA700, f"{type(exc).__name__}: {exc}")

    def _store(self, event: Any, calling: str, sop_class: str, sop_instance: str) -> int:
        import pydicom

        modality = PLANNING_CLASSES.get(sop_class)
        if modality is None:
            raise RejectedObject(f"{sop_name(sop_class)} is not used by DosePilot (it takes "
                                 "CT, RTSTRUCT, RTPLAN and RTDOSE)", 0x0122)
        data = event.encoded_dataset(include_meta=True)
        try:
            head = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                   specific_tags=["PatientID", "StudyInstanceUID"])
            patient_id = str(head.get("PatientID", "") or "")
            study_uid = str(head.get("StudyInstanceUID", "") or "")
        except Exception as exc:  # noqa: BLE001 - whatever the bytes are
            raise RejectedObject(f"cannot be parsed ({type(exc).__name__}: {exc})",
                                 0xC000) from exc
        if not study_uid:
            raise RejectedObject("lacks StudyInstanceUID", 0xA900)

        def check(ds: Any) -> str | None:
            if str(ds.get("SOPClassUID", "")) != sop_class:
                return "SOP Class UID differs from the C-STORE request's"
            if str(ds.get("SOPInstanceUID", "")) != sop_instance:
                return "SOP Instance UID differs from the C-STORE request's"
            return planning_problem(ds, modality)

        staging = self._staging_for(patient_id, study_uid, calling, id(event.assoc))
        try:
            result = staging.add_bytes(data, check)
        finally:
            with self._lock:
                self._in_flight[study_uid] -= 1
        with self._lock:
            if result.status == "duplicate":
                self.stats.duplicates += 1
            else:
                self.stats.stored += 1
        return 0x0000

    def _staging_for(self, patient_id: str, study_uid: str, calling: str,
                     assoc: int) -> Staging:
        with self._lock:
            self._delivered.setdefault(assoc, set()).add(study_uid)
            staging = self._stagings.get(study_uid)
            if staging is None:
                staging = self.store.begin(patient_id, study_uid)
                self._stagings[study_uid] = staging
                self._senders[study_uid] = calling
                self._emit({"event": "study_started", "patient_id": patient_id,
                            "study_instance_uid": study_uid, "calling_aet": calling})
            self._in_flight[study_uid] = self._in_flight.get(study_uid, 0) + 1
            return staging

    # ---- completion -------------------------------------------------------------------------
    def _last_activity(self, study_uid: str, staging: Staging) -> float:
        """When the study last received something: an object stored, or data on an association
        that delivered objects of it (a large object may take longer than the quiet period)."""
        times = [staging.last_added] + [self._activity.get(a, 0.0)
                                        for a, uids in self._delivered.items()
                                        if study_uid in uids]
        return max(times)

    def _watch(self) -> None:
        while not self._stop.wait(min(0.25, self.config.quiet_seconds / 4)):
            now = time.monotonic()
            with self._lock:
                quiet = [uid for uid, s in self._stagings.items()
                         if now - self._last_activity(uid, s) >= self.config.quiet_seconds
                         and not self._in_flight.get(uid)]
                done = [(self._stagings.pop(uid), self._senders.pop(uid, "")) for uid in quiet]
                for uid in quiet:
                    self._in_flight.pop(uid, None)
            for staging, sender in done:
                self._complete(staging, sender)

    def _complete(self, staging: Staging, sender: str) -> None:
        if staging.count == 0:
            staging.discard()
            return
        try:
            study = staging.commit(source=f"C-STORE from {sender}")
        except StoreConflict as exc:
            log.error("%s", exc)
            self._emit({"event": "study_refused", "study_instance_uid": staging.study_uid,
                        "reason": str(exc)})
            return
        except OSError as exc:
            log.error("committing study %s failed: %s", staging.study_uid, exc)
            self._emit({"event": "study_refused", "study_instance_uid": staging.study_uid,
                        "reason": str(exc)})
            return
        with self._lock:
            self.stats.studies += 1
        log.info("study %s of patient %s complete: %d new object(s) (%s), %d in the study",
                 study.study_uid, study.patient_id, len(study.added),
                 ", ".join(f"{n} {m}" for m, n in study.added_modalities.items()), study.total)
        self._emit({"event": "study_received", "calling_aet": sender, **study.to_json()})
        if self.on_study is not None:
            try:
                self.on_study(study, sender)
            except Exception:  # noqa: BLE001 - the node must keep running
                log.exception("handling study %s failed", study.study_uid)
