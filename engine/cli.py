"""The ``dosepilot`` command line: one entry point, one subcommand per module.

Each command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` (called with the parsed namespace, returning an exit code). Modules are imported by
name so that ``engine`` has no import-time dependency on ``trainer`` or ``planner_gui``
(DESIGN §1); a missing optional part only removes its commands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from engine.errors import UserError

COMMAND_MODULES: tuple[str, ...] = (
    "engine.commands.inspect_cmd",
    "engine.commands.convert_cmd",
    "engine.commands.dvh_cmd",
    "engine.commands.evaluate_cmd",
    "trainer.cli",
    "planner_gui.cli",
    "engine.commands.physics_cmd",
    "engine.commands.predict_cmd",
    "engine.commands.suggest_cmd",
    "engine.commands.compare_cmd",
    "engine.commands.bench_cmd",
    "engine.commands.selftest_cmd",
    "engine.commands.pacs_cmd",
    "engine.commands.listen_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dosepilot",
        description="DosePilot: radiotherapy planning assistant with AI dose prediction.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part of DosePilot is not installed
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"dosepilot {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
