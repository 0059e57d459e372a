"""A large study opens and predicts: 400-slice 512 x 512 CT, 40-ROI RTSTRUCT, RTPLAN (issue 16).

What it proves: a study of this size opens (``load_dicom_case``) and gets a full prediction from
the shipped model (``DoseEngine.predict``, resources/models/default, ``--steps``, default 10), with
wall times and peak memory. The same measurement runs in the same run on the planning-size study
of :mod:`benchmarks.bench_dicom_open` (150 slices, 30 ROIs) as the peer the large study's figures
are compared with.

Each study is a phantom written with pydicom (``python -m engine.phantom``, 0.98 x 0.98 x 2 mm
voxels, 9 static beams) into a temporary folder by its own process, and measured in a fresh
process in the order a planner meets it: the dose engine is loaded (its allocator tuning keeps
freed memory, as in the GUI), the study is opened, one prediction runs. Peak memory is the
measuring process's peak resident set size (``resource.getrusage(...).ru_maxrss``) after each
phase. The folders are deleted afterwards.

    python -m benchmarks.bench_large_study [--steps 10] [--threads 1] [--no-peer]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_dicom_open import SPEC as PLANNING
from engine.phantom import PhantomSpec

# 11 anatomical ROIs + 29 extra organs = 40; 400 slices of 2 mm = 80 cm (head to pelvis)
LARGE = dataclasses.replace(PLANNING, shape=(400, 512, 512), extra_oars=29, name="LARGE")
REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    """This process's peak resident set size so far, MB (ru_maxrss: KB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def measure(folder: Path, steps: int, threads: int) -> dict:
    """Load the engine, open ``folder``, predict once; wall times (s) and peak RSS (MB)."""
    from engine.io.dicom import load_dicom_case
    from engine.runtime import DoseEngine

    out: dict = {"peak_rss_mb": {"start": _peak_rss_mb()}}
    t0 = time.perf_counter()
    engine = DoseEngine.from_checkpoint(REPO / "resources" / "models" / "default",
                                        threads=threads)
    out["engine_load_s"] = time.perf_counter() - t0
    out["peak_rss_mb"]["engine"] = _peak_rss_mb()
    t0 = time.perf_counter()
    case = load_dicom_case(folder)
    out["open_s"] = time.perf_counter() - t0
    out["peak_rss_mb"]["open"] = _peak_rss_mb()
    t0 = time.perf_counter()
    result = engine.predict(case, steps=steps)
    out["predict_s"] = time.perf_counter() - t0
    out["peak_rss_mb"]["predict"] = _peak_rss_mb()
    out.update(shape=list(case.geometry.shape), structures=len(case.structures),
               beams=len(case.plan.beams) if case.plan else 0, warnings=list(case.warnings),
               ct_mb=case.ct.array.nbytes / 2**20, steps=steps, threads=engine.threads,
               stages_s=result.timings_s, dose_max_gy=float(result.dose.array.max()),
               dvhs=len(result.dvhs))
    return out


def _phantom_args(spec: PhantomSpec) -> list[str]:
    return ["--shape", *map(str, spec.shape), "--spacing", *map(str, spec.spacing),
            "--beams", str(spec.n_beams), "--extra-oars", str(spec.extra_oars),
            "--name", spec.name]


def run_study(spec: PhantomSpec, steps: int, threads: int) -> dict:
    """Write ``spec`` into a temporary folder and measure it, each in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="dosepilot-large-") as tmp:
        folder = Path(tmp) / "study"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "engine.phantom", str(folder),
                        *_phantom_args(spec)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        written = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_large_study",
                               "--measure", str(folder), "--steps", str(steps),
                               "--threads", str(threads)], cwd=REPO, check=True,
                              capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(write_s=written, files_mb=size_mb)
    expected_rois = 11 + spec.extra_oars
    if result["structures"] != expected_rois or result["shape"] != list(spec.shape):
        raise RuntimeError(f"{spec.name}: opened {result['shape']} with {result['structures']} "
                           f"structures, expected {list(spec.shape)} and {expected_rois}")
    return result


def _line(name: str, r: dict) -> str:
    p = r["peak_rss_mb"]
    stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items() if k != "total")
    return (f"{name}: {' x '.join(map(str, r['shape']))} CT, {r['structures']} ROIs, "
            f"{r['files_mb']:.0f} MB of DICOM (written in {r['write_s']:.0f} s)\n"
            f"  open {r['open_s']:.2f} s, predict ({r['steps']} steps, {r['threads']} thread"
            f"{'s' if r['threads'] > 1 else ''}) {r['predict_s']:.2f} s [{stages}]\n"
            f"  peak RSS: engine loaded {p['engine']:.0f} MB, after open {p['open']:.0f} MB, "
            f"after predict {p['predict']:.0f} MB (CT array {r['ct_mb']:.0f} MB); "
            f"dose max {r['dose_max_gy']:.1f} Gy, {r['dvhs']} DVHs, "
            f"{len(r['warnings'])} import warnings")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="sampler steps of the prediction")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    parser.add_argument("--no-peer", action="store_true",
                        help="skip the 150-slice planning-size study")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:  # the measuring child process
        print(json.dumps(measure(args.measure, args.steps, args.threads)))
        return 0
    started = dt.datetime.now(dt.timezone.utc)
    load = [os.getloadavg()[0]]
    results = {} if args.no_peer else {"planning": run_study(PLANNING, args.steps,
                                                             args.threads)}
    results["large"] = run_study(LARGE, args.steps, args.threads)
    load.append(os.getloadavg()[0])
    for name, r in results.items():
        print(_line(name, r))
    big = results["large"]
    row = (f"| large study: 400-slice 512x512 CT + 40-ROI RTSTRUCT + RTPLAN opened "
           f"(`load_dicom_case`) and predicted by the shipped model ({big['steps']} steps, "
           f"{big['threads']} thread), engine loaded first, `python -m "
           f"benchmarks.bench_large_study` | open {big['open_s']:.1f} s, predict "
           f"{big['predict_s']:.1f} s; peak RSS {big['peak_rss_mb']['open']:.0f} MB after open, "
           f"{big['peak_rss_mb']['predict']:.0f} MB after predict")
    if "planning" in results:
        small = results["planning"]
        row += (f"; peer 150-slice 30-ROI study, same run: open {small['open_s']:.1f} s, "
                f"predict {small['predict_s']:.1f} s, peak {small['peak_rss_mb']['predict']:.0f}"
                f" MB (large/peer: open {big['open_s'] / small['open_s']:.1f}x, predict "
                f"{big['predict_s'] / small['predict_s']:.1f}x, peak memory "
                f"{big['peak_rss_mb']['predict'] / small['peak_rss_mb']['predict']:.1f}x for "
                f"2.7x the voxels)")
    print("results row:")
    print(f"{row} | {platform.machine()}, {os.cpu_count()} CPUs | "
          f"{started:%Y-%m-%d %H:%M} UTC | load average {load[0]:.1f} -> {load[1]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
