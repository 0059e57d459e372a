"""Remote DICOM nodes, the local application entity, and the settings file they live in.

The settings are one JSON file shared by the command line and the GUI: ``--settings FILE``, else
``$DOSEPILOT_PACS_SETTINGS``, else ``$XDG_CONFIG_HOME/dosepilot/pacs.json`` (``~/.config/...``).
A missing file means the defaults; a file that cannot be used is a :class:`UserError` naming it.
Example::

    {
      "local": {"aet": "DOSEPILOT", "port": 11112},
      "default_node": "pacs",
      "nodes": {"pacs": {"aet": "ORTHANC", "host": "pacs.example.org", "port": 4242,
                         "tls": false}},
      "retrieve_method": "move",
      "timeouts": {"connect": 5, "acse": 15, "dimse": 60},
      "tls": {"ca": "/etc/dosepilot/ca.pem", "cert": null, "key": null},
      "listener": {"allowed": ["TPS@10.0.0.5"], "return_to": "TPS@10.0.0.5:104",
                   "quiet_seconds": 10}
    }
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UserError

DEFAULT_LOCAL_AET = "DOSEPILOT"
DEFAULT_LOCAL_PORT = 11112
RETRIEVE_METHODS = ("move", "get")
SETTINGS_ENV = "DOSEPILOT_PACS_SETTINGS"


def check_aet(aet: str, what: str = "AE title") -> str:
    """``aet`` stripped, or a :class:`UserError`: 1-16 characters, no backslash or control
    characters (DICOM PS3.5 VR AE)."""
    value = str(aet).strip()
    if not value or len(value) > 16 or "\\" in value or any(ord(c) < 32 for c in value):
        raise UserError(f"{what} {aet!r} is not valid: 1 to 16 characters, no backslash "
                        "or control characters")
    return value


def check_port(port: Any, what: str = "port") -> int:
    """``port`` as an int in 1..65535, or a :class:`UserError`."""
    try:
        value = int(port)
    except (TypeError, ValueError):
        raise UserError(f"{what} {port!r} is not a number") from None
    if not 1 <= value <= 65535:
        raise UserError(f"{what} {value} is out of range (1-65535)")
    return value


@dataclass(frozen=True)
class RemoteNode:
    """A remote DICOM application entity: its AE title, host and port (and whether to use TLS)."""

    aet: str
    host: str
    port: int
    tls: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "aet", check_aet(self.aet, "called AE title"))
        object.__setattr__(self, "port", check_port(self.port))
        if not str(self.host).strip():
            raise UserError("the remote node needs a host name or address")
        object.__setattr__(self, "host", str(self.host).strip())

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.aet}@{host}:{self.port}" + (" (TLS)" if self.tls else "")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {"aet": self.aet, "host": self.host, "port": self.port, "tls": self.tls}


_NODE = re.compile(r"^(?P<aet>[^@]+)@(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:@]+))(?::(?P<port>\d+))?$")


def parse_node(text: str, default_port: int | None = None, name: str = "") -> RemoteNode:
    """``AET@HOST:PORT`` (IPv6 as ``AET@[::1]:PORT``) as a :class:`RemoteNode`."""
    m = _NODE.match(str(text).strip())
    if not m or (m["port"] is None and default_port is None):
        raise UserError(f"{text!r} is not a DICOM node: write it as AET@HOST:PORT, "
                        "e.g. ORTHANC@127.0.0.1:4242")
    port = int(m["port"]) if m["port"] is not None else default_port
    return RemoteNode(m["aet"], m["v6"] or m["host"], port, name=name)


@dataclass(frozen=True)
class AllowedSender:
    """A calling AE title the node accepts, optionally only from one host (name or address)."""

    aet: str
    host: str = ""

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}" if self.host else self.aet


def parse_sender(text: str) -> AllowedSender:
    """``AET`` or ``AET@HOST`` as an :class:`AllowedSender`."""
    aet, _, host = str(text).strip().partition("@")
    return AllowedSender(check_aet(aet, "allowed calling AE title"), host.strip("[] "))


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait: for the TCP connection, for the association answer, for each DIMSE
    response (a C-MOVE's pending responses included)."""

    connect: float = 5.0
    acse: float = 15.0
    dimse: float = 60.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise UserError(f"timeout {f.name} must be a positive number of seconds, "
                                f"got {value!r}")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS: the CA that signs the peers' certificates, and our own certificate and
    key (needed by a node that listens with TLS; optional for a client)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def to_json(self) -> dict[str, str | None]:
        """A JSON-able dict."""
        return {k: (str(v) if v else None) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class ListenerSettings:
    """Defaults of ``dosepilot listen``."""

    allowed: tuple[AllowedSender, ...] = ()
    return_to: RemoteNode | None = None
    quiet_seconds: float = 10.0


@dataclass(frozen=True)
class PacsSettings:
    """Everything the settings file holds (see the module docstring)."""

    local_aet: str = DEFAULT_LOCAL_AET
    local_port: int = DEFAULT_LOCAL_PORT
    nodes: dict[str, RemoteNode] = field(default_factory=dict)
    default_node: str = ""
    retrieve_method: str = "move"
    timeouts: Timeouts = Timeouts()
    tls: TlsFiles = TlsFiles()
    listener: ListenerSettings = ListenerSettings()

    def node(self, name: str = "") -> RemoteNode | None:
        """The node called ``name`` (a :class:`UserError` when unknown), else the default one."""
        key = name or self.default_node
        if not key:
            return None
        if key not in self.nodes:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise UserError(f"no remote node named {key!r} in the settings (known: {known})")
        return self.nodes[key]

    def with_node(self, node: RemoteNode, make_default: bool = False) -> PacsSettings:
        """A copy with ``node`` added or replaced under its name."""
        if not node.name:
            raise UserError("a saved node needs a name")
        nodes = dict(self.nodes)
        nodes[node.name] = node
        default = node.name if make_default or not self.default_node else self.default_node
        return dataclasses.replace(self, nodes=nodes, default_node=default)

    def without_node(self, name: str) -> PacsSettings:
        """A copy without the node ``name`` (a :class:`UserError` when unknown)."""
        if name not in self.nodes:
            raise UserError(f"no remote node named {name!r} in the settings")
        nodes = {k: v for k, v in self.nodes.items() if k != name}
        default = self.default_node if self.default_node != name else next(iter(nodes), "")
        return dataclasses.replace(self, nodes=nodes, default_node=default)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        lis = self.listener
        return {
            "local": {"aet": self.local_aet, "port": self.local_port},
            "default_node": self.default_node,
            "nodes": {name: n.to_json() for name, n in sorted(self.nodes.items())},
            "retrieve_method": self.retrieve_method,
            "timeouts": dataclasses.asdict(self.timeouts),
            "tls": self.tls.to_json(),
            "listener": {"allowed": [str(a) for a in lis.allowed],
                         "return_to": (f"{lis.return_to.aet}@{lis.return_to.host}:"
                                       f"{lis.return_to.port}" if lis.return_to else None),
                         "quiet_seconds": lis.quiet_seconds},
        }


def settings_path(path: str | Path | None = None) -> Path:
    """Where the settings are read from and saved to (see the module docstring)."""
    if path:
        return Path(path)
    if os.environ.get(SETTINGS_ENV):
        return Path(os.environ[SETTINGS_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dosepilot" / "pacs.json"


def _from_json(doc: Any) -> PacsSettings:
    if not isinstance(doc, dict):
        raise UserError("the top level must be a JSON object")
    local = doc.get("local") or {}
    nodes = {}
    for name, entry in (doc.get("nodes") or {}).items():
        if not isinstance(entry, dict):
            raise UserError(f"node {name!r} must be an object with aet, host and port")
        try:
            nodes[name] = RemoteNode(entry["aet"], entry["host"], entry["port"],
                                     bool(entry.get("tls", False)), name=name)
        except KeyError as exc:
            raise UserError(f"node {name!r} lacks {exc.args[0]!r}") from None
    default = str(doc.get("default_node") or "")
    if default and default not in nodes:
        raise UserError(f"default_node {default!r} is not one of the nodes")
    method = str(doc.get("retrieve_method") or "move").lower()
    if method not in RETRIEVE_METHODS:
        raise UserError(f"retrieve_method must be one of {', '.join(RETRIEVE_METHODS)}, "
                        f"got {method!r}")
    t = doc.get("timeouts") or {}
    unknown = set(t) - {"connect", "acse", "dimse"}
    if unknown:
        raise UserError(f"unknown timeouts: {', '.join(sorted(unknown))}")
    tls = doc.get("tls") or {}
    lis = doc.get("listener") or {}
    return_to = lis.get("return_to")
    return PacsSettings(
        local_aet=check_aet(local.get("aet", DEFAULT_LOCAL_AET), "local AE title"),
        local_port=check_port(local.get("port", DEFAULT_LOCAL_PORT), "local port"),
        nodes=nodes, default_node=default, retrieve_method=method, timeouts=Timeouts(**t),
        tls=TlsFiles(*(Path(tls[k]) if tls.get(k) else None for k in ("ca", "cert", "key"))),
        listener=ListenerSettings(
            allowed=tuple(parse_sender(a) for a in lis.get("allowed") or ()),
            return_to=parse_node(return_to) if return_to else None,
            quiet_seconds=float(lis.get("quiet_seconds", 10.0))))


def load_settings(path: str | Path | None = None) -> PacsSettings:
    """The settings at :func:`settings_path` (defaults when the file does not exist)."""
    p = settings_path(path)
    if not p.exists():
        return PacsSettings()
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        return _from_json(doc)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the PACS settings {p}: {exc}") from exc
    except UserError as exc:
        raise UserError(f"PACS settings {p}: {exc}") from exc


def save_settings(settings: PacsSettings, path: str | Path | None = None) -> Path:
    """Write ``settings`` (all-or-nothing) to :func:`settings_path`; returns the file."""
    from engine.durable import write_text

    p = settings_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return write_text(p, json.dumps(settings.to_json(), indent=2) + "\n")
