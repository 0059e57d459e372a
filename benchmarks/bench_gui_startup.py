"""Time from launching ``dosepilot gui PATH`` to an interactive window showing the patient.

Each run starts a fresh process (``python -m engine.cli gui PATH``) and waits for the app's
"window ready" log line, which it writes after the first paint of the window with the patient's
CT, contours and beams (the event loop is then taking input; the dose model keeps loading in
the background). The patient is the engine's phantom written as DICOM (CT, RTSTRUCT, RTPLAN,
RTDOSE). Under no display the runs use ``xvfb-run``.

    python -m benchmarks.bench_gui_startup                 # 5 runs, 96 x 256 x 256 CT
    python -m benchmarks.bench_gui_startup --repeats 3 --no-patient
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 5.0


def _command(path: Path | None) -> list[str]:
    argv = [sys.executable, "-m", "engine.cli", "gui"] + ([str(path)] if path else [])
    if not os.environ.get("DISPLAY"):
        if not shutil.which("xvfb-run"):
            raise SystemExit("no display and no xvfb-run: cannot start the GUI")
        argv = ["xvfb-run", "-a", "-s", "-screen 0 1920x1200x24"] + argv
    return argv


def time_startup(path: Path | None, timeout_s: float = 120.0) -> tuple[float, float]:
    """Seconds from spawning the app to its "window ready" line, and the part of it spent in
    ``planner_gui.app.run`` (the rest is interpreter start, imports and the CLI's parser)."""
    env = dict(os.environ, QT_QPA_PLATFORM="xcb", QT_API="pyside6")
    t0 = time.perf_counter()
    proc = subprocess.Popen(_command(path), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env, start_new_session=True)
    try:
        for line in proc.stderr:
            if "window ready" in line:
                in_run = float(re.search(r"after ([0-9.]+) s", line).group(1))
                return time.perf_counter() - t0, in_run
            if time.perf_counter() - t0 > timeout_s:
                break
        raise RuntimeError(f"the app did not report ready (exit code {proc.poll()})")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-patient", action="store_true", help="start on an empty window")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 256, 256),
                        help="phantom CT size (slices rows columns)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if not args.no_patient:
            from engine.phantom import PhantomSpec, write_phantom

            spec = PhantomSpec(shape=tuple(args.shape), spacing=(3.0, 1.0, 1.0), with_dose=True)
            write_phantom(Path(tmp) / "patient", spec)
            path = Path(tmp) / "patient"
        runs = [time_startup(path) for _ in range(args.repeats)]
    times = [total for total, _ in runs]
    median = statistics.median(times)
    in_run = statistics.median(part for _, part in runs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    what = "empty window" if args.no_patient else f"phantom {tuple(args.shape)} CT"
    print(f"GUI startup to interactive window ({what}): median {median:.2f} s, "
          f"min {min(times):.2f} s, max {max(times):.2f} s over {len(times)} runs, of which "
          f"{in_run:.2f} s (median) in the app after imports and CLI parsing "
          f"(budget {BUDGET_S:.0f} s); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")


if __name__ == "__main__":
    main()
