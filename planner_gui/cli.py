"""``dosepilot gui [PATH]`` and ``dosepilot demo``: the desktop application."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.errors import UserError


def _gui(args: argparse.Namespace) -> int:
    from planner_gui.app import run  # noqa: PLC0415 - Qt only when the GUI is asked for

    if args.path is not None and not Path(args.path).exists():
        raise UserError(f"{args.path} does not exist")
    return run(path=args.path, checkpoint=args.checkpoint, screenshot=args.screenshot)


def _demo(args: argparse.Namespace) -> int:
    from planner_gui.app import run  # noqa: PLC0415

    return run(demo=True, checkpoint=args.checkpoint, screenshot=args.screenshot)


def register(subparsers: argparse._SubParsersAction) -> None:
    gui = subparsers.add_parser("gui", help="open the planning window",
                                description="Open DosePilot's planning window, optionally on "
                                            "a DICOM folder or an OpenKBP case folder.")
    gui.add_argument("path", nargs="?", help="DICOM folder or dataset case to open")
    demo = subparsers.add_parser("demo", help="open the window on the bundled demo patient",
                                 description="Open DosePilot on the bundled demo patient with "
                                             "the default model.")
    for parser in (gui, demo):
        parser.add_argument("--checkpoint", help="model checkpoint folder (default: the "
                                                 "shipped model)")
        parser.add_argument("--screenshot", metavar="PNG",
                            help="save the window after the first prediction and quit")
    gui.set_defaults(func=_gui)
    demo.set_defaults(func=_demo)
