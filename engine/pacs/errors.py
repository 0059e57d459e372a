"""The errors of DICOM networking, each a :class:`~engine.errors.UserError` with a message that
says what happened, with which node, and what to check.

The command line prints them as one line (exit code 2), the GUI in a message box.
"""

from __future__ import annotations

from engine.errors import UserError


class PacsError(UserError):
    """Any failure talking to a remote DICOM node."""


class PacsUnreachable(PacsError):
    """No TCP connection: unknown host name, nothing listening on the port, or no answer."""


class AssociationRejected(PacsError):
    """The node answered the association request with A-ASSOCIATE-RJ (e.g. a wrong AE title)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class AssociationAborted(PacsError):
    """The node (or the network) aborted the association, e.g. because it does not allow the
    request from this AE title, or the TLS handshake failed."""


class PacsTimeout(PacsError):
    """The node did not answer within the configured time."""


class OperationFailed(PacsError):
    """The node answered a request (C-FIND, C-MOVE, C-GET, C-STORE) with a failure status."""


class RetrieveIncomplete(PacsError):
    """A retrieve ended before every object of a study arrived; nothing of that study was added
    to the store."""

    def __init__(self, message: str, received: int = 0, expected: int | None = None,
                 completed: list | None = None) -> None:
        super().__init__(message)
        self.received = received
        self.expected = expected
        #: the studies of the same retrieve that did arrive whole (and are in the store)
        self.completed = list(completed or [])
