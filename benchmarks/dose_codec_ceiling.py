"""How much of a beam-driven dose change survives the model's dose path, with a perfect DiT?

``python -m benchmarks.dose_codec_ceiling [--model DIR] [--heldout DIR] [--dataset DIR]``

Issue 15 lists "a better VAE for dose" among the candidates for a model that follows the beam.
Before training one, this measures the ceiling the current dose path sets: the held-out physics
doses (``datasets/openkbp-heldout-beams``, several arrangements per validation patient) are sent
through the steps a prediction's dose goes through, with the DiT's output replaced by the true
dose latent, and every pair of arrangements of one patient is judged like a model
(``engine.metrics.beam_change``: change correlation with physics inside the body, sign agreement
and size where physics changes by more than 5 % of the prescription). Paths:

- ``grid``: patient grid -> the 97 x 128 x 160 model grid (normalised to [-1, 1]) -> back (cubic),
  what any model on this grid can reach;
- ``vae``: ``grid`` through the bundle's VAE (encode, decode): the 10-step prediction's ceiling;
- ``preview``: VAE encode, the tiny codec's decode, linear resampling: the preview's ceiling;
Also each path's dose MAE against physics inside the body, and with ``--validation DIR`` (the
OpenKBP validation cases) each path's OpenKBP dose and DVH scores on the clinical doses: the
best scores a model with this grid / VAE / codec can reach, whatever its DiT. A path whose
change correlation is near 1 is not what keeps the model from following the beam. Prints one
JSON line per pair and a summary; needs no physics environment.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from engine.features.modalities import Slot, build_modalities
from engine.io.openkbp import from_case_axes, load_openkbp_npz
from engine.metrics.beam_change import beam_change_agreement
from engine.metrics.benchmark_io import (
    openkbp_references,
    patient_sort_key,
    read_openkbp_reference,
)
from engine.metrics.scores import CaseScore, openkbp_benchmark, openkbp_case_score
from engine.physics.dose_calc import body_mask
from engine.runtime import DoseEngine, default_model_path

from .heldout_beam_sensitivity import DEFAULT_DATASET, DEFAULT_HELDOUT, heldout_patients

PATHS = ("grid", "vae", "preview")
FIGURES = ("correlation", "sign_agreement", "physics_mean_abs_gy", "model_mean_abs_gy",
           "model_mean_abs_elsewhere_gy")


def dose_paths(engine: DoseEngine, case) -> dict[str, np.ndarray]:
    """The case's own dose (Gy, patient grid) after each path of :data:`PATHS`."""
    model = engine.model
    inputs = build_modalities(case, case.plan, engine.normalization, workers=engine.threads)
    unit = torch.from_numpy(np.array(inputs.volumes[Slot.DOSE], dtype=np.float32))[None, None]
    with torch.inference_mode():
        latent = model.vae.encode(unit)
        units = {"grid": unit[0, 0].numpy(),
                 "vae": model.vae.decode(latent)[0, 0].float().numpy()}
        if model.codec is not None:
            units["preview"] = model.codec.decode(latent)[0, 0].float().numpy()
    norm, tf = inputs.normalization, inputs.transform
    return {path: tf.dose_to_patient(norm.dose_to_gy(u), order=1 if path == "preview" else 3).array
            for path, u in units.items()}


def patient_rows(engine: DoseEngine, plans: list[Path], threshold_fraction: float) -> list[dict]:
    """One row per pair of ``plans`` (full plan files of one patient)."""
    cases = [load_openkbp_npz(p) for p in plans]
    body = body_mask(cases[0])
    rx = max((t.prescription_gy or 0.0) for t in cases[0].targets) or 70.0
    doses = [dose_paths(engine, c) for c in cases]
    maes = [{path: float(np.abs(d[path] - c.dose.array)[body].mean()) for path in d}
            for d, c in zip(doses, cases)]
    rows = []
    for a, b in itertools.combinations(range(len(cases)), 2):
        row = {"case": plans[a].stem.split("_plan")[0], "plans": [plans[a].stem, plans[b].stem],
               "paths": {}}
        for path in doses[a]:
            figures = beam_change_agreement(doses[a][path], doses[b][path], cases[a].dose.array,
                                            cases[b].dose.array, body,
                                            threshold_gy=threshold_fraction * rx).to_dict()
            figures = {k: round(v, 4) for k, v in figures.items()}
            figures["mae_gy"] = round((maes[a][path] + maes[b][path]) / 2, 3)
            row["paths"][path] = figures
        rows.append(row)
    return rows


def validation_floor(engine: DoseEngine, dataset: Path) -> dict:
    """Per path: the OpenKBP dose and DVH scores of the clinical doses of every case in
    ``dataset`` after the path, i.e. of a perfect DiT's predictions."""
    refs = openkbp_references(dataset)
    if not refs:
        raise SystemExit(f"{dataset}: no OpenKBP cases")
    scores: dict[str, list[CaseScore]] = {}
    for pid, path in sorted(refs.items(), key=lambda kv: patient_sort_key(kv[0])):
        ref = read_openkbp_reference(path)
        for name, dose in dose_paths(engine, ref.case).items():
            scores.setdefault(name, []).append(openkbp_case_score(
                pid, ref.dose_gy, from_case_axes(dose), ref.masks, ref.possible_dose_mask,
                ref.voxel_mm))
    out = {}
    for name, cases in scores.items():
        total = openkbp_benchmark(cases)
        out[name] = {"dose_score": round(total.dose_score, 3),
                     "dvh_score": round(total.dvh_score, 3), "cases": len(cases)}
    return out


def summarize(rows: list[dict]) -> dict:
    """Per path: the mean of each figure over the pairs, and the change ratio."""
    out = {}
    for path in rows[0]["paths"]:
        means = {}
        for key in (*FIGURES, "mae_gy"):
            values = [r["paths"][path][key] for r in rows if not np.isnan(r["paths"][path][key])]
            means[key] = round(statistics.mean(values), 4) if values else float("nan")
        means["change_ratio"] = round(means["model_mean_abs_gy"] / means["physics_mean_abs_gy"],
                                      3)
        out[path] = means
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dose_codec_ceiling",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="model bundle whose VAE and codec are measured (default: the shipped one)")
    p.add_argument("--heldout", type=Path, default=DEFAULT_HELDOUT)
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--threshold-fraction", type=float, default=0.05)
    p.add_argument("--validation", type=Path, default=None,
                   help="also score each path on these OpenKBP cases' clinical doses")
    args = p.parse_args(argv)
    engine = DoseEngine.from_checkpoint(args.model or default_model_path(), device="cpu")
    t0 = time.perf_counter()
    rows: list[dict] = []
    for plans in heldout_patients(args.heldout, args.dataset):
        for row in patient_rows(engine, plans, args.threshold_fraction):
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not rows:
        raise SystemExit(f"no patient in {args.heldout} has two accepted arrangements")
    floor = validation_floor(engine, args.validation) if args.validation else None
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1),
        "model": str(args.model or default_model_path()), "pairs": len(rows),
        "patients": len({r["case"] for r in rows}), "paths": summarize(rows),
        **({"validation_floor": floor} if floor else {})}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
