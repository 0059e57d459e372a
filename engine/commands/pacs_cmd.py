"""``dosepilot pacs echo|find|retrieve|send|node``: DosePilot as a client of a PACS or TPS.

  dosepilot pacs echo
  dosepilot pacs find [--level patient|study|series] [--patient-id ID] [--name PATTERN]
                      [--study-date RANGE] [--study-uid UID]
  dosepilot pacs retrieve --patient-id ID [--study-uid UID] --out DIR [--method move|get]
  dosepilot pacs send FILE_OR_FOLDER...
  dosepilot pacs node list | add NAME AET@HOST:PORT [--tls] [--default] | remove NAME
                      | local [--aet AET] [--port PORT]

The remote node is ``--host --port --called-aet`` (or ``--node NAME`` of the settings, or the
settings' default node); DosePilot's own AE title is ``--aet`` (default from the settings,
DOSEPILOT). Settings: ``--settings FILE``, else $DOSEPILOT_PACS_SETTINGS, else
~/.config/dosepilot/pacs.json (engine/pacs/nodes.py shows the format). Retrieved studies go
to DIR/<patient>/<study>/, only once complete; C-MOVE needs the node to know DosePilot as a
move destination (AE title, this host, the local port, default 11112).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.errors import UserError


def _node_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote node (default: the settings' default node)")
    g.add_argument("--node", metavar="NAME", help="a node saved in the settings")
    g.add_argument("--host", help="host name or address of the remote node")
    g.add_argument("--port", type=int, help="its DICOM port")
    g.add_argument("--called-aet", metavar="AET", help="its AE title")
    g.add_argument("--tls", action="store_true", default=None, help="use TLS")
    g.add_argument("--aet", metavar="AET", help="DosePilot's own AE title (calling AE title)")
    g.add_argument("--timeout", type=float, metavar="S",
                   help="seconds to wait for each answer (default: the settings', 15/60 s)")
    g.add_argument("--settings", type=Path, metavar="FILE", help="PACS settings file")
    p.add_argument("--json", action="store_true", help="print JSON")


def resolve(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(remote node, client, settings) from the options and the settings file."""
    from engine.pacs.association import Client, quiet_pynetdicom
    from engine.pacs.nodes import RemoteNode, load_settings

    quiet_pynetdicom(bool(getattr(args, "verbose", False)))
    settings = load_settings(args.settings)
    base = settings.node(args.node or "")
    host = args.host or (base.host if base else None)
    port = args.port or (base.port if base else None)
    aet = args.called_aet or (base.aet if base else None)
    if not (host and port and aet):
        missing = [o for o, v in (("--host", host), ("--port", port), ("--called-aet", aet))
                   if not v]
        raise UserError(f"no remote node: give {', '.join(missing)}, or --node NAME, or save "
                        "a default node (dosepilot pacs node add NAME AET@HOST:PORT --default)")
    tls = args.tls if args.tls is not None else (base.tls if base else False)
    node = RemoteNode(aet, host, port, tls, name=base.name if base else "")
    return node, Client.from_settings(settings, args.aet, args.timeout), settings


def _bar(total: int | None, unit: str, enabled: bool, desc: str = "") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


# ---- echo ------------------------------------------------------------------------------------
def run_echo(args: argparse.Namespace) -> int:
    """``dosepilot pacs echo``."""
    from engine.pacs.association import echo

    node, client, _ = resolve(args)
    result = echo(node, client)
    if args.json:
        _print_json({"node": str(node), "aet": client.aet, "ok": True,
                     "seconds": result.seconds})
    else:
        print(f"{node} answers C-ECHO from {client.aet} ({result.seconds * 1000:.0f} ms)")
    return 0


# ---- find ------------------------------------------------------------------------------------
_COLUMNS = {
    "PATIENT": (("PatientID", "patient id"), ("PatientName", "name"),
                ("PatientBirthDate", "born"), ("NumberOfPatientRelatedStudies", "studies")),
    "STUDY": (("PatientID", "patient id"), ("PatientName", "name"), ("StudyDate", "date"),
              ("StudyDescription", "description"), ("ModalitiesInStudy", "modalities"),
              ("NumberOfStudyRelatedInstances", "objects"), ("StudyInstanceUID", "study uid")),
    "SERIES": (("PatientID", "patient id"), ("Modality", "modality"),
               ("SeriesNumber", "#"), ("SeriesDescription", "description"),
               ("NumberOfSeriesRelatedInstances", "objects"),
               ("SeriesInstanceUID", "series uid")),
}


