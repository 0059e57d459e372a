"""``dosepilot listen --port P --aet DOSEPILOT --store DIR --allow AET[@HOST]... [--predict]
[--return-to AET@HOST:PORT]``: DosePilot as a DICOM node.

A Storage SCP that takes CT, RTSTRUCT, RTPLAN and RTDOSE objects from the allowed senders
only (others are rejected and logged), groups them by patient and study into
DIR/<patient>/<study>/ and, once no object of a study arrived for --quiet-seconds, counts the
study as complete. With --predict it then predicts the study's dose (the shipped model or
--model; --preview for the 1-step preview) and writes the RTDOSE, a DVH report (Encapsulated
PDF), dvh.csv and metrics.json to DIR/_results/<patient>/<study>/<time>/, and with --return-to
sends the RTDOSE and the report there. Malformed or unsupported objects are refused with a
DICOM failure status and logged; the node keeps running. Stop it with Ctrl-C or SIGTERM.

Defaults come from the PACS settings (listener.allowed, listener.return_to,
listener.quiet_seconds, local.aet, local.port). --json prints one JSON object per event
(listening, association_rejected, object_refused, study_received, prediction) on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from engine.errors import UserError

log = logging.getLogger("engine.listen")


def run(args: argparse.Namespace) -> int:
    """``dosepilot listen``: serve until Ctrl-C or SIGTERM (exit 0)."""
    from engine.pacs.association import Client, quiet_pynetdicom
    from engine.pacs.listener import NodeConfig, StorageNode
    from engine.pacs.nodes import TlsFiles, load_settings, parse_node, parse_sender
    from engine.pacs.store import StudyStore

    quiet_pynetdicom(bool(getattr(args, "verbose", False)))
    if args.log:
        handler = logging.FileHandler(args.log, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    settings = load_settings(args.settings)
    allowed = tuple(parse_sender(a) for a in args.allow) if args.allow else \
        settings.listener.allowed
    return_to = parse_node(args.return_to) if args.return_to else settings.listener.return_to
    if return_to is not None and args.return_tls:
        import dataclasses

        return_to = dataclasses.replace(return_to, tls=True)
    if return_to is not None and not args.predict:
        raise UserError("--return-to sends predictions back: it needs --predict")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    tls = None
    if args.tls_cert or args.tls_key:
        tls = TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)
    config = NodeConfig(aet=args.aet or settings.local_aet,
                        port=args.port or settings.local_port, allowed=allowed,
                        bind=args.bind,
                        quiet_seconds=(args.quiet_seconds if args.quiet_seconds is not None
                                       else settings.listener.quiet_seconds),
                        tls=tls)
    store = StudyStore(args.store)
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        if args.json:
            with lock:
                print(json.dumps(event), flush=True)

    worker = None
    if args.predict:
        from engine.commands.bench_cmd import load_engine
        from engine.pacs.auto_predict import PredictionWorker

        engine = load_engine(args.model, args.threads)
        worker = PredictionWorker(
            engine, args.results or store.root / "_results", steps=args.steps,
            preview=args.preview, return_to=return_to,
            client=Client.from_settings(settings, config.aet), report=not args.no_report,
            on_outcome=lambda o: emit(o.to_json()))
    node = StorageNode(config, store, on_study=worker.submit if worker else None,
                       on_event=emit)
    node.start()
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ready = {"event": "listening", "aet": config.aet, "port": config.port,
             "tls": tls is not None, "store": str(store.root),
             "allowed": [str(a) for a in allowed], "predict": bool(args.predict),
             "return_to": str(return_to) if return_to else None}
    if args.json:
        emit(ready)
    else:
        print(f"listening as {config.aet} on port {config.port}"
              f"{' (TLS)' if tls else ''}; store {store.root}; allowed: "
              + ", ".join(str(a) for a in allowed)
              + (f"; predicting{', returning to ' + str(return_to) if return_to else ''}"
                 if args.predict else ""), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        node.stop()
        if worker is not None:
            worker.stop(timeout=60)
        stats = node.stats
        summary = {"event": "stopped", "associations": stats.associations,
                   "rejected_associations": stats.rejected_associations,
                   "stored": stats.stored, "duplicates": stats.duplicates,
                   "refused": stats.refused, "studies": stats.studies}
        if args.json:
            emit(summary)
        else:
            print("stopped: " + ", ".join(f"{k} {v}" for k, v in summary.items()
                                          if k != "event"), file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dosepilot listen``."""
    p = subparsers.add_parser(
        "listen", help="run DosePilot as a DICOM node (Storage SCP; optional auto-prediction)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, help="port to listen on (default: settings, 11112)")
    p.add_argument("--aet", help="the node's AE title (default: settings, DOSEPILOT)")
    p.add_argument("--store", type=Path, required=True, metavar="DIR",
                   help="study store: DIR/<patient>/<study>/")
    p.add_argument("--allow", action="append", metavar="AET[@HOST]",
                   help="a calling AE title to accept (optionally only from HOST); repeat it")
    p.add_argument("--bind", default="", metavar="ADDR",
                   help="address to listen on (default: all)")
    p.add_argument("--quiet-seconds", type=float, metavar="S",
                   help="a study is complete this long after its last object (default 10)")
    p.add_argument("--predict", action="store_true", help="predict each complete study")
    p.add_argument("--preview", action="store_true",
                   help="use the 1-step preview instead of the full prediction")
    p.add_argument("--steps", type=int, default=10, help="sampler steps (default 10)")
    p.add_argument("--model", type=Path, help="model bundle (default: the shipped model)")
    p.add_argument("--threads", type=int, help="CPU threads for the prediction")
    p.add_argument("--results", type=Path, metavar="DIR",
                   help="where predictions go (default: STORE/_results)")
    p.add_argument("--no-report", action="store_true",
                   help="do not make (or send) the DVH report PDF")
    p.add_argument("--return-to", metavar="AET@HOST:PORT",
                   help="send the RTDOSE and report there (needs --predict)")
    p.add_argument("--return-tls", action="store_true", help="use TLS for --return-to")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="listen with TLS: certificate")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="listen with TLS: private key")
    p.add_argument("--tls-ca", type=Path, metavar="PEM",
                   help="with TLS, require callers' certificates signed by this CA")
    p.add_argument("--log", type=Path, metavar="FILE", help="also log to this file")
    p.add_argument("--settings", type=Path, metavar="FILE", help="PACS settings file")
    p.add_argument("--json", action="store_true", help="one JSON object per event on stdout")
    p.set_defaults(func=run)
