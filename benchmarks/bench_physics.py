"""Physics reference dose: time per plan and agreement with the clinical OpenKBP doses.

``python -m benchmarks.bench_physics [--dataset DIR] [--cases N]``

For the first N OpenKBP cases (natural order) it computes the physics dose of the clinical
beam arrangement (nine fields at 0, 40, ..., 320 degrees) and compares it with the shipped
clinical dose inside the body (OpenKBP's possible-dose mask): MAE, PTV D95 and OAR mean-dose
differences (physics - clinical). On the first case it also times a random 7-beam plan and a
random arc plan, as ``physics generate`` makes them. Wall time and the engine's CPU time (user +
system of the subprocess; less sensitive to other jobs on a shared machine) are reported.
Prints one JSON line per plan, then a summary. Needs the
physics environment (``make physics-env``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from engine.io.openkbp import load_openkbp_npz
from engine.physics import dataset as pd
from engine.physics.dose_calc import PhysicsSettings, compute_physics_dose, dose_comparison

DEFAULT_DATASET = Path(__file__).resolve().parents[1].parent / "shared/data/openkbp/train"


def _timed(case, plan, settings):
    """(result, wall s, CPU s of the engine subprocess: user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = compute_physics_dose(case, plan, settings)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result, wall, cpu


def _row(case, result, seconds: float, cpu_s: float) -> dict:
    out = {"case": case.name, "wall_s": round(seconds, 1), "cpu_s": round(cpu_s, 1),
           "engine_s": {k: round(v, 1) for k, v in result.info["timings_s"].items()},
           "beams": len(result.delivery_gantry_deg), "bixels": result.info["num_bixels"],
           "normalization": round(result.normalization, 3)}
    if case.dose is not None:
        cmp = dose_comparison(case, result.dose.array, case.dose.array)
        out["vs_clinical"] = {k: round(v, 2) for k, v in cmp.items()}
        ptv = case.structure("PTV70").mask if any(s.name == "PTV70" for s in case.targets) \
            else None
        if ptv is not None and ptv.any():
            out["PTV70_D95_physics_gy"] = round(float(np.percentile(result.dose.array[ptv], 5)), 2)
            out["PTV70_D95_clinical_gy"] = round(float(np.percentile(case.dose.array[ptv], 5)), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_physics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--random", choices=("none", "static", "both"), default="both",
                   help="random plans to time on the first case: none, a 7-beam static plan, "
                        "or that and an arc plan (default)")
    args = p.parse_args(argv)
    settings = PhysicsSettings()
    cases = pd.list_cases(args.dataset)[:args.cases]
    rows = []
    for path in cases:
        case = load_openkbp_npz(path)
        rows.append(_row(case, *_timed(case, case.plan, settings)))
        print(json.dumps(rows[-1]), flush=True)
    random_rows = []
    first = pd.list_cases(args.dataset)[:1]
    if args.random != "none" and first:
        case = load_openkbp_npz(first[0])
        rng = np.random.default_rng(0)
        for want_arc in (False, True)[:2 if args.random == "both" else 1]:
            arrangement = pd.random_arrangement(rng, (7, 7), 1.0 if want_arc else 0.0)
            plan = dataclasses.replace(case.plan,
                                       beams=arrangement.beams(case.plan.isocenter_mm))
            row = _row(case, *_timed(case, plan, settings))
            row["arrangement"] = "arc" if want_arc else "7 random static beams"
            random_rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
        "settings": dataclasses.asdict(settings),
        "clinical_angles": rows,
        "random_plans": random_rows,
        "median_wall_s_clinical": statistics.median(r["wall_s"] for r in rows) if rows else None,
        "median_cpu_s_clinical": statistics.median(r["cpu_s"] for r in rows) if rows else None,
        "mean_mae_gy": statistics.mean(r["vs_clinical"]["mae_gy"] for r in rows) if rows
        else None,
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