def format_table(rows: list[dict[str, Any]], level: str) -> str:
    """The rows of a C-FIND as an aligned text table."""
    columns = _COLUMNS[level]
    cells = [[h for _, h in columns]] + [
        ["" if r.get(k) is None else str(r.get(k)).replace("\\", "/") for k, _ in columns]
        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in cells)


def run_find(args: argparse.Namespace) -> int:
    """``dosepilot pacs find``: a table (or JSON) of the matches."""
    from engine.pacs.query import FindQuery, find

    query = FindQuery(level=args.level, patient_id=args.patient_id or "",
                      patient_name=args.name or "", study_date=args.study_date or "",
                      study_uid=args.study_uid or "", modality=args.modality or "")
    node, client, _ = resolve(args)
    rows = find(node, client, query)
    if args.json:
        _print_json({"node": str(node), "level": query.level.lower(), "matches": rows})
    elif not rows:
        print(f"no {query.level.lower()} matches on {node}")
    else:
        print(format_table(rows, query.level))
        print(f"{len(rows)} {query.level.lower()}(s) on {node}")
    return 0


# ---- retrieve --------------------------------------------------------------------------------
def run_retrieve(args: argparse.Namespace) -> int:
    """``dosepilot pacs retrieve``: exit 0 when every study arrived whole, else 1 (JSON) or 2."""
    from engine.pacs.errors import RetrieveIncomplete
    from engine.pacs.retrieve import RetrieveProgress, retrieve
    from engine.pacs.store import StudyStore

    node, client, settings = resolve(args)
    method = args.method or settings.retrieve_method
    move_port = args.move_port or settings.local_port
    store = StudyStore(args.out)
    bar = _bar(None, "obj", sys.stderr.isatty())
    current = {"study": None}

    def progress(p: RetrieveProgress) -> None:
        if current["study"] != p.study_uid:
            current["study"] = p.study_uid
            bar.reset(total=p.expected)
            bar.set_description(f"study {p.study_index + 1}/{p.studies}")
        bar.n = p.received
        bar.refresh()

    def line(study: Any) -> str:
        what = ", ".join(f"{n} {m}" for m, n in study.modalities.items())
        new = f"{len(study.added)} new" + (f", {study.duplicates} already there"
                                           if study.duplicates else "")
        return (f"{study.patient_id} study {study.study_uid}: {study.total} objects ({what}; "
                f"{new}) -> {study.folder}")

    try:
        studies = retrieve(node, client, store, args.patient_id, args.study_uid, method,
                           move_port, progress)
    except RetrieveIncomplete as exc:
        bar.close()
        if args.json:
            _print_json({"node": str(node), "method": method,
                         "studies": [s.to_json() for s in exc.completed], "error": str(exc)})
            return 1
        for study in exc.completed:
            print(line(study))
        raise
    finally:
        bar.close()
    if args.json:
        _print_json({"node": str(node), "method": method,
                     "studies": [s.to_json() for s in studies]})
    else:
        for study in studies:
            print(line(study))
    return 0


# ---- send ------------------------------------------------------------------------------------
def run_send(args: argparse.Namespace) -> int:
    """``dosepilot pacs send``: exit 1 when the node refused a file."""
    from engine.pacs.send import collect_files, send_files

    items, skipped = collect_files(args.paths)
    if not items:
        raise UserError("no DICOM file to send in " + ", ".join(str(p) for p in args.paths)
                        + (f" ({'; '.join(skipped[:3])})" if skipped else ""))
    node, client, _ = resolve(args)
    bar = _bar(len(items), "file", sys.stderr.isatty(), "sending")
    try:
        report = send_files(node, client, items, progress=lambda r: bar.update(1))
    finally:
        bar.close()
    report.skipped = skipped
    if args.json:
        _print_json(report.to_json())
    else:
        for note in skipped:
            print(f"skipped {note}", file=sys.stderr)
        for r in report.failed:
            print(f"FAILED {r.item.path}: {r.message}", file=sys.stderr)
        sent = len(report.results) - len(report.failed)
        print(f"{sent} of {len(items)} file(s) stored on {node} in {report.seconds:.1f} s"
              + (f"; {len(report.failed)} failed" if report.failed else ""))
    return 1 if report.failed else 0


