"""DVH + all metrics for 30 structures: time per new dose, on the model grid and a full CT grid.

The case is the synthetic head-and-neck phantom (``engine.phantom``: body, vertebra with a hole,
cord, trachea, oesophagus, larynx, brainstem, parotids, two PTVs, plus extra small organs up to
30 ROIs) with its synthetic target dose plus a smooth low-dose bath (``benchmarks.dvh_phantom``),
so every organ sits in a dose gradient. Structures are prepared once (contour partial volumes,
as the app does for a loaded case); each timed call is ``engine.metrics.dvh.all_metrics``: the
30 cumulative DVHs and every metric of ``DoseMetrics`` (mean/min/max, D98/D95/D50/D2,
D0.03cc/D0.1cc, V20Gy, HI and Paddick CI for the targets). Reported: median and min wall time,
median CPU time of this process (less sensitive to other jobs on a shared machine), and the
one-off preparation time. On the CT grid the DVHs are evaluated on 3 x 3 in-plane blocks (see
``engine.metrics.dvh``); the script also reports the largest relative difference of Dmean and
D95 (structures >= 5 cc) from a voxel-by-voxel evaluation of the same dose.

    python -m benchmarks.bench_dvh                 # both grids
    python -m benchmarks.bench_dvh --grids model --repeats 31 --tuned-malloc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

GRIDS = {
    "model": ((97, 128, 160), (2.0, 2.5, 2.5)),
    "ct512": ((150, 512, 512), (2.0, 0.977, 0.977)),
}


def run(grid: str, repeats: int) -> dict:
    from benchmarks.dvh_phantom import phantom_with_bath
    from engine.metrics.dvh import all_metrics, prepare

    shape, spacing = GRIDS[grid]
    case = phantom_with_bath(shape, spacing)
    dose = case.dose.array
    t0 = time.perf_counter()
    structures = prepare(case.structures, case.geometry)
    prep = time.perf_counter() - t0
    for _ in range(2):
        all_metrics(dose, structures, case.geometry)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        all_metrics(dose, structures, case.geometry)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    accuracy = {}
    if structures.samples[0].block > 1:
        # the same metrics evaluated voxel by voxel on the CT grid, for the block model's error
        full = prepare(case.structures, case.geometry, block=1)
        _, reference = all_metrics(dose, full, case.geometry)
        _, fast = all_metrics(dose, structures, case.geometry)
        for key in ("mean_gy", "d95_gy"):
            diffs = [(abs(getattr(a, key) - getattr(b, key)), abs(getattr(b, key)), b.name)
                     for a, b in zip(fast, reference) if b.volume_cc >= 5.0]
            rel = max(diffs, key=lambda t: t[0] / max(t[1], 1e-6))
            accuracy[f"{key}_vs_voxelwise"] = {
                "max_abs_gy": round(max(t[0] for t in diffs), 4),
                "max_rel": round(rel[0] / max(rel[1], 1e-6), 5), "worst_rel": rel[2],
                "worst_rel_value_gy": round(rel[1], 3)}
    return {"grid": grid, "shape": shape, "structures": len(case.structures),
            "block": structures.samples[0].block, **accuracy,
            "voxels_in_structures": int(len(structures.flat_index)),
            "median_ms": round(1000 * statistics.median(wall), 1),
            "min_ms": round(1000 * min(wall), 1),
            "median_cpu_ms": round(1000 * statistics.median(cpu), 1),
            "prepare_s": round(prep, 2), "repeats": repeats,
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "machine": f"{platform.machine()} {os.cpu_count()} cpus"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", nargs="+", choices=sorted(GRIDS), default=sorted(GRIDS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tuned-malloc", action="store_true",
                        help="apply engine.cpu_tuning.tune_allocator() first (as the app does)")
    args = parser.parse_args()
    if args.tuned_malloc:
        from engine.cpu_tuning import tune_allocator

        tune_allocator()
    for grid in args.grids:
        result = run(grid, args.repeats)
        result["tuned_malloc"] = args.tuned_malloc
        print(json.dumps(result))


if __name__ == "__main__":
    main()
