"""Entry point of the DosePilot desktop bundle (PyInstaller): the ``dosepilot`` command line.

Without arguments the bundle opens the demo patient (what a double-click on the desktop entry
should do). ``--self-test [--model CKPT]`` is ``dosepilot self-test``, after checking that the
GUI's modules (Qt, VTK, pyqtgraph) are in the bundle. ``-m engine.cli ARGS`` (how the GUI
starts a sub-process with ``sys.executable``) is ``dosepilot ARGS``; the bundle has no trainer,
so ``train`` (the GUI's training panel) ends with one clear line saying so. Anything else goes
to the ``dosepilot`` command line unchanged, e.g. ``DosePilot gui /path/to/dicom``.
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import sys

GUI_MODULES = ("PySide6.QtWidgets", "pyvistaqt", "pyqtgraph", "qasync",
               "planner_gui.main_window")
TRAINER_MODULE = "trainer"
NO_TRAINER = ("dosepilot train: error: this DosePilot bundle does not include the trainer; "
              "train with the pip installation of DosePilot (see README)")


def bundle_argv(argv: list[str]) -> list[str]:
    """The ``dosepilot`` arguments for the bundle's command line ``argv`` (without argv[0])."""
    if not argv:
        return ["demo"]
    if argv[0] == "--self-test":
        return ["self-test", *argv[1:]]
    if argv[:2] == ["-m", "engine.cli"]:
        return argv[2:]
    return list(argv)


def check_gui_modules() -> None:
    """Import the GUI's modules (no window, no display needed); exit 1 naming a missing one."""
    for name in GUI_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"self-test FAILED: the bundle cannot import {name}: {exc}", file=sys.stderr)
            sys.exit(1)
    print(f"GUI modules: {', '.join(GUI_MODULES)} OK")


def main() -> int:
    multiprocessing.freeze_support()
    args = bundle_argv(sys.argv[1:])
    if args[:1] == ["self-test"]:
        check_gui_modules()
    if args[:1] == ["train"] and importlib.util.find_spec(TRAINER_MODULE) is None:
        print(NO_TRAINER, file=sys.stderr)
        return 2
    from engine.cli import main as dosepilot_main

    return dosepilot_main(args)


if __name__ == "__main__":
    sys.exit(main())