# ---- node (settings) -------------------------------------------------------------------------
def run_node(args: argparse.Namespace) -> int:
    """``dosepilot pacs node list|add|remove|local``: the settings file."""
    import dataclasses

    from engine.pacs.nodes import (
        check_aet,
        check_port,
        load_settings,
        parse_node,
        save_settings,
        settings_path,
    )

    settings = load_settings(getattr(args, "settings", None))
    path = settings_path(getattr(args, "settings", None))
    if args.node_command == "add":
        node = dataclasses.replace(parse_node(args.address, name=args.name), tls=args.tls)
        settings = settings.with_node(node, make_default=args.default)
        save_settings(settings, path)
        print(f"saved node {args.name}: {node}"
              + (" (default)" if settings.default_node == args.name else "") + f" in {path}")
    elif args.node_command == "remove":
        settings = settings.without_node(args.name)
        save_settings(settings, path)
        print(f"removed node {args.name} from {path}")
    elif args.node_command == "local":
        if args.local_aet or args.local_port:
            settings = dataclasses.replace(
                settings,
                local_aet=check_aet(args.local_aet, "local AE title") if args.local_aet
                else settings.local_aet,
                local_port=check_port(args.local_port) if args.local_port
                else settings.local_port)
            save_settings(settings, path)
        print(f"DosePilot's AE title {settings.local_aet}, port {settings.local_port} ({path})")
    else:
        if args.json:
            _print_json({"settings": str(path), **settings.to_json()})
            return 0
        print(f"settings {path}{'' if path.exists() else ' (not written yet: defaults)'}")
        print(f"local AE title {settings.local_aet}, port {settings.local_port}")
        for name, node in sorted(settings.nodes.items()):
            mark = " (default)" if name == settings.default_node else ""
            print(f"  {name}: {node}{mark}")
        if not settings.nodes:
            print("  no remote node: dosepilot pacs node add NAME AET@HOST:PORT --default")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dosepilot pacs`` and its actions."""
    parser = subparsers.add_parser(
        "pacs", help="query, retrieve from and send to a PACS or TPS (DICOM network)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="pacs_command", metavar="ACTION", required=True)

    p = sub.add_parser("echo", help="C-ECHO the remote node (is it there, does it accept us?)")
    _node_options(p)
    p.set_defaults(func=run_echo)

    p = sub.add_parser("find", help="C-FIND patients, studies or series")
    p.add_argument("--level", choices=("patient", "study", "series"), default="study")
    p.add_argument("--patient-id", metavar="ID", help="Patient ID (wildcards * and ?)")
    p.add_argument("--name", metavar="PATTERN", help="patient name, e.g. 'DOE*'")
    p.add_argument("--study-date", metavar="RANGE",
                   help="YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD "
                        "(or YYYY-MM-DD..YYYY-MM-DD)")
    p.add_argument("--study-uid", metavar="UID", help="Study Instance UID")
    p.add_argument("--modality", help="e.g. RTPLAN (studies holding one; series of that kind)")
    _node_options(p)
    p.set_defaults(func=run_find)

    p = sub.add_parser("retrieve", help="C-MOVE or C-GET a patient's studies into a folder")
    p.add_argument("--patient-id", metavar="ID", required=True)
    p.add_argument("--study-uid", metavar="UID", help="only this study")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="the study store: DIR/<patient>/<study>/")
    p.add_argument("--method", choices=("move", "get"),
                   help="C-MOVE (default from the settings: move) or C-GET")
    p.add_argument("--move-port", type=int, metavar="PORT",
                   help="where DosePilot receives a C-MOVE (default: the settings' local "
                        "port, 11112)")
    _node_options(p)
    p.set_defaults(func=run_retrieve)

    p = sub.add_parser("send", help="C-STORE DICOM files (e.g. an exported RTPLAN + RTDOSE)")
    p.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_FOLDER")
    _node_options(p)
    p.set_defaults(func=run_send)

    p = sub.add_parser("node", help="list or edit the saved remote nodes and the local AE")
    nsub = p.add_subparsers(dest="node_command", metavar="ACTION")
    a = nsub.add_parser("add", help="save a node (replaces one of the same name)")
    a.add_argument("name")
    a.add_argument("address", metavar="AET@HOST:PORT")
    a.add_argument("--tls", action="store_true", help="the node uses TLS")
    a.add_argument("--default", action="store_true", help="make it the default node")
    r = nsub.add_parser("remove", help="forget a node")
    r.add_argument("name")
    loc = nsub.add_parser("local", help="show or set DosePilot's AE title and port")
    loc.add_argument("--aet", dest="local_aet")
    loc.add_argument("--port", dest="local_port", type=int)
    lst = nsub.add_parser("list", help="the saved nodes (the default action)")
    for q in (p, a, r, loc, lst):
        q.add_argument("--settings", type=Path, metavar="FILE", default=argparse.SUPPRESS,
                       help="PACS settings file")
    for q in (p, lst):
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print JSON (list)")
    p.set_defaults(func=run_node, node_command="list", json=False)
