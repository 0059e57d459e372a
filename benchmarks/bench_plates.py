"""Beam + angle plates for 9 static beams on the 97 x 128 x 160 model grid.

Budget (DESIGN §9): <= 50 ms median. Compared in the same run with the straightforward version
of the GDP-HMM toolkit algorithm (a Python loop over PTV surface voxels, one rasterised ray
each: tests/test_plates_reference.py). The target is a real head-and-neck PTV union (OpenKBP
pt_1 resampled onto the model grid) when the shared data is present, else two overlapping
ellipsoids of similar size. Reports the medians, the speed-up and the voxel agreement, with the
default 2 worker threads and with 1; the single-thread process CPU time is the figure to compare
across runs on a busy machine (it is close to the idle single-thread wall time).

    python -m benchmarks.bench_plates [--repeats 15] [--reference-repeats 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from engine.features.beam_geometry import source_direction_lps
from engine.features.model_grid import ISOCENTER_VOXEL, MODEL_SHAPE, ModelGridTransform
from engine.features.plates import angle_plate, beam_plate
from tests.test_plates_reference import reference_all_beam_plate, reference_source

ANGLES = [float(a) for a in range(0, 360, 40)]
OPENKBP_CASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "openkbp" / "train" / \
    "pt_1.npz"


def _ptv() -> tuple[np.ndarray, str]:
    if OPENKBP_CASE.is_file():
        from engine.io.openkbp import load_openkbp_npz
        case = load_openkbp_npz(OPENKBP_CASE)
        tf = ModelGridTransform.around(case.geometry, case.plan.isocenter_mm)
        union = np.logical_or.reduce([t.mask for t in case.targets])
        return tf.to_model(union, order=0), f"OpenKBP {OPENKBP_CASE.stem} PTV union"
    g = np.meshgrid(*(np.arange(n) for n in MODEL_SHAPE), indexing="ij")
    a = ((g[0] - 46) / 14.0) ** 2 + ((g[1] - 60) / 18.0) ** 2 + ((g[2] - 82) / 24.0) ** 2 <= 1
    b = ((g[0] - 60) / 8.0) ** 2 + ((g[1] - 70) / 8.0) ** 2 + ((g[2] - 50) / 10.0) ** 2 <= 1
    return a | b, "synthetic two-ellipsoid PTV"


def _fast(ptv: np.ndarray, sources: np.ndarray, directions: np.ndarray, workers: int = 2
          ) -> np.ndarray:
    plate = beam_plate(ptv, ISOCENTER_VOXEL, sources, workers=workers)
    angle_plate(ptv.shape, ISOCENTER_VOXEL, directions)
    return plate


def _timed(fn, repeats: int) -> tuple[list[float], list[float], object]:
    """Wall and process-CPU seconds per call (the CPU time is what an idle machine would see
    for this single-threaded code; the wall time includes waiting for other jobs)."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--reference-repeats", type=int, default=1)
    args = parser.parse_args(argv)
    ptv, what = _ptv()
    sources = np.array([reference_source(ISOCENTER_VOXEL, a) for a in ANGLES], dtype=float)
    directions = np.array([source_direction_lps(a)[[1, 0]] for a in ANGLES])
    _fast(ptv, sources, directions)  # warm-up
    fast_t, fast_cpu, fast = _timed(lambda: _fast(ptv, sources, directions), args.repeats)
    one_t, one_cpu, one = _timed(lambda: _fast(ptv, sources, directions, workers=1),
                                 args.repeats)
    if not np.array_equal(one, fast):
        raise AssertionError("1 and 2 worker threads gave different plates")
    ref_t, ref_cpu, ref = _timed(lambda: reference_all_beam_plate(ptv, ISOCENTER_VOXEL, ANGLES),
                                 args.reference_repeats)
    agree = float(np.mean(np.isclose(fast, ref, rtol=1e-5, atol=1e-6)))
    fm, rm = statistics.median(fast_t), statistics.median(ref_t)
    fc, rc = statistics.median(fast_cpu), statistics.median(ref_cpu)
    print(f"target: {what}, {int(ptv.sum())} voxels; 9 beams at 0..320 deg on "
          f"{'x'.join(map(str, MODEL_SHAPE))}")
    print(f"vectorised beam + angle plates: median {fm * 1e3:.1f} ms "
          f"(min {min(fast_t) * 1e3:.1f}, max {max(fast_t) * 1e3:.1f}, n={len(fast_t)})")
    print(f"  process CPU time: median {fc * 1e3:.1f} ms")
    print(f"  1 thread: median {statistics.median(one_t) * 1e3:.1f} ms "
          f"(min {min(one_t) * 1e3:.1f}), process CPU time median "
          f"{statistics.median(one_cpu) * 1e3:.1f} ms (min {min(one_cpu) * 1e3:.1f})")
    print(f"straightforward loop version:   median {rm:.2f} s, CPU {rc:.2f} s (n={len(ref_t)})")
    print(f"speed-up {rm / fm:.0f}x wall, {rc / fc:.0f}x CPU; voxels equal to the reference: "
          f"{agree * 100:.3f} %")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, {dt.date.today()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
