"""Retrieve a patient's studies into the local study store with C-MOVE or C-GET.

For each study of the patient (or the one asked for), a C-FIND at study level says how many
objects to expect; the objects then arrive into a staging area of the store
(:class:`engine.pacs.store.Staging`) and are committed into the study's folder only when the
retrieve completed: a final success status, no failed sub-operation, and every object the node
said it sent (and at least as many as the C-FIND announced) received and stored. Otherwise the
staging area is discarded and :class:`~engine.pacs.errors.RetrieveIncomplete` says how far it
got: nothing half-retrieved ever appears in the store.

* **C-MOVE** (the default; every PACS supports it): the node opens its own association back to
  DosePilot, so the node must know DosePilot's AE title, host and port ("move destination");
  DosePilot listens on ``move_port`` for the duration of the retrieve.
* **C-GET**: the objects come back over the same association; nothing to configure on the
  node's side beyond allowing the request, but not every PACS offers it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import UserError
from engine.pacs.association import Client, associate, no_delay, response_error
from engine.pacs.errors import PacsError, RetrieveIncomplete
from engine.pacs.nodes import RemoteNode
from engine.pacs.query import FindQuery, find
from engine.pacs.store import CommittedStudy, RejectedObject, Staging, StudyStore

log = logging.getLogger(__name__)
METHODS = ("move", "get")


@dataclass(frozen=True)
class RetrieveProgress:
    """Where a retrieve is: objects of the current study received of those expected (None when
    the node did not say), and which study of how many."""

    study_uid: str
    received: int
    expected: int | None
    study_index: int
    studies: int


ProgressCallback = Callable[[RetrieveProgress], None]


@dataclass
class _Outcome:
    """What the node reported for one C-MOVE/C-GET, and what arrived."""

    final_status: int | None = None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int | None = None
    error: PacsError | None = None
    rejected: list[str] | None = None


def _store_handler(staging: Staging, on_object: Callable[[], None],
                   rejected: list[str]) -> Callable[[Any], int]:
    def handle(event: Any) -> int:
        try:
            staging.add_bytes(event.encoded_dataset(include_meta=True))
        except RejectedObject as exc:
            rejected.append(exc.reason)
            log.warning("retrieve: object %s refused: %s",
                        getattr(event.request, "AffectedSOPInstanceUID", "?"), exc.reason)
            return exc.status
        except Exception as exc:  # noqa: BLE001 - answer with a failure, never crash the SCP
            rejected.append(f"{type(exc).__name__}: {exc}")
            log.exception("retrieve: storing an object failed")
            return 0xA700
        on_object()
        return 0x0000

    return handle


def _identifier(patient_id: str, study_uid: str) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    return ds


def _follow(responses: Any, assoc: Any, node: RemoteNode, client: Client, what: str,
            outcome: _Outcome, cancel: threading.Event | None, query_model: str) -> None:
    """Read the C-MOVE/C-GET responses into ``outcome``; sends C-CANCEL once when asked."""
    cancel_sent = False
    t0 = time.monotonic()
    for status, _identifier_ds in responses:
        if "Status" not in status:
            outcome.error = response_error(assoc, node, client, what, time.monotonic() - t0)
            return
        code = int(status.Status)
        for attr, key in (("completed", "NumberOfCompletedSuboperations"),
                          ("failed", "NumberOfFailedSuboperations"),
                          ("warning", "NumberOfWarningSuboperations"),
                          ("remaining", "NumberOfRemainingSuboperations")):
            if key in status and status[key].value is not None:
                setattr(outcome, attr, int(status[key].value))
        if code in (0xFF00, 0xFF01):
            if cancel is not None and cancel.is_set() and not cancel_sent:
                assoc.send_c_cancel(1, query_model=query_model)
                cancel_sent = True
        else:
            outcome.final_status = code
        t0 = time.monotonic()


def _move(node: RemoteNode, client: Client, staging: Staging, patient_id: str,
          move_port: int, on_object: Callable[[], None], cancel: threading.Event | None
          ) -> _Outcome:
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as model

    outcome = _Outcome(rejected=[])
    scp = AE(ae_title=client.aet)
    scp.supported_contexts = AllStoragePresentationContexts
    scp.acse_timeout = client.timeouts.acse
    scp.dimse_timeout = client.timeouts.dimse
    scp.network_timeout = client.timeouts.dimse
    handler = _store_handler(staging, on_object, outcome.rejected)
    try:
        server = scp.start_server(("", move_port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, handler),
                                                (evt.EVT_CONN_OPEN, no_delay)])
    except OSError as exc:
        raise UserError(f"cannot receive the C-MOVE on port {move_port}: "
                        f"{exc.strerror or exc} (is `dosepilot listen` or another program "
                        "using it? pick another local port, or use C-GET)") from exc
    try:
        with associate(node, client, [build_context(model)]) as assoc:
            responses = assoc.send_c_move(_identifier(patient_id, staging.study_uid),
                                          client.aet, model)
            _follow(responses, assoc, node, client, "the C-MOVE", outcome, cancel, model)
        # the node's own association may still be delivering the last objects
        deadline = time.monotonic() + min(client.timeouts.dimse, 30.0)
        while (staging.count + staging.duplicates < outcome.completed + outcome.warning
               and time.monotonic() < deadline
               and outcome.final_status is not None):
            time.sleep(0.05)
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.shutdown()
    return outcome


def _get(node: RemoteNode, client: Client, staging: Staging, patient_id: str,
         on_object: Callable[[], None], cancel: threading.Event | None) -> _Outcome:
    from pynetdicom import evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as model

    from engine.pacs.sop import storage_contexts_for_get, storage_roles_for_get

    outcome = _Outcome(rejected=[])
    handler = _store_handler(staging, on_object, outcome.rejected)
    with associate(node, client, storage_contexts_for_get(), roles=storage_roles_for_get(),
                   handlers=[(evt.EVT_C_STORE, handler)]) as assoc:
        responses = assoc.send_c_get(_identifier(patient_id, staging.study_uid), model)
        _follow(responses, assoc, node, client, "the C-GET", outcome, cancel, model)
    return outcome


def _incomplete_reason(outcome: _Outcome, received: int, expected: int | None,
                       cancelled: bool) -> str | None:
    """Why the study is not complete, or None when it is."""
    from engine.pacs.sop import status_text

    if cancelled:
        return "cancelled"
    if outcome.error is not None:
        return str(outcome.error)
    if outcome.final_status is None:
        return "the node ended the association without a final status"
    if outcome.final_status == 0xFE00:
        return "the node cancelled the retrieve"
    if outcome.final_status not in (0x0000,):
        return f"the node ended the retrieve with {status_text(outcome.final_status)}"
    if outcome.failed or outcome.warning:
        return (f"the node reports {outcome.failed} failed and {outcome.warning} "
                "warning sub-operations")
    if outcome.rejected:
        return f"{len(outcome.rejected)} object(s) refused here: {outcome.rejected[0]}"
    if received < outcome.completed:
        return f"the node sent {outcome.completed} objects, {received} arrived"
    if expected is not None and received < expected:
        return f"the node announced {expected} objects, {received} arrived"
    return None


def retrieve_study(node: RemoteNode, client: Client, store: StudyStore, patient_id: str,
                   study_uid: str, expected: int | None = None, method: str = "move",
                   move_port: int = 11112, progress: Callable[[int], None] | None = None,
                   cancel: threading.Event | None = None) -> CommittedStudy:
    """Retrieve one study into ``store`` and commit it; :class:`RetrieveIncomplete` (nothing
    added) when it did not arrive whole. ``progress(received)`` is called per object."""
    if method not in METHODS:
        raise UserError(f"retrieve method must be one of {', '.join(METHODS)}, got {method!r}")
    staging = store.begin(patient_id, study_uid)
    received = 0
    lock = threading.Lock()

    def on_object() -> None:
        nonlocal received
        with lock:
            received += 1
            n = received
        if progress is not None:
            progress(n)

    try:
        if method == "move":
            outcome = _move(node, client, staging, patient_id, move_port, on_object, cancel)
        else:
            outcome = _get(node, client, staging, patient_id, on_object, cancel)
    except PacsError as exc:
        outcome = _Outcome(error=exc, rejected=[])
    except BaseException:
        staging.discard()
        raise
    stored = staging.count + staging.duplicates
    reason = _incomplete_reason(outcome, stored, expected, bool(cancel and cancel.is_set()))
    if reason is not None:
        staging.discard()
        total = f" of {expected}" if expected is not None else ""
        raise RetrieveIncomplete(
            f"retrieve of study {study_uid} (patient {patient_id}) from {node} incomplete: "
            f"{stored}{total} objects received; {reason}. Nothing of it was added to "
            f"{store.root}; run the retrieve again", received=stored, expected=expected)
    return staging.commit(source=f"C-{method.upper()} from {node}")


def retrieve(node: RemoteNode, client: Client, store: StudyStore, patient_id: str,
             study_uid: str | None = None, method: str = "move", move_port: int = 11112,
             progress: ProgressCallback | None = None, cancel: threading.Event | None = None
             ) -> list[CommittedStudy]:
    """Retrieve every study of ``patient_id`` (or only ``study_uid``) into ``store``.

    Studies that arrive whole are committed even when another fails; then
    :class:`RetrieveIncomplete` lists the failures, with the committed studies in its
    ``completed`` attribute.
    """
    if not patient_id or any(c in patient_id for c in "*?\\"):
        raise UserError("retrieve needs one exact Patient ID (no wildcards); find it with "
                        "`dosepilot pacs find --name ...`")
    studies = find(node, client, FindQuery(level="STUDY", patient_id=patient_id,
                                           study_uid=study_uid or ""))
    studies = [s for s in studies if s["PatientID"] == patient_id]
    if not studies:
        which = f"study {study_uid} of patient" if study_uid else "study of patient"
        raise UserError(f"{node} has no {which} {patient_id!r}")
    done: list[CommittedStudy] = []
    failures: list[RetrieveIncomplete] = []
    for index, row in enumerate(studies):
        uid = str(row["StudyInstanceUID"])
        expected = row.get("NumberOfStudyRelatedInstances")

        def report(n: int, uid: str = uid, expected: int | None = expected,
                   index: int = index) -> None:
            if progress is not None:
                progress(RetrieveProgress(uid, n, expected, index, len(studies)))

        report(0)
        try:
            done.append(retrieve_study(node, client, store, patient_id, uid, expected, method,
                                       move_port, report, cancel))
        except RetrieveIncomplete as exc:
            failures.append(exc)
            if cancel is not None and cancel.is_set():
                break
    if failures:
        raise RetrieveIncomplete("; ".join(str(f) for f in failures),
                                 received=sum(f.received for f in failures), completed=done)
    return done
