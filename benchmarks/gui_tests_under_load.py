"""The GUI test files run again and again on a loaded CPU: does any run crash?

Issue 16's abort (``Fatal Python error: Aborted`` in a GUI test while a worker thread computed
DVHs) appeared only when the CPU was busy with other work. This script reproduces those
conditions and counts: it starts one busy process per core (a tight numpy loop, so the test
process competes for every core as it did then), then runs ``pytest`` on the GUI test files
``--runs`` times, each in a fresh process with ``faulthandler`` on (a native crash prints every
thread's stack) and the allocator tuning of ``engine.cpu_tuning`` applied to the whole process
from its start (``--tuned-malloc``, on by default: the tests that load an engine apply it anyway,
this makes every test run under it). A run that ends by a signal, or whose output holds
``Fatal Python error``, is a crash; test failures are counted apart.

    python -m benchmarks.gui_tests_under_load                        # 5 runs, all GUI test files
    python -m benchmarks.gui_tests_under_load --runs 10 --tests tests/test_gui_window.py

Without a display the runs go through ``xvfb-run`` (as ``make test`` does).
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# applies the engine's glibc malloc tuning before pytest imports anything (see engine.cpu_tuning)
_TUNED_BOOT = ("import sys, pytest; from engine.cpu_tuning import tune_allocator; "
               "tune_allocator(); sys.exit(pytest.main(sys.argv[1:]))")


def _busy(stop: multiprocessing.synchronize.Event) -> None:
    import numpy as np

    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    while not stop.is_set():
        a = np.tanh(a @ a.T * 1e-3)


def _summary(output: str) -> str:
    lines = [line for line in output.strip().splitlines()
             if re.search(r"passed|failed|error", line)]
    return lines[-1].strip("= ") if lines else "(no pytest summary)"


def run_once(tests: list[str], tuned_malloc: bool, log: Path) -> dict:
    """One pytest run of ``tests`` in a fresh process; what it did and whether it crashed."""
    python = [sys.executable, "-X", "faulthandler"]
    command = python + (["-c", _TUNED_BOOT] if tuned_malloc else ["-m", "pytest"])
    command += ["-q", "-p", "no:cacheprovider", *tests]
    if not os.environ.get("DISPLAY"):
        command = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", *command]
    env = dict(os.environ, QT_QPA_PLATFORM="xcb", QT_API="pyside6",
               VTK_DEFAULT_OPENGL_WINDOW="vtkEGLRenderWindow")
    start = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    log.write_text(output)
    # xvfb-run reports a child killed by signal N as 128 + N
    by_signal = proc.returncode < 0 or proc.returncode > 128
    crashed = by_signal or "Fatal Python error" in output
    return {"rc": proc.returncode, "crashed": crashed, "seconds": seconds,
            "summary": _summary(output), "load": os.getloadavg()[0], "log": str(log)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tests", nargs="+", default=None,
                        help="test files (default: tests/test_gui_*.py)")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1,
                        help="busy processes beside the tests (default: one per core)")
    parser.add_argument("--no-tuned-malloc", dest="tuned_malloc", action="store_false")
    parser.add_argument("--logs", type=Path, default=None,
                        help="folder for each run's output (default: a temporary folder)")
    args = parser.parse_args(argv)
    tests = args.tests or sorted(glob.glob(str(ROOT / "tests" / "test_gui_*.py")))
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run") is None:
        parser.error("no display and no xvfb-run: install xvfb (make system)")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="gui-under-load-"))
    logs.mkdir(parents=True, exist_ok=True)

    stop = multiprocessing.Event()
    busy = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True)
            for _ in range(args.busy)]
    for p in busy:
        p.start()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.busy} busy processes, tuned malloc: {args.tuned_malloc}, "
          f"{len(tests)} test files, logs in {logs}", flush=True)
    results = []
    try:
        for k in range(args.runs):
            r = run_once(tests, args.tuned_malloc, logs / f"run_{k:02d}.log")
            results.append(r)
            print(f"run {k + 1}/{args.runs}: rc {r['rc']}, crashed {r['crashed']}, "
                  f"{r['summary']}, {r['seconds']:.0f} s, load {r['load']:.1f}", flush=True)
    finally:
        stop.set()
        for p in busy:
            p.join(5)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
    crashes = sum(r["crashed"] for r in results)
    clean = sum(r["rc"] == 0 for r in results)
    print(f"{len(results)} runs: {crashes} crashed, {clean} passed cleanly, "
          f"{len(results) - crashes - clean} with test failures")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
