"""Opening an association with a remote node, with an error that says what went wrong, and
C-ECHO.

:func:`associate` is the one place DosePilot opens associations as a client. When the node
cannot be used it raises, instead of pynetdicom's silent ``is_established == False``:

* :class:`~engine.pacs.errors.PacsUnreachable`: unknown host, connection refused, no answer;
* :class:`~engine.pacs.errors.AssociationRejected`: A-ASSOCIATE-RJ, with the node's reason (a
  wrong called AE title, our AE title unknown to it, too many associations);
* :class:`~engine.pacs.errors.PacsTimeout`: connected, but no answer to the association request;
* :class:`~engine.pacs.errors.AssociationAborted`: connected, then aborted (a TLS mismatch, ...).

:func:`response_error` turns the empty status pynetdicom returns when a request got no answer
into the same kinds of errors.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from engine.pacs.errors import (
    AssociationAborted,
    AssociationRejected,
    PacsError,
    PacsTimeout,
    PacsUnreachable,
)
from engine.pacs.nodes import (
    DEFAULT_LOCAL_AET,
    PacsSettings,
    RemoteNode,
    Timeouts,
    TlsFiles,
    check_aet,
)

log = logging.getLogger(__name__)

_REJECT_HINTS = {
    "Called AE title not recognised": "the node does not answer to AE title {called!r}: check "
                                      "the called AE title",
    "Calling AE title not recognised": "the node does not know our AE title {calling!r}: add it "
                                       "to the node's known modalities, or use --aet",
    "Local limit exceeded": "the node has too many associations open: try again later",
}


@dataclass(frozen=True)
class Client:
    """Who DosePilot is when it calls a node: its AE title, timeouts and TLS files."""

    aet: str = DEFAULT_LOCAL_AET
    timeouts: Timeouts = Timeouts()
    tls: TlsFiles = TlsFiles()

    def __post_init__(self) -> None:
        object.__setattr__(self, "aet", check_aet(self.aet, "local AE title"))

    @classmethod
    def from_settings(cls, settings: PacsSettings, aet: str | None = None,
                      timeout: float | None = None) -> Client:
        """The client the settings describe; ``aet`` and ``timeout`` (all three timeouts, in
        seconds) override them."""
        timeouts = settings.timeouts
        if timeout is not None:
            timeouts = Timeouts(min(timeout, timeouts.connect), timeout, timeout)
        return cls(aet or settings.local_aet, timeouts, settings.tls)


def quiet_pynetdicom(verbose: bool = False) -> None:
    """Keep pynetdicom's own log lines (which repeat what DosePilot's errors say, less clearly)
    out of the output, unless ``verbose``."""
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def no_delay(event: Any) -> None:
    """EVT_CONN_OPEN handler: send small PDUs at once (TCP_NODELAY). Without it every C-STORE
    waits for the peer's delayed ACK (about 40 ms on Linux), which makes sending a CT series
    3 times slower."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_ae(client: Client) -> Any:
    """A pynetdicom ``AE`` with the client's AE title and timeouts."""
    from pynetdicom import AE

    ae = AE(ae_title=client.aet)
    ae.connection_timeout = client.timeouts.connect
    ae.acse_timeout = client.timeouts.acse
    ae.dimse_timeout = client.timeouts.dimse
    ae.network_timeout = max(client.timeouts.dimse, client.timeouts.acse)
    return ae


