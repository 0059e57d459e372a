"""C-STORE of DICOM files to a remote node: DosePilot's results (the edited RTPLAN, the
predicted RTDOSE, a report) or any folder of DICOM files.

:func:`collect_files` finds the DICOM files among files and folders (recursively; documents and
DosePilot's temporaries are skipped); :func:`send_files` sends them over as few associations as
the 128-context limit allows, one status per file. Files are sent as they are (no re-encoding
unless the node only accepts another uncompressed transfer syntax).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.pacs.association import Client, associate, response_error
from engine.pacs.errors import PacsError
from engine.pacs.nodes import RemoteNode

log = logging.getLogger(__name__)
MAX_CLASSES_PER_ASSOCIATION = 100  # each class is one context; 128 is DICOM's limit


@dataclass(frozen=True)
class SendItem:
    """One DICOM file to send and what it is."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    modality: str


@dataclass(frozen=True)
class SendResult:
    """A file's outcome: "sent", "warning" (stored with a warning) or "failed"."""

    item: SendItem
    outcome: str
    status: int | None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {"file": str(self.item.path), "modality": self.item.modality,
                "sop_instance_uid": self.item.sop_instance_uid, "outcome": self.outcome,
                "status": None if self.status is None else f"0x{self.status:04X}",
                "message": self.message}


@dataclass
class SendReport:
    """Every file's outcome, and the files that were not DICOM."""

    node: RemoteNode
    results: list[SendResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[SendResult]:
        """The files the node did not store."""
        return [r for r in self.results if r.outcome == "failed"]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {"node": str(self.node), "sent": sum(r.outcome != "failed" for r in self.results),
                "failed": len(self.failed), "skipped": self.skipped, "seconds": self.seconds,
                "files": [r.to_json() for r in self.results]}


def _item(path: Path) -> SendItem | str:
    """The file as a :class:`SendItem`, or why it cannot be sent."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "Modality"])
    except InvalidDicomError:
        return "not a DICOM file"
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        return f"unreadable ({type(exc).__name__}: {exc})"
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "")
                                                   if meta else ""))
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta else ""
    if not sop_class or not sop_instance or not syntax:
        return "lacks SOP Class UID, SOP Instance UID or transfer syntax"
    return SendItem(path, sop_class, sop_instance, syntax, str(ds.get("Modality", "") or ""))


def collect_files(paths: Iterable[str | Path]) -> tuple[list[SendItem], list[str]]:
    """The DICOM files among ``paths`` (folders searched recursively), and notes on the files
    left out. A path that does not exist is a :class:`UserError`."""
    from engine.durable import is_temporary
    from engine.io.dicom_scan import _DOCUMENT_SUFFIXES

    items: list[SendItem] = []
    skipped: list[str] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
        if path.is_dir():
            files = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not is_temporary(d))
                files += [Path(dirpath) / f for f in sorted(filenames) if not is_temporary(f)]
        else:
            files = [path]
        for f in files:
            if f.resolve() in seen:
                continue
            seen.add(f.resolve())
            result = _item(f)
            if isinstance(result, str):
                if f.suffix.lower() not in _DOCUMENT_SUFFIXES or f == path:
                    skipped.append(f"{f}: {result}")
            else:
                items.append(result)
    return items, skipped


def _contexts(items: Sequence[SendItem]) -> list[Any]:
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom.presentation import build_context

    by_class: dict[str, set[str]] = {}
    for item in items:
        by_class.setdefault(item.sop_class_uid, set()).add(item.transfer_syntax)
    contexts = []
    for sop_class, syntaxes in sorted(by_class.items()):
        wanted = sorted(syntaxes) + [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
                                     if s not in syntaxes]
        contexts.append(build_context(sop_class, wanted))
    return contexts


def _batches(items: Sequence[SendItem]) -> list[list[SendItem]]:
    classes = sorted({i.sop_class_uid for i in items})
    out = []
    for start in range(0, len(classes), MAX_CLASSES_PER_ASSOCIATION):
        chunk = set(classes[start:start + MAX_CLASSES_PER_ASSOCIATION])
        out.append([i for i in items if i.sop_class_uid in chunk])
    return out


def _send_batch(node: RemoteNode, client: Client, items: Sequence[SendItem],
                on_done: Callable[[SendResult], None]) -> None:
    from pydicom import dcmread

    from engine.pacs.sop import sop_name, status_text

    with associate(node, client, _contexts(items)) as assoc:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        for msg_id, item in enumerate(items, start=1):
            if item.sop_class_uid not in accepted:
                on_done(SendResult(item, "failed", None,
                                   f"{node} does not accept {sop_name(item.sop_class_uid)}"))
                continue
            try:
                ds = dcmread(item.path)
            except Exception as exc:  # noqa: BLE001 - the file changed since it was listed
                on_done(SendResult(item, "failed", None, f"unreadable: {exc}"))
                continue
            t0 = time.monotonic()
            try:
                status = assoc.send_c_store(ds, msg_id=msg_id % 65536)
            except (ValueError, AttributeError) as exc:  # no usable context / cannot encode
                on_done(SendResult(item, "failed", None, str(exc)))
                continue
            if "Status" not in status:
                raise response_error(assoc, node, client, f"the C-STORE of {item.path.name}",
                                     time.monotonic() - t0)
            code = int(status.Status)
            comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
            if code == 0x0000:
                on_done(SendResult(item, "sent", code))
            elif code in (0xB000, 0xB006, 0xB007) or 0xB000 <= code <= 0xBFFF:
                on_done(SendResult(item, "warning", code, status_text(code) + comment))
            else:
                on_done(SendResult(item, "failed", code, status_text(code) + comment))


def send_files(node: RemoteNode, client: Client, items: Sequence[SendItem],
               progress: Callable[[SendResult], None] | None = None) -> SendReport:
    """C-STORE ``items`` to ``node``; every file gets a :class:`SendResult`.

    A node that cannot be reached (or drops the association) raises its
    :class:`~engine.pacs.errors.PacsError`; files refused one by one are reported as failed.
    """
    report = SendReport(node)
    t0 = time.monotonic()

    def done(result: SendResult) -> None:
        report.results.append(result)
        if result.outcome == "failed":
            log.warning("%s: not stored on %s: %s", result.item.path, node, result.message)
        if progress is not None:
            progress(result)

    for batch in _batches(items):
        try:
            _send_batch(node, client, batch, done)
        except PacsError as exc:
            sent = len(report.results)
            raise type(exc)(f"{exc} ({sent} of {len(items)} files were handled before)") \
                from exc
    report.seconds = time.monotonic() - t0
    return report
