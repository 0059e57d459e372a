"""Open a planning-size DICOM patient: 150-slice 512 x 512 CT, 30-ROI RTSTRUCT, RTPLAN.

Budget (DESIGN §9): <= 3 s median on the 2-core reference machine. The patient is a phantom
written with pydicom into a temporary folder (0.98 x 0.98 x 2 mm voxels, 30 ROIs with ~450k
contour points, 9 static beams). The files are opened once to warm the OS file cache, then
``--repeats`` times; reported are the median and range of ``load_dicom_case`` and, as a floor
for comparison, of reading the same files with plain ``pydicom.dcmread`` (no pixel decoding,
no rasterisation).

    python -m benchmarks.bench_dicom_open [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pydicom

from engine.io.dicom import load_dicom_case
from engine.phantom import PhantomSpec, write_phantom

SPEC = PhantomSpec(shape=(150, 512, 512), spacing=(2.0, 0.9766, 0.9766), extra_oars=19,
                   n_beams=9, name="BENCH")


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _read_all(folder: Path) -> None:
    for path in folder.rglob("*.dcm"):
        pydicom.dcmread(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dosepilot-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        write_phantom(folder, SPEC)
        made = time.perf_counter() - t0
        case = load_dicom_case(folder)  # warm-up, and a check of what is being timed
        assert case.geometry.shape == SPEC.shape and len(case.structures) == 30
        assert case.plan is not None and len(case.plan.beams) == SPEC.n_beams
        opens = _timed(lambda: load_dicom_case(folder), args.repeats)
        reads = _timed(lambda: _read_all(folder), args.repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    med, floor = statistics.median(opens), statistics.median(reads)
    print(f"generated the phantom in {made:.1f} s")
    print(f"load_dicom_case: median {med:.2f} s (min {min(opens):.2f}, max {max(opens):.2f}, "
          f"n={len(opens)})")
    print(f"pydicom.dcmread of the same files: median {floor:.2f} s")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"1-min load average {load:.1f}")
    print("results row:")
    print(f"| open a DICOM patient: 150-slice 512x512 CT + 30-ROI RTSTRUCT + RTPLAN with "
          f"`load_dicom_case`, warm file cache, `python -m benchmarks.bench_dicom_open` (budget "
          f"<= 3 s) | {med:.2f} s (min {min(opens):.2f} s, max {max(opens):.2f} s of "
          f"{len(opens)}); plain `pydicom.dcmread` of the same files: {floor:.2f} s | "
          f"{platform.machine()}, {os.cpu_count()} CPUs | {dt.date.today()} | load average "
          f"{load:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
