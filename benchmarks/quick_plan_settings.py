"""How small can the quick plan get before it stops following the beam? Settings against time.

``python -m benchmarks.quick_plan_settings [--heldout DIR] [--dataset DIR] [--runs 5]``

The quick plan (:mod:`engine.physics.quick_plan`) is the dose refiner's beam input, computed for
every moved beam before the preview shows (DESIGN §9: preview <= 1 s). Its cost is the number of
sampled voxels the objectives read and the optimiser's iterations. For each setting this
measures:

- on the held-out physics plans (``datasets/openkbp-heldout-beams``, as
  ``benchmarks.beam_input_candidates`` does for its ``quick_plan`` candidate): how the quick
  plan's own dose change between two arrangements of one patient agrees with the physics change
  (correlation, sign agreement where physics changes by > 5 % of the prescription, and the ratio
  of the mean |changes| there), the plan scaled so that its mean over the top target is the
  prescription;
- on the demo patient with the shipped model's refiner voxels: the thread CPU time of a moved
  beam's quick plan as the engine computes it (``engine.runtime.refiner_quick_plan`` with the
  case's planner, beam 0 moved 7 degrees at a time; one angle recomputed, the optimisation, the
  dose on every other voxel of the refiner's band), median of ``--runs``.

Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from engine.io.dicom import load_dicom_case
from engine.io.openkbp import load_openkbp_npz
from engine.metrics.beam_change import beam_change_agreement
from engine.physics.dose_calc import body_mask
from engine.physics.quick_plan import QuickPlanner, QuickPlanSettings, quick_plan_dose
from engine.resources import resources_dir
from engine.runtime import DoseEngine, refiner_geometry, refiner_quick_plan

from .beam_input_candidates import _targets
from .heldout_beam_sensitivity import DEFAULT_DATASET, DEFAULT_HELDOUT, heldout_patients

DEFAULT = QuickPlanSettings()
SETTINGS = {
    "default": DEFAULT,
    "12,000 + 4,000 per target": replace(DEFAULT, samples=12000, target_samples=4000),
    "12,000 + 4,000 per target, 100 iterations":
        replace(DEFAULT, samples=12000, target_samples=4000, max_iter=100),
    "reach 2 (5 x 5 bixels)": replace(DEFAULT, reach=2),
    "30 iterations": replace(DEFAULT, max_iter=30),
}


def heldout_agreement(settings: QuickPlanSettings, heldout: Path, dataset: Path) -> dict:
    """Mean change agreement of the quick plan with physics over the held-out pairs."""
    rows = []
    for plans in heldout_patients(heldout, dataset):
        cases = [load_openkbp_npz(p) for p in plans]
        body = body_mask(cases[0])
        _, top, rx = _targets(cases[0])
        doses = []
        for case in cases:
            dose = quick_plan_dose(case, settings=settings)
            doses.append(dose * np.float32(rx / max(float(dose[top].mean()), 1e-6)))
        for a, b in itertools.combinations(range(len(cases)), 2):
            rows.append(beam_change_agreement(doses[a], doses[b], cases[a].dose.array,
                                              cases[b].dose.array, body,
                                              threshold_gy=0.05 * rx).to_dict())
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    return {"pairs": len(rows), "correlation": round(mean["correlation"], 3),
            "sign_agreement": round(mean["sign_agreement"], 3),
            "change_ratio": round(mean["model_mean_abs_gy"] / mean["physics_mean_abs_gy"], 3)}


def moved_beam_seconds(settings: QuickPlanSettings, runs: int) -> float:
    """Median thread CPU seconds of a moved beam's quick plan at the shipped refiner's voxels
    of the demo patient."""
    engine = DoseEngine.from_checkpoint(threads=1)
    case = load_dicom_case(resources_dir() / "demo")
    inputs = engine.model_inputs(case)
    geometry = refiner_geometry(inputs, engine.model.refiner.config)
    planner = QuickPlanner(case, settings)
    refiner_quick_plan(case, case.plan, inputs, geometry, planner)  # the case's own angles
    base = case.plan.beams[0].gantry_deg
    seconds = []
    for i in range(runs):
        plan = case.plan.with_gantry(0, (base + 7.0 * (i + 1)) % 360.0)
        t0 = time.thread_time()
        refiner_quick_plan(case, plan, inputs, geometry, planner)
        seconds.append(time.thread_time() - t0)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quick_plan_settings",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heldout", type=Path, default=DEFAULT_HELDOUT)
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    for name, settings in SETTINGS.items():
        print(json.dumps({"setting": name, **{k: v for k, v in asdict(settings).items()
                                              if k in ("samples", "target_samples", "max_iter",
                                                       "reach")},
                          "moved_beam_cpu_s": round(moved_beam_seconds(settings, args.runs), 3),
                          **heldout_agreement(settings, args.heldout, args.dataset),
                          "machine": f"{platform.processor() or platform.machine()}, "
                                     f"{os.cpu_count()} CPUs",
                          "load_average": os.getloadavg()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
