"""Beam sensitivity of dose models on the held-out physics plans: arrangement against arrangement.

``python -m benchmarks.heldout_beam_sensitivity [--model DIR [DIR ...]] [--heldout DIR]
[--dataset DIR] [--threshold-fraction 0.05] [--full-vae]``

The held-out set (``datasets/openkbp-heldout-beams``, packed plans of
``dosepilot physics generate`` on OpenKBP *validation* patients, several beam arrangements per
patient; no training reads it) gives, per patient, physics doses for different arrangements of
the same anatomy. For every pair of arrangements of one patient this compares each model's dose
change (its 10-step prediction and its 1-step preview for arrangement B minus those for A) with
the physics change, inside the body (``engine.metrics.beam_change``): correlation, and where
physics changes by more than ``--threshold-fraction`` of the prescription (5 %: 3.5 Gy at 70 Gy),
whether the model changes the same way and by how much. Each model's doses are computed once per
plan and shared by its pairs. Prints one JSON line per pair and a summary per model. Needs no
physics environment: the physics doses are the stored plans'.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine.io.openkbp import load_openkbp_npz
from engine.metrics.beam_change import beam_change_agreement
from engine.physics.dataset import list_cases
from engine.physics.dose_calc import body_mask
from engine.physics.pack import unpack_folder
from engine.runtime import DoseEngine, default_model_path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HELDOUT = REPO / "datasets" / "openkbp-heldout-beams"
DEFAULT_DATASET = REPO.parent / "shared/data/openkbp/validation"
KINDS = ("predict", "preview")
SUMMARY_KEYS = ("correlation", "sign_agreement", "physics_mean_abs_gy", "model_mean_abs_gy",
                "model_mean_abs_elsewhere_gy")


def heldout_patients(heldout: Path, dataset: Path) -> Iterator[list[Path]]:
    """Unpack the held-out plans into a temporary folder and yield, per patient with at least
    two accepted arrangements, its full plan files (deleted when the iteration ends)."""
    with tempfile.TemporaryDirectory(prefix="heldout-beams-") as tmp:
        restored = Path(tmp)
        unpack_folder(heldout, dataset, restored)
        by_patient: dict[str, list[Path]] = {}
        for path in list_cases(restored):
            if "_plan" in path.stem:
                by_patient.setdefault(path.stem.split("_plan")[0], []).append(path)
        yield from (plans for plans in by_patient.values() if len(plans) >= 2)


def model_doses(engine: DoseEngine, case, steps: int = 10, solver: str = "euler"
                ) -> dict[str, np.ndarray]:
    """The model's ``steps``-step prediction and 1-step preview (Gy) for the case's own plan."""
    return {"predict": engine.predict(case, case.plan, steps=steps, solver=solver).dose.array,
            "preview": engine.preview(case, case.plan).dose.array}


def patient_rows(engines: dict[str, DoseEngine], plans: list[Path],
                 threshold_fraction: float, steps: int = 10, solver: str = "euler"
                 ) -> list[dict]:
    """Rows for every pair of ``plans`` (full plan files of one patient)."""
    cases = [load_openkbp_npz(p) for p in plans]
    body = body_mask(cases[0])
    rx = max((t.prescription_gy or 0.0) for t in cases[0].targets) or 70.0
    doses = {label: [model_doses(engine, c, steps, solver) for c in cases]
             for label, engine in engines.items()}
    rows = []
    for a, b in itertools.combinations(range(len(cases)), 2):
        row = {"case": plans[a].stem.split("_plan")[0], "plans": [plans[a].stem, plans[b].stem],
               "beams": [len(cases[a].plan.beams), len(cases[b].plan.beams)],
               "threshold_gy": round(threshold_fraction * rx, 2), "models": {}}
        for label in engines:
            row["models"][label] = {kind: {k: round(v, 3) for k, v in beam_change_agreement(
                doses[label][a][kind], doses[label][b][kind], cases[a].dose.array,
                cases[b].dose.array, body, threshold_gy=threshold_fraction * rx
            ).to_dict().items()} for kind in KINDS}
        rows.append(row)
    return rows


def summarize(rows: list[dict], labels: list[str]) -> dict:
    """Per model and kind: the mean of each figure over the pairs (NaN-free pairs only), and
    the model's mean |change| as a fraction of the physics change where physics changes."""
    out = {}
    for label in labels:
        figures: dict[str, float] = {}
        for kind in KINDS:
            for key in SUMMARY_KEYS:
                values = [r["models"][label][kind][key] for r in rows
                          if not np.isnan(r["models"][label][kind][key])]
                figures[f"{kind}_mean_{key}"] = round(statistics.mean(values), 3) \
                    if values else float("nan")
            figures[f"{kind}_change_ratio"] = round(
                figures[f"{kind}_mean_model_mean_abs_gy"]
                / figures[f"{kind}_mean_physics_mean_abs_gy"], 3)
        out[label] = figures
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.heldout_beam_sensitivity",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, nargs="+", default=None,
                   help="model bundle(s) (default: the shipped one)")
    p.add_argument("--heldout", type=Path, default=DEFAULT_HELDOUT,
                   help="folder of packed held-out plans (default %(default)s)")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                   help="the OpenKBP validation cases the plans were made on")
    p.add_argument("--threshold-fraction", type=float, default=0.05,
                   help="physics change counted as a change, fraction of the prescription")
    p.add_argument("--steps", type=int, default=10, help="prediction steps (default 10)")
    p.add_argument("--solver", choices=("euler", "dpm++2m"), default="euler",
                   help="prediction sampler (default euler)")
    p.add_argument("--full-vae", action="store_true",
                   help="predictions through the full VAE (DoseEngine full_vae)")
    args = p.parse_args(argv)
    engines = {str(m): DoseEngine.from_checkpoint(m, device="cpu", full_vae=args.full_vae)
               for m in (args.model or [default_model_path()])}
    rows: list[dict] = []
    for plans in heldout_patients(args.heldout, args.dataset):
        for row in patient_rows(engines, plans, args.threshold_fraction, args.steps,
                                args.solver):
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not rows:
        raise SystemExit(f"no patient in {args.heldout} has two accepted arrangements")
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(), "pairs": len(rows), "steps": args.steps,
        "solver": args.solver, "full_vae": args.full_vae,
        "patients": len({r["case"] for r in rows}),
        "models": summarize(rows, list(engines)),
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
