"""Qt widgets finalised by a garbage collection in a worker thread crash the process; collected
on the GUI thread (``planner_gui.gui_gc``) they do not.

Each round is a fresh process running for ``--seconds``: the GUI thread keeps creating small
widget trees caught in a reference cycle and dropping them (as the views of a closed window
are), and redraws a pyqtgraph plot; a worker thread runs, in a loop, one of the jobs the window
runs off the GUI thread: ``dicom`` reads a phantom patient's DICOM study (opening a patient),
``dvh`` prepares the partial-volume DVHs of its structures (``engine.metrics.dvh.prepare`` ->
``contour_occupancy``, the job the reported abort was in). Their allocations trigger CPython's
automatic collections, which then run in the worker and delete the widgets' C++ objects there.

Modes: ``automatic`` (CPython's automatic collection, the code before the fix) and
``gui-thread`` (``gui_gc.hold()``, as the main window does now). A round that ends by a signal
is a crash. Without a display the rounds use Qt's offscreen platform.

    python -m benchmarks.gc_thread_stress                      # 5 rounds x 30 s per mode
    python -m benchmarks.gc_thread_stress --rounds 10 --modes gui-thread --job dvh --tuned-malloc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

MODES = ("automatic", "gui-thread")
JOBS = ("dicom", "dvh")


def _worker_job(job: str, folder: str) -> Callable[[], object]:
    """The worker's job, repeated: read the phantom study, or prepare its DVH samples."""
    from engine.io.dicom import load_dicom_case
    from engine.metrics.dvh import prepare
    from engine.phantom import PhantomSpec, write_phantom

    study = write_phantom(Path(folder), PhantomSpec(shape=(24, 56, 64), spacing=(4.0, 4.0, 4.0)))
    if job == "dicom":
        return lambda: load_dicom_case(Path(folder))
    case = study.case
    return lambda: prepare(case.structures, case.geometry)


def _child(mode: str, job: str, seconds: float, tuned_malloc: bool) -> None:
    import gc

    import pyqtgraph as pg
    from PySide6 import QtWidgets

    import planner_gui  # noqa: F401 - the bindings' refcount guard
    from planner_gui import gui_gc

    if tuned_malloc:
        from engine.cpu_tuning import tune_allocator

        tune_allocator()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    if mode == "gui-thread":
        gui_gc.hold()
    folder = tempfile.TemporaryDirectory()
    run_job = _worker_job(job, folder.name)
    freed = {"gui": 0, "worker": 0}
    main = threading.main_thread()

    def count(phase: str, info: dict) -> None:
        if phase == "stop":
            freed["gui" if threading.current_thread() is main else "worker"] += info["collected"]

    gc.callbacks.append(count)
    stop = threading.Event()
    jobs = [0]

    def worker() -> None:
        while not stop.is_set():
            run_job()
            jobs[0] += 1

    threading.Thread(target=worker, daemon=True).start()
    plot = pg.PlotWidget()
    plot.show()
    widgets = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(20):
            tree = QtWidgets.QWidget()
            QtWidgets.QVBoxLayout(tree).addWidget(QtWidgets.QLabel("structure"))
            tree.cycle = tree
            del tree
            widgets += 1
        plot.plot([1, 2, 3], [3, 1, 2], clear=True)
        app.processEvents()
    stop.set()
    print(json.dumps({"widgets": widgets, "jobs": jobs[0], "freed": freed}), flush=True)
    folder.cleanup()
    os._exit(0)  # the worker may be inside its job; the result is printed


def _round(mode: str, job: str, seconds: float, tuned_malloc: bool) -> dict:
    env = dict(os.environ, QT_API="pyside6")
    env.setdefault("QT_QPA_PLATFORM", "xcb" if env.get("DISPLAY") else "offscreen")
    argv = [sys.executable, "-X", "faulthandler", "-m", "benchmarks.gc_thread_stress",
            "--child", mode, "--job", job, "--seconds", str(seconds)]
    if tuned_malloc:
        argv.append("--tuned-malloc")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env,
                          timeout=seconds + 120)
    out = {"mode": mode, "returncode": proc.returncode}
    if proc.returncode < 0:
        out["signal"] = signal.Signals(-proc.returncode).name
        fatal = [line for line in proc.stderr.splitlines() if line.startswith("Fatal Python")]
        out["message"] = fatal[0] if fatal else proc.stderr.strip().splitlines()[-1:]
    elif proc.returncode == 0:
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        out["message"] = proc.stderr.strip()[-500:]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--job", choices=JOBS, default="dicom", help="the worker's job")
    parser.add_argument("--tuned-malloc", action="store_true",
                        help="apply engine.cpu_tuning.tune_allocator() first (as the engine does)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.job, args.seconds, args.tuned_malloc)
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f}; worker job {args.job}; {args.rounds} rounds x "
          f"{args.seconds:.0f} s per mode"
          f"{', tuned malloc' if args.tuned_malloc else ''}")
    for mode in args.modes:
        rounds = []
        for n in range(args.rounds):
            result = _round(mode, args.job, args.seconds, args.tuned_malloc)
            rounds.append(result)
            print(f"  {mode} round {n + 1}: {json.dumps(result)}", flush=True)
        crashes = [r for r in rounds if r["returncode"] != 0]
        ok = [r for r in rounds if r["returncode"] == 0]
        worker = sum(r["freed"]["worker"] for r in ok)
        gui = sum(r["freed"]["gui"] for r in ok)
        print(f"{mode}: {len(crashes)} of {len(rounds)} rounds crashed "
              f"({', '.join(sorted({r.get('signal', 'error') for r in crashes})) or '-'}); "
              f"in the rounds that finished, collections freed {worker} objects in the worker "
              f"and {gui} in the GUI thread")


if __name__ == "__main__":
    main()
