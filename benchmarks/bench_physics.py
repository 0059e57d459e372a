"""Physics reference dose: time per plan and agreement with the clinical OpenKBP doses.

``python -m benchmarks.bench_physics [--dataset DIR] [--cases N]``

For the first N OpenKBP cases (natural order) it computes the physics dose of the clinical
beam arrangement (nine fields at 0, 40, ..., 320 degrees) and compares it with the shipped
clinical dose inside the body (OpenKBP's possible-dose mask): MAE, PTV D95 and OAR mean-dose
differences (physics - clinical). On the first case it also times a random 7-beam plan and a
random arc plan, as ``physics generate`` makes them. Prints one JSON document. Needs the
physics environment (``make physics-env``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from engine import physics_dataset as pd
from engine.case import Technique
from engine.io.openkbp import load_openkbp_npz
from engine.physics import PhysicsSettings, compute_physics_dose, dose_comparison

DEFAULT_DATASET = Path(__file__).resolve().parents[1].parent / "shared/data/openkbp/train"


def _timed(case, plan, settings):
    t0 = time.perf_counter()
    result = compute_physics_dose(case, plan, settings)
    return result, time.perf_counter() - t0


def _row(case, result, seconds: float) -> dict:
    out = {"case": case.name, "wall_s": round(seconds, 1),
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
    p.add_argument("--no-random", action="store_true", help="skip the random plans")
    args = p.parse_args(argv)
    settings = PhysicsSettings()
    cases = pd.list_cases(args.dataset)[:args.cases]
    rows = []
    for path in cases:
        case = load_openkbp_npz(path)
        result, seconds = _timed(case, case.plan, settings)
        rows.append(_row(case, result, seconds))
        print(json.dumps(rows[-1]), flush=True)
    random_rows = []
    if not args.no_random and cases:
        case = load_openkbp_npz(cases[0])
        rng = np.random.default_rng(0)
        while len(random_rows) < 2:
            want_arc = len(random_rows) == 1
            arrangement = pd.random_arrangement(rng, (7, 7), 1.0 if want_arc else 0.0)
            assert (arrangement.techniques[0] is Technique.ARC) == want_arc
            plan = dataclasses.replace(case.plan,
                                       beams=arrangement.beams(case.plan.isocenter_mm))
            result, seconds = _timed(case, plan, settings)
            row = _row(case, result, seconds)
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
        "mean_mae_gy": statistics.mean(r["vs_clinical"]["mae_gy"] for r in rows) if rows
        else None,
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
