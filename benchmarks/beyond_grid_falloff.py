"""The falloff of the dose beyond the model grid, fitted on reference doses.

``python -m benchmarks.beyond_grid_falloff [--dataset DIR] [--cases N] [--z MM ...] [--xy MM ...]``

The model grid (97 x 128 x 160 voxels of 2.0 x 2.5 x 2.5 mm, 194 mm superior-inferior) is smaller
than a head-and-neck patient's possible-dose region: on the OpenKBP validation set a third of
that region lies outside it for some patients, where a prediction used to be 0 Gy although the
beams leave 1-10 Gy there. ``engine.features.model_grid.extend_beyond`` fills those voxels from
the nearest voxel inside the grid with a falloff per axis. This sends each reference dose of
the first ``--cases`` OpenKBP training cases to the model grid and back (cubic B-splines, as a
prediction goes) with every candidate falloff (superior-inferior ``--z``, in-plane ``--xy``; 0 =
the old 0 Gy) and reports the OpenKBP dose-score formula of the result against the reference:
the part of every model's dose score that comes from the trip alone. With ``--predictions`` a
model's own predictions of those cases are extended instead (what they hold beyond the grid is
replaced: it is recomputed from the voxels inside):
the model's values at the grid's edge are what is carried out, errors included. Prints a JSON
summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
from pathlib import Path

import numpy as np

from engine.features.model_grid import (
    BEYOND_GRID_FALLOFF_MM,
    ModelGridTransform,
    extend_beyond,
)
from engine.io.openkbp import load_openkbp_npz, to_case_axes
from engine.metrics.benchmark_io import (
    openkbp_predictions,
    patient_sort_key,
    read_openkbp_prediction,
)
from engine.metrics.scores import openkbp_dose_score

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "openkbp" / "train"


def round_trip_scores(path: Path, falloffs: list[tuple[float, float, float]],
                      prediction: Path | None = None) -> list[float]:
    """Per falloff: the OpenKBP dose score of the dose inside the possible-dose mask (Gy), the
    dose being the reference's round trip or, with ``prediction`` (an OpenKBP-format
    prediction), that prediction's voxels inside the grid extended."""
    case = load_openkbp_npz(path)
    transform = ModelGridTransform.around(case.geometry, case.plan.isocenter_mm)
    reference = case.dose.array
    mask = case.external.mask
    if prediction is None:
        on_model = transform.dose_to_model(reference)
    else:
        predicted = np.array(to_case_axes(read_openkbp_prediction(prediction)), np.float32)
    scores = []
    for falloff in falloffs:
        if prediction is None:
            dose = transform.to_patient(on_model, order=3, fill=0.0, floor=0.0,
                                        beyond_mm=falloff).array
        else:
            dose = predicted.copy()
            extend_beyond(dose, case.geometry, transform.model, falloff)
        # as `dosepilot predict` writes it: nothing outside the possible-dose mask
        scores.append(openkbp_dose_score(reference, np.where(mask, dose, 0.0), mask))
    return scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.beyond_grid_falloff",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                   help="OpenKBP cases (pt_N.npz), default %(default)s")
    p.add_argument("--cases", type=int, default=40, help="first N cases (default 40)")
    p.add_argument("--z", type=float, nargs="+", default=[0, 5, 10, 20, 40],
                   help="superior-inferior falloffs to try (mm; 0 = nothing beyond the grid)")
    p.add_argument("--xy", type=float, nargs="+", default=[0, 40, 80, 160],
                   help="in-plane falloffs to try (mm)")
    p.add_argument("--predictions", type=Path, default=None,
                   help="a model's predictions of --dataset cases (`dosepilot predict --out`) "
                        "to extend instead of the round trips")
    args = p.parse_args(argv)
    files = sorted(args.dataset.glob("pt_*.npz"), key=lambda f: patient_sort_key(f.stem))
    predictions = openkbp_predictions(args.predictions) if args.predictions else None
    if predictions is not None:
        files = [f for f in files if f.stem in predictions]
    files = files[:args.cases]
    if not files:
        raise SystemExit(f"{args.dataset}: no OpenKBP cases" + (
            f" with a prediction in {args.predictions}" if predictions is not None else ""))
    falloffs = [(z, xy, xy) for z, xy in itertools.product(args.z, args.xy)]
    if BEYOND_GRID_FALLOFF_MM not in falloffs:
        falloffs.append(BEYOND_GRID_FALLOFF_MM)
    per_case = np.array([round_trip_scores(f, falloffs, predictions and predictions[f.stem])
                         for f in files])
    means = per_case.mean(axis=0)
    best = int(np.argmin(means))
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "cases": len(files),
        "round_trip_dose_score_gy": {f"{f[0]:g}/{f[1]:g}": round(float(m), 4)
                                     for f, m in zip(falloffs, means)},
        "best_mm": list(falloffs[best]),
        "engine_mm": list(BEYOND_GRID_FALLOFF_MM),
        "engine_gy": round(float(means[falloffs.index(BEYOND_GRID_FALLOFF_MM)]), 4),
        "zero_beyond_gy": round(float(means[falloffs.index((0, 0, 0))]), 4)
        if (0, 0, 0) in falloffs else None,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