def _probe(node: RemoteNode, timeout: float) -> PacsError | None:
    """Why a plain TCP connection to the node fails, or None when it works."""
    try:
        socket.getaddrinfo(node.host, node.port)
    except socket.gaierror as exc:
        return PacsUnreachable(f"cannot reach {node}: unknown host {node.host!r} "
                               f"({exc.strerror})")
    try:
        with socket.create_connection((node.host, node.port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return PacsUnreachable(f"cannot reach {node}: nothing listens on {node.host} port "
                               f"{node.port} (connection refused); check the host, the port and "
                               "that the node is running")
    except TimeoutError:
        return PacsUnreachable(f"cannot reach {node}: no answer within {timeout:g} s; the host "
                               "may be down, or a firewall drops the connection")
    except OSError as exc:
        return PacsUnreachable(f"cannot reach {node}: {exc.strerror or exc}")


def association_error(assoc: Any, node: RemoteNode, client: Client, connected: bool,
                      elapsed: float) -> PacsError:
    """The error for an association that was not established."""
    if assoc.is_rejected:
        rsp = getattr(assoc.acceptor, "primitive", None)
        reason = str(getattr(rsp, "reason_str", "") or "no reason given")
        result = str(getattr(rsp, "result_str", "") or "Rejected")
        hint = _REJECT_HINTS.get(reason, "").format(called=node.aet, calling=client.aet)
        return AssociationRejected(
            f"{node} rejected the association from {client.aet} ({result}: {reason})"
            + (f"; {hint}" if hint else ""), reason)
    if not connected:
        probe = _probe(node, client.timeouts.connect)
        if probe is not None:
            return probe
        if node.tls:
            return AssociationAborted(
                f"the TLS handshake with {node} failed: check that the node uses TLS on this "
                "port and that its certificate is signed by the configured CA (tls.ca)")
    if elapsed >= 0.95 * client.timeouts.acse:
        return PacsTimeout(f"{node} accepted the connection but did not answer the association "
                           f"request within {client.timeouts.acse:g} s")
    # Some nodes drop a wrong called AE title without a reason, and a reject sent just before
    # the node closes can be lost (Orthanc: about 1 in 30 under load), so name the AE title.
    return AssociationAborted(
        f"{node} closed the connection before accepting the association: check that it "
        f"answers to AE title {node.aet!r} and knows ours ({client.aet!r})"
        + ("" if node.tls else "; if that port expects TLS, mark the node as TLS"))


def response_error(assoc: Any, node: RemoteNode, client: Client, what: str,
                   elapsed: float) -> PacsError:
    """The error for a request (``what``: "the C-FIND", ...) that got no valid response."""
    if elapsed >= 0.95 * client.timeouts.dimse:
        return PacsTimeout(f"{node} did not answer {what} within {client.timeouts.dimse:g} s")
    return AssociationAborted(
        f"{node} aborted the association during {what}; it may not allow this request from "
        f"AE title {client.aet!r} (add {client.aet} to its known modalities with the right "
        "permissions), or it stopped")


@contextmanager
def associate(node: RemoteNode, client: Client, contexts: Sequence[Any],
              roles: Sequence[Any] = (), handlers: Sequence[tuple] = (),
              ae: Any | None = None) -> Iterator[Any]:
    """An established association with ``node`` (released when the block ends, aborted when
    it raises); raises a :class:`~engine.pacs.errors.PacsError` saying why there is none.

    ``contexts`` are pynetdicom presentation contexts to request, ``roles`` SCP/SCU role
    selection items (C-GET), ``handlers`` event handlers bound to the association.
    """
    from pynetdicom import evt

    try:
        socket.getaddrinfo(node.host, node.port)
    except socket.gaierror as exc:
        raise PacsUnreachable(f"cannot reach {node}: unknown host {node.host!r} "
                              f"({exc.strerror})") from None
    ae = ae or make_ae(client)
    ae.requested_contexts = list(contexts)
    connected = threading.Event()
    tls_args = None
    if node.tls:
        from engine.pacs.tls import client_context

        tls_args = (client_context(client.tls), node.host)
    t0 = time.monotonic()
    assoc = ae.associate(node.host, node.port, ae_title=node.aet, ext_neg=list(roles) or None,
                         tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: connected.set()),
                                       (evt.EVT_CONN_OPEN, no_delay), *handlers])
    if not assoc.is_established:
        raise association_error(assoc, node, client, connected.is_set(), time.monotonic() - t0)
    log.debug("associated with %s as %s", node, client.aet)
    try:
        yield assoc
    except BaseException:
        if assoc.is_established:
            assoc.abort()
        raise
    if assoc.is_established:
        assoc.release()


@dataclass(frozen=True)
class EchoResult:
    """A successful C-ECHO: the node, and the seconds for association + echo + release."""

    node: RemoteNode
    aet: str
    seconds: float


def echo(node: RemoteNode, client: Client) -> EchoResult:
    """C-ECHO the node (DICOM's ping); raises a :class:`PacsError` when it fails."""
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification

    from engine.pacs.errors import OperationFailed
    from engine.pacs.sop import status_text

    t0 = time.monotonic()
    with associate(node, client, [build_context(Verification)]) as assoc:
        t1 = time.monotonic()
        status = assoc.send_c_echo()
        if "Status" not in status:
            raise response_error(assoc, node, client, "the C-ECHO", time.monotonic() - t1)
        if status.Status != 0x0000:
            raise OperationFailed(f"{node} answered the C-ECHO with {status_text(status.Status)}")
    return EchoResult(node, client.aet, time.monotonic() - t0)
