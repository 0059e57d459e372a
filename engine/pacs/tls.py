"""TLS for DICOM associations (DICOM PS3.15 Annex B, "secure transport connection profiles").

pynetdicom takes a standard :class:`ssl.SSLContext`: :func:`client_context` for the
associations DosePilot opens, :func:`server_context` for ``dosepilot listen --tls-cert ...``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from engine.errors import UserError
from engine.pacs.nodes import TlsFiles


def _readable(path: Path | None, what: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(f"TLS {what} {path}: no such file")
    return Path(path)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A context that verifies the server against ``files.ca`` (the system's CAs when none is
    given) and presents ``files.cert``/``files.key`` when given (mutual TLS)."""
    ca = _readable(files.ca, "CA certificate")
    cert = _readable(files.cert, "certificate")
    key = _readable(files.key, "key")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(ca) if ca else None)
        if cert:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (ssl.SSLError, OSError) as exc:
        raise UserError(f"cannot set up TLS with {files}: {exc}") from exc
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A context for a listening node: its certificate and key are required; with a CA, callers
    must present a certificate it signed (mutual TLS)."""
    if files.cert is None or files.key is None:
        raise UserError("a node that listens with TLS needs --tls-cert and --tls-key")
    cert = _readable(files.cert, "certificate")
    key = _readable(files.key, "key")
    ca = _readable(files.ca, "CA certificate")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        if ca:
            ctx.load_verify_locations(str(ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise UserError(f"cannot set up TLS with {cert} and {key}: {exc}") from exc
    return ctx
