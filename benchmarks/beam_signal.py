"""How much of a beam move reaches the DiT: the beam-specific signal of the model inputs.

``python -m benchmarks.beam_signal [--model DIR] [--cases pt_201 ...] [--beam 2] [--delta 40]``

For OpenKBP validation cases, one beam is moved by ``--delta`` degrees (as in
``benchmarks/beam_sensitivity.py``) and, for the beam-plate and angle-plate slots (model grid,
[-1, 1] units):

- ``plate_change``: mean |after - before| of the slot itself;
- ``vae_change_correlation``: correlation of that change with the change after a VAE round trip
  (encode + decode with the bundle's VAE): how much of the move survives into the latents the
  DiT sees (1 = all of it);
- ``vae_mae``: the round trip's mean |error| on the slot;
- for the beam plate, ``dose_plate_correlation`` against the case's own dose outside the targets,
  for the plan's angles, mirrored angles (360 - a) and opposed ones (a + 180): when these are
  close, the plate mostly says "distance from the target", and little about the beams.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from engine.case import Case, Plan
from engine.dose_model import load_dose_model
from engine.features import Slot
from engine.io.openkbp import load_openkbp_npz
from engine.runtime import default_model_path
from trainer.data import model_inputs

GRID = (97, 128, 160)
DEFAULT_DATASET = Path(__file__).resolve().parents[1].parent / "shared/data/openkbp/validation"


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _with_angles(plan: Plan, angles: list[float]) -> Plan:
    for i, a in enumerate(angles):
        plan = plan.with_gantry(i, a % 360.0)
    return plan


def case_row(vae: torch.nn.Module, case: Case, beam: int, delta_deg: float) -> dict:
    """The numbers of the module docstring for one case."""
    plan = case.plan
    moved = plan.with_gantry(beam, (plan.beams[beam].gantry_deg + delta_deg) % 360.0)
    before = model_inputs(case, GRID).volumes
    after = model_inputs(dataclasses.replace(case, plan=moved), GRID).volumes
    row: dict = {"case": case.name}
    for slot, name in ((Slot.BEAM_PLATE, "beam_plate"), (Slot.ANGLE_PLATE, "angle_plate")):
        x = torch.from_numpy(np.stack([before[slot], after[slot]]))[:, None]
        with torch.no_grad():
            rec = vae.decode(vae.encode(x))[:, 0].numpy()
        change = after[slot] - before[slot]
        row[name] = {"plate_change": round(float(np.abs(change).mean()), 4),
                     "vae_change_correlation": round(_corr(change, rec[1] - rec[0]), 3),
                     "vae_mae": round(float(np.abs(rec - x[:, 0].numpy()).mean()), 4)}
    outside = (before[Slot.BODY] > 0) & (before[Slot.PTV] <= -1)
    angles = [b.gantry_deg for b in plan.beams]
    for label, variant in (("plan", angles), ("mirrored", [360 - a for a in angles]),
                           ("opposed", [a + 180 for a in angles])):
        plate = (before if label == "plan" else model_inputs(
            dataclasses.replace(case, plan=_with_angles(plan, variant)), GRID).volumes)
        row["beam_plate"][f"dose_plate_correlation_{label}"] = round(
            _corr(before[Slot.DOSE][outside], plate[Slot.BEAM_PLATE][outside]), 3)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.beam_signal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="bundle (default: the shipped one)")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--cases", nargs="+", default=["pt_201", "pt_215", "pt_230"])
    p.add_argument("--beam", type=int, default=2)
    p.add_argument("--delta", type=float, default=40.0)
    args = p.parse_args(argv)
    vae = load_dose_model(args.model or default_model_path()).vae.eval()
    for name in args.cases:
        case = load_openkbp_npz(args.dataset / f"{name}.npz")
        print(json.dumps(case_row(vae, case, args.beam, args.delta)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
