"""Which beam input could carry a beam move to the model? Candidate inputs against physics.

``python -m benchmarks.beam_input_candidates [--heldout DIR] [--dataset DIR] [--mu 0.0045]``

The dose model follows a moved beam poorly (issue 15: correlation of its dose change with the
physics change 0.05-0.2). Before training a model on a new beam input, this measures how much
of the physics change each candidate input *itself* carries, with no model in between: for every
pair of beam arrangements of one patient in the held-out physics plans
(``datasets/openkbp-heldout-beams``), the input's change between the two arrangements is
compared with the physics dose change inside the body, exactly as the models are judged
(``engine.metrics.beam_change``). An input whose own change correlates poorly with physics
cannot be turned into a beam-following model by any amount of training on it; one that
correlates well is a candidate for the model's beam slot.

Candidates (each on the case's own grid, scaled so that its mean over the highest-dose target
is that target's prescription, as the physics plans are normalised):

- ``gdp_plate``: the GDP-HMM beam plate the model sees now (``engine.features.plates``): the
  rays from each source through the target's surface, inverse-square weighted. A ray runs
  through the whole grid, so a beam and its opposite mark nearly the same voxels.
- ``depth_dose``: a parallel-beam depth-dose estimate per beam angle: the target's beam's-eye
  projection as the aperture (blurred by a ``--penumbra-mm`` Gaussian), times
  ``exp(-mu * radiological depth)`` from where the ray enters the body, the depth from the CT
  (relative electron density ~ (HU + 1000) / 1000). It knows which side a beam enters from
  and how deep each voxel is, what the GDP plate does not. Arcs are sampled every 10 degrees.
- ``quick_plan``: the plan's quick plan (:mod:`engine.physics.quick_plan`): the physics' own
  pencil beams with the fluence optimised under the physics objectives, so it also carries the
  optimiser's response to the arrangement (normalised to D95, then scaled like the others).

Prints one JSON line per pair and a summary (means over the pairs).
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
from scipy import ndimage

from engine.case import Case
from engine.features.beam_geometry import source_direction_lps
from engine.features.plates import plan_angles, plan_plates
from engine.io.openkbp import load_openkbp_npz
from engine.metrics.beam_change import beam_change_agreement
from engine.physics.dose_calc import body_mask
from engine.physics.quick_plan import quick_plan_dose

from .heldout_beam_sensitivity import DEFAULT_DATASET, DEFAULT_HELDOUT, heldout_patients

CANDIDATES = ("gdp_plate", "depth_dose", "quick_plan")
FIGURES = ("correlation", "sign_agreement", "physics_mean_abs_gy", "model_mean_abs_gy",
           "model_mean_abs_elsewhere_gy")


def _targets(case: Case) -> tuple[np.ndarray, np.ndarray, float]:
    """(union of the targets, the highest-dose target, its prescription in Gy)."""
    targets = [t for t in case.targets if t.mask.any()]
    if not targets:
        raise ValueError(f"case {case.name!r} has no target with voxels")
    top = max(targets, key=lambda t: t.prescription_gy or 0.0)
    union = np.logical_or.reduce([t.mask for t in targets])
    return union, top.mask, float(top.prescription_gy or 70.0)


def depth_dose(case: Case, body: np.ndarray, ptv: np.ndarray, mu_per_mm: float,
               penumbra_mm: float, arc_step_deg: float = 10.0) -> np.ndarray:
    """Sum over the plan's beam angles of a parallel-beam depth-dose estimate (arbitrary units).

    For each angle the grid is resampled into the beam's frame (axis 1 along the beam's travel,
    same in-plane spacing), the radiological depth is the cumulative density along axis 1,
    and the result is resampled back. Needs an axial grid with square pixels; coplanar beams
    (the couch angle is not used).
    """
    g = case.geometry
    spacing = float(g.spacing[1])
    if abs(g.spacing[2] - spacing) > 1e-3 * spacing:
        raise ValueError(f"depth_dose needs square pixels, got {g.spacing[1:]} mm")
    density = np.where(body, np.clip((case.ct.array.astype(np.float32) + 1000.0) / 1000.0,
                                     0.0, 3.0), 0.0).astype(np.float32)
    n_z, n_y, n_x = density.shape
    side = int(np.ceil(np.hypot(n_y, n_x))) + 2
    centre_in = np.array([0.0, (n_y - 1) / 2, (n_x - 1) / 2])
    centre_out = np.array([0.0, (side - 1) / 2, (side - 1) / 2])
    sigma = penumbra_mm / np.array([g.spacing[0], spacing])
    total = np.zeros_like(density)
    for _, angle, weight in plan_angles(case.plan, arc_step_deg):
        to_source = np.asarray(g.direction) @ source_direction_lps(
            angle, 0.0, case.plan.patient_position)
        travel = -to_source[1:] / np.linalg.norm(to_source[1:])  # (y, x), unit, index space
        normal = np.array([-travel[1], travel[0]])
        # beam frame (z, u along travel, v across) -> grid index (z, y, x)
        matrix = np.array([[1.0, 0.0, 0.0],
                           [0.0, travel[0], normal[0]],
                           [0.0, travel[1], normal[1]]])
        offset = centre_in - matrix @ centre_out
        frame = (n_z, side, side)
        dens = ndimage.affine_transform(density, matrix, offset, output_shape=frame, order=1)
        target = ndimage.affine_transform(ptv.astype(np.float32), matrix, offset,
                                          output_shape=frame, order=1) > 0.5
        aperture = ndimage.gaussian_filter(target.any(axis=1).astype(np.float32), sigma)
        depth_mm = np.cumsum(dens, axis=1) * spacing
        dose = aperture[:, None, :] * np.exp(-mu_per_mm * depth_mm) * (dens > 0)
        inverse = matrix.T  # orthonormal in-plane block
        back = ndimage.affine_transform(dose, inverse, centre_out - inverse @ centre_in,
                                        output_shape=density.shape, order=1)
        total += np.float32(weight) * back
    return total


def candidate_inputs(case: Case, mu_per_mm: float, penumbra_mm: float) -> dict[str, np.ndarray]:
    """Each candidate for the case's own plan, scaled to the top target's prescription."""
    union, top, rx = _targets(case)
    body = body_mask(case)
    gdp, _, _ = plan_plates(union, case.geometry, case.plan, workers=1)
    out = {"gdp_plate": gdp,
           "depth_dose": depth_dose(case, body, union, mu_per_mm, penumbra_mm),
           "quick_plan": quick_plan_dose(case)}
    return {k: v * np.float32(rx / max(float(v[top].mean()), 1e-6)) for k, v in out.items()}


def patient_rows(plans: list[Path], mu_per_mm: float, penumbra_mm: float,
                 threshold_fraction: float) -> list[dict]:
    """Rows for every pair of ``plans`` (full plan files of one patient)."""
    cases = [load_openkbp_npz(p) for p in plans]
    body = body_mask(cases[0])
    rx = _targets(cases[0])[2]
    inputs = [candidate_inputs(c, mu_per_mm, penumbra_mm) for c in cases]
    rows = []
    for a, b in itertools.combinations(range(len(cases)), 2):
        row = {"case": plans[a].stem.split("_plan")[0], "plans": [plans[a].stem, plans[b].stem],
               "beams": [len(cases[a].plan.beams), len(cases[b].plan.beams)], "inputs": {}}
        for name in CANDIDATES:
            row["inputs"][name] = {k: round(v, 3) for k, v in beam_change_agreement(
                inputs[a][name], inputs[b][name], cases[a].dose.array, cases[b].dose.array,
                body, threshold_gy=threshold_fraction * rx).to_dict().items()}
            row["inputs"][name]["dose_correlation"] = round(float(np.mean([
                np.corrcoef(inputs[k][name][body], cases[k].dose.array[body])[0, 1]
                for k in (a, b)])), 3)
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {}
    for name in CANDIDATES:
        figures = {}
        for key in (*FIGURES, "dose_correlation"):
            values = [r["inputs"][name][key] for r in rows
                      if not np.isnan(r["inputs"][name][key])]
            figures[key] = round(statistics.mean(values), 3) if values else float("nan")
        figures["change_ratio"] = round(figures["model_mean_abs_gy"]
                                        / figures["physics_mean_abs_gy"], 3)
        out[name] = figures
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.beam_input_candidates",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heldout", type=Path, default=DEFAULT_HELDOUT)
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--mu", type=float, default=0.0045,
                   help="effective attenuation per mm of water-equivalent depth (6 MV ~0.0045)")
    p.add_argument("--penumbra-mm", type=float, default=4.0)
    p.add_argument("--threshold-fraction", type=float, default=0.05)
    p.add_argument("--limit", type=int, default=None, help="at most this many patients")
    args = p.parse_args(argv)
    rows: list[dict] = []
    start = time.monotonic()
    for plans in itertools.islice(heldout_patients(args.heldout, args.dataset), args.limit):
        for row in patient_rows(plans, args.mu, args.penumbra_mm, args.threshold_fraction):
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not rows:
        raise SystemExit(f"no patient in {args.heldout} has two accepted arrangements")
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(), "seconds": round(time.monotonic() - start),
        "pairs": len(rows), "patients": len({r["case"] for r in rows}),
        "mu_per_mm": args.mu, "penumbra_mm": args.penumbra_mm,
        "inputs": summarize(rows)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
