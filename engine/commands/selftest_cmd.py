"""``dosepilot self-test [--model CKPT] [--case PATH]``: does this installation predict a dose?

Opens the demo patient (or ``--case``), loads the model (default: the shipped one), runs one
interactive preview headless (no Qt, no display) and checks the result: a finite, non-negative
dose in Gy on the patient's CT grid and a DVH per structure. Prints the timing of each stage
and ``self-test OK``; exit code 0. A missing or unreadable model or patient, or a bad result,
is one clear error line and a non-zero exit code. The installer bundle's ``--self-test`` flag
runs this command.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import UserError

if TYPE_CHECKING:  # torch is imported only when the command runs
    from engine.case import Case
    from engine.runtime import DoseEngine, DoseResult


def _open_case(path: Path) -> Case:
    from engine.io.dicom import DicomImportError, load_dicom_case

    if not path.exists():
        raise UserError(f"patient folder {path} does not exist")
    try:
        return load_dicom_case(path)
    except DicomImportError as exc:
        raise UserError(f"cannot open the patient in {path}: {exc}") from exc


def _load_engine(model: Path, threads: int | None, shipped: bool) -> DoseEngine:
    from engine.runtime import DoseEngine

    if not model.exists():
        hint = ("this installation ships no trained model; pass --model CKPT (a model bundle "
                "folder)" if shipped else "give a model bundle folder")
        raise UserError(f"no model at {model}: {hint}")
    try:
        return DoseEngine.from_checkpoint(model, device="cpu", threads=threads)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # CheckpointError included
        raise UserError(f"cannot load the model {model}: {exc}") from exc


def check_result(result: DoseResult, case: Case) -> list[str]:
    """What is wrong with a preview of ``case`` (empty when it is fine)."""
    problems = []
    dose = result.dose
    if dose.geometry.shape != case.geometry.shape:
        problems.append(f"dose grid {dose.geometry.shape} is not the CT grid "
                        f"{case.geometry.shape}")
    if not np.all(np.isfinite(dose.array)):
        problems.append("the dose has non-finite voxels")
    elif float(dose.array.min()) < 0:
        problems.append(f"the dose has negative voxels (min {float(dose.array.min()):.3g} Gy)")
    missing = [s.name for s in case.structures if s.name not in result.dvhs]
    if missing:
        problems.append(f"no DVH for {', '.join(missing)}")
    return problems


def run_self_test(args: argparse.Namespace) -> int:
    """The command: exit code 0 and ``self-test OK``, or a :class:`UserError`."""
    from engine.resources import resources_dir
    from engine.runtime import default_model_path

    case_path = Path(args.case) if args.case else resources_dir() / "demo"
    model = Path(args.model) if args.model else default_model_path()
    t0 = time.perf_counter()
    case = _open_case(case_path)
    t_case = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = _load_engine(model, args.threads, shipped=args.model is None)
    t_model = time.perf_counter() - t0
    if case.plan is None or not case.plan.beams:
        raise UserError(f"the patient in {case_path} has no plan with beams to preview")
    t0 = time.perf_counter()
    result = engine.preview(case)
    t_preview = time.perf_counter() - t0
    problems = check_result(result, case)
    if problems:
        raise UserError("self-test FAILED: " + "; ".join(problems))
    print(f"patient: {case_path} ({case.name}, CT {case.geometry.shape}, "
          f"{len(case.structures)} structures, {len(case.plan.beams)} beams)")
    print(f"model:   {model} ({engine.device}, {engine.threads} threads)")
    print(f"open patient  {t_case:7.2f} s")
    print(f"load model    {t_model:7.2f} s")
    print(f"preview       {t_preview:7.2f} s  (first call: builds and encodes the conditions)")
    for stage, seconds in result.timings_s.items():
        print(f"  {stage:<12}{seconds:7.3f} s")
    print(f"max dose {float(result.dose.array.max()):.2f} Gy, {len(result.dvhs)} DVHs")
    print("self-test OK")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "self-test", help="load the model and run one preview on the demo patient",
        description="Check this installation headless: open the demo patient, load the model, "
                    "run one dose preview, print the timings and 'self-test OK'.")
    p.add_argument("--model", metavar="CKPT",
                   help="model bundle folder (default: the shipped model)")
    p.add_argument("--case", metavar="PATH",
                   help="DICOM patient folder (default: the shipped demo patient)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores other processes leave free)")
    p.set_defaults(func=run_self_test)
