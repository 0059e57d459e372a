"""Beam sensitivity of a dose model against physics: move one beam by 40 degrees.

``python -m benchmarks.beam_sensitivity [--model DIR [DIR ...]] [--cases pt_201 pt_210 ...]
[--beam K] [--delta 40]``

For each OpenKBP validation case: the physics dose (``engine.physics.dose_calc``, pyRadPlan,
optimised and normalised like the generated training plans) and each model's 10-step prediction
and 1-step preview, each for the clinical nine-beam plan and for the same plan with beam K rotated
by ``--delta`` degrees. Several ``--model`` bundles are compared against the same physics doses
(computed once per case), e.g. a new model and the shipped one. The two dose changes are
compared inside the body (``engine.metrics.beam_change``): correlation, and where physics
changes by more than 5 % of the prescription, whether the model changes the same way and by how
much. Prints one JSON line per case and a summary. Needs the physics environment
(``make physics-env``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from engine.io.openkbp import load_openkbp_npz
from engine.metrics.beam_change import beam_change_agreement
from engine.physics.dose_calc import PhysicsSettings, body_mask, compute_physics_dose
from engine.runtime import DoseEngine, default_model_path

DEFAULT_DATASET = Path(__file__).resolve().parents[1].parent / "shared/data/openkbp/validation"
# the settings of the generated training plans (resources/models/default/MODEL_CARD.md)
SETTINGS = PhysicsSettings(dose_grid_mm=5.0, bixel_width_mm=7.0, max_iter=150)


def case_row(engines: dict[str, DoseEngine], path: Path, beam: int, delta_deg: float) -> dict:
    """One case: the physics change and, for each model (by label), its agreement with it."""
    case = load_openkbp_npz(path)
    plan = case.plan
    moved = plan.with_gantry(beam, (plan.beams[beam].gantry_deg + delta_deg) % 360.0)
    t0 = time.perf_counter()
    physics = [compute_physics_dose(case, p, SETTINGS).dose.array for p in (plan, moved)]
    t_physics = time.perf_counter() - t0
    body = body_mask(case)
    rx = max((t.prescription_gy or 0.0) for t in case.targets) or 70.0
    row = {"case": case.name, "beam": beam,
           "gantry_deg": [plan.beams[beam].gantry_deg, moved.beams[beam].gantry_deg],
           "threshold_gy": round(0.05 * rx, 2), "physics_s": round(t_physics, 1), "models": {}}
    for label, engine in engines.items():
        out = row["models"][label] = {}
        for kind in ("predict", "preview"):
            model = [(engine.predict(case, p, steps=10) if kind == "predict"
                      else engine.preview(case, p)).dose.array for p in (plan, moved)]
            got = beam_change_agreement(model[0], model[1], physics[0], physics[1], body,
                                        threshold_gy=0.05 * rx)
            out[kind] = {k: round(v, 3) for k, v in got.to_dict().items()}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.beam_sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, nargs="+", default=None,
                   help="model bundle(s) (default: the shipped one)")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--cases", nargs="+", default=["pt_201", "pt_215", "pt_230"])
    p.add_argument("--beam", type=int, default=2, help="index of the beam to move")
    p.add_argument("--delta", type=float, default=40.0, help="rotation in degrees")
    args = p.parse_args(argv)
    engines = {str(m): DoseEngine.from_checkpoint(m, device="cpu")
               for m in (args.model or [default_model_path()])}
    rows = []
    for name in args.cases:
        rows.append(case_row(engines, args.dataset / f"{name}.npz", args.beam, args.delta))
        print(json.dumps(rows[-1]), flush=True)
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(), "beam": args.beam, "delta_deg": args.delta,
        "models": {label: {
            f"{kind}_mean_{key}": round(statistics.mean(r["models"][label][kind][key]
                                                        for r in rows), 3)
            for kind in ("predict", "preview")
            for key in ("correlation", "sign_agreement", "physics_mean_abs_gy",
                        "model_mean_abs_gy", "model_mean_abs_elsewhere_gy")}
            for label in engines},
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
