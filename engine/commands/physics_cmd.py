"""``dosepilot physics``: physics reference doses (pyRadPlan in its own environment).

* ``physics generate DATASET_DIR OUT_DIR --plans-per-case N --beams 5..11 [--arcs | --mix]
  [--per-patient] [--workers K]``: varied beam arrangements on every case of an OpenKBP-format
  dataset, each optimised and computed with physics, written as dataset cases (format:
  engine.physics.dataset) with their quality figures in the manifest. Resumable: plans already
  in OUT_DIR are skipped.
* ``physics verify PATH [--out FILE]``: the physics dose of a case's plan, compared with the
  case's own dose (MAE in the body, target D95 and OAR mean-dose differences, printed as JSON).
  PATH is a DICOM folder (the dose is written as an RTDOSE linked to the case's study and plan)
  or an OpenKBP case (``.npz`` or CSV folder; a generated plan file uses its stored beams, a
  clinical case the nine clinical fields; the dose is written as an ``.npz``, Gy, OpenKBP order).
* ``physics pack GENERATED_DIR PACK_DIR`` / ``physics unpack PACK_DIR DATASET_DIR OUT_DIR``:
  generated plans without the copy of their source patient (engine.physics.pack), and back;
  plans the manifest marks as failing the acceptance rule are left out.
* ``physics evaluate GENERATED_DIR``: each plan's quality figures (target D95/D2, body maximum,
  OAR means and maxima) and the acceptance rule's verdict (engine.physics.quality), recorded in
  the folder's manifest (plans generated now get them as they are written).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.case import Case
from engine.errors import UserError
from engine.io.dicom import load_dicom_case
from engine.io.dicom_errors import DicomImportError
from engine.io.dicom_export import write_rtdose
from engine.io.openkbp import OpenKBPFormatError, from_case_axes, load_openkbp
from engine.physics import dataset as pd
from engine.physics import pack as physics_pack
from engine.physics.dose_calc import (
    PhysicsCancelled,
    PhysicsError,
    PhysicsSettings,
    PhysicsUnavailableError,
    compute_physics_dose,
    dose_comparison,
    physics_python,
)


def _beam_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:\.\.|-)\s*(\d+)\s*|\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a beam count or range like 5..11, got {text!r}")
    lo, hi = (int(m[3]), int(m[3])) if m[3] else (int(m[1]), int(m[2]))
    if not 1 <= lo <= hi <= 36:
        raise argparse.ArgumentTypeError(f"beam range must satisfy 1 <= lo <= hi <= 36: {text!r}")
    return lo, hi


def _settings_args(p: argparse.ArgumentParser) -> None:
    d = PhysicsSettings()
    p.add_argument("--dose-grid-mm", type=float, default=d.dose_grid_mm,
                   help="dose calculation grid (default %(default)s mm)")
    p.add_argument("--bixel-mm", type=float, default=d.bixel_width_mm,
                   help="beamlet width (default %(default)s mm)")
    p.add_argument("--max-iter", type=int, default=d.max_iter,
                   help="optimiser iterations (default %(default)s)")
    p.add_argument("--arc-step-deg", type=float, default=d.arc_step_deg,
                   help="arcs are computed as beams every this many degrees (default %(default)s)")
    p.add_argument("--target-margin-mm", type=float, default=d.target_margin_mm,
                   help="targets grown by this much for the optimiser (default %(default)s mm)")


def _settings(args: argparse.Namespace) -> PhysicsSettings:
    try:
        return PhysicsSettings(dose_grid_mm=args.dose_grid_mm, bixel_width_mm=args.bixel_mm,
                               max_iter=args.max_iter, arc_step_deg=args.arc_step_deg,
                               target_margin_mm=args.target_margin_mm)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("physics", help="physics reference doses (pyRadPlan)",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="physics_command", metavar="ACTION", required=True)

    gen = sub.add_parser("generate", help="random-beam physics plans as a training set")
    gen.add_argument("dataset_dir", type=Path, help="folder of OpenKBP-format case .npz files")
    gen.add_argument("out_dir", type=Path, help="output folder (created; resumable)")
    gen.add_argument("--plans-per-case", type=int, required=True, metavar="N")
    gen.add_argument("--beams", type=_beam_range, default=(5, 11), metavar="LO..HI",
                     help="static beams per plan (default 5..11)")
    gen.add_argument("--arcs", action="store_true",
                     help="make a third of the plans arc (VMAT-like) plans")
    gen.add_argument("--mix", action="store_true",
                     help="draw arrangements from the clinical mix: random static (--beams), "
                          "equispaced 5/7/9-field class solutions, partial and full arcs")
    gen.add_argument("--per-patient", action="store_true",
                     help="compute all plans of a patient before the next patient (default: "
                          "every patient's plan 0 first)")
    gen.add_argument("--workers", type=int, default=1, metavar="K",
                     help="plans computed in parallel (default 1)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--limit", type=int, default=None, metavar="M",
                     help="stop after M new plans")
    _settings_args(gen)
    gen.set_defaults(func=run_generate)

    ver = sub.add_parser("verify", help="physics dose of a case's plan vs its own dose")
    ver.add_argument("path", type=Path, help="a DICOM folder or an OpenKBP case (.npz, folder)")
    ver.add_argument("--out", type=Path, default=None,
                     help="where to write the physics dose (default: RD_physics_<case>.dcm "
                          "for DICOM, <case>_physics.npz otherwise, in the current folder)")
    _settings_args(ver)
    ver.set_defaults(func=run_verify)

    pack = sub.add_parser("pack", help="generated plans without their source patient's arrays")
    pack.add_argument("generated_dir", type=Path, help="output folder of physics generate")
    pack.add_argument("pack_dir", type=Path, help="folder for the packed plans (created)")
    pack.set_defaults(func=run_pack)

    evaluate = sub.add_parser("evaluate", help="record each generated plan's quality figures "
                              "and acceptance in its folder's manifest")
    evaluate.add_argument("generated_dir", type=Path,
                          help="folder of full plan files (physics generate / unpack output)")
    evaluate.set_defaults(func=run_evaluate)

    unpack = sub.add_parser("unpack", help="packed plans back to full plan files")
    unpack.add_argument("pack_dir", type=Path, help="folder of packed plans")
    unpack.add_argument("dataset_dir", type=Path,
                        help="the dataset the plans were generated from (their source cases)")
    unpack.add_argument("out_dir", type=Path, help="folder for the full plan files (created)")
    unpack.set_defaults(func=run_unpack)


def _engine_version(python: Path) -> dict:
    out = subprocess.run([str(python), "-I", "-c",
                          "from importlib.metadata import version; print(version('pyRadPlan'))"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise UserError(f"the physics environment at {python} is broken: {out.stderr.strip()}")
    return {"engine": "pyRadPlan", "engine_version": out.stdout.strip(),
            "python": str(python)}


def run_generate(args: argparse.Namespace) -> int:
    if not args.dataset_dir.is_dir():
        raise UserError(f"dataset folder {args.dataset_dir} does not exist")
    cases = pd.list_cases(args.dataset_dir)
    if not cases:
        raise UserError(f"no case .npz files in {args.dataset_dir}")
    if args.workers < 1:
        raise UserError("--workers must be >= 1")
    pd.exit_on_sigterm()  # a stopped run leaves no engine process behind; written plans stay
    try:
        config = pd.GenerateConfig(args.plans_per_case, args.beams,
                                   1 / 3 if args.arcs else 0.0, args.seed, _settings(args),
                                   mix=args.mix)
        python = physics_python()
    except (ValueError, PhysicsUnavailableError) as exc:
        raise UserError(str(exc)) from None
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        manifest = pd.prepare_manifest(args.out_dir, config, args.dataset_dir,
                                       _engine_version(python))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    jobs = pd.plan_jobs(cases, args.out_dir, config.plans_per_case, args.per_patient)
    pd.write_json_atomic(args.out_dir / "manifest.json",
                         pd.reconcile_manifest(manifest, jobs, config))  # after a stopped run
    plans: dict[str, dict] = manifest["plans"]
    # a rejected plan is not packed, so a run resumed from a pack would compute it again
    rejected = {name for name, record in plans.items() if record.get("rejected")}
    missing = [j for j in jobs if not j.out.exists() and j.out.stem not in rejected]
    todo = missing if args.limit is None else missing[:args.limit]
    print(f"{len(jobs) - len(missing)} of {len(jobs)} plans present or rejected; computing "
          f"{len(todo)} with {args.workers} worker(s) into {args.out_dir}", file=sys.stderr)
    times: list[float] = list(manifest.get("seconds_per_plan", []))
    failures: dict[str, str] = {}
    bar = tqdm(total=len(todo), unit="plan", dynamic_ncols=True)

    def done(job: pd.PlanJob, outcome: pd.PlanOutcome | None, error: str | None) -> None:
        if outcome is not None:
            times.append(round(outcome.seconds, 2))
            plans[job.out.stem] = {"seconds": round(outcome.seconds, 2), **outcome.record}
        else:
            failures[job.out.name] = error
        bar.update(1)
        bar.set_postfix(failed=len(failures))
        manifest.update(seconds_per_plan=times, failures=failures, updated_unix=time.time(),
                        plans_written=len(plans), **pd.summarize_times(times),
                        **pd.acceptance_summary(plans))
        pd.write_json_atomic(args.out_dir / "manifest.json", manifest)

    try:
        pd.run_generation(todo, config, args.workers, done)
    finally:
        bar.close()
    print(f"{manifest.get('plans_written', 0)} of {len(jobs)} plans in {args.out_dir}"
          + (f"; {len(failures)} failed (see manifest.json)" if failures else ""),
          file=sys.stderr)
    return 1 if failures else 0


def _load_case(path: Path) -> tuple[Case, str]:
    """The case at ``path`` and its kind: ``openkbp`` (a ``.npz`` or a CSV patient folder) or
    ``dicom`` (a folder of DICOM files)."""
    try:
        if path.suffix == ".npz" or (path / "ct.csv").is_file():
            return load_openkbp(path), "openkbp"
        if path.is_dir():
            return load_dicom_case(path), "dicom"
    except (OpenKBPFormatError, DicomImportError) as exc:
        raise UserError(str(exc)) from None
    raise UserError(f"{path} is neither a DICOM folder nor an OpenKBP case (.npz or CSV folder)")


def run_verify(args: argparse.Namespace) -> int:
    case, kind = _load_case(args.path)
    try:
        result = compute_physics_dose(case, case.plan, _settings(args))
    except (PhysicsUnavailableError, PhysicsError, PhysicsCancelled) as exc:
        raise UserError(str(exc)) from None
    if kind == "dicom":
        out = args.out or Path(f"RD_physics_{case.name}.dcm")
        try:
            write_rtdose(result.dose, case, out, description="pyRadPlan physics dose")
        except ValueError as exc:
            raise UserError(f"cannot write the RTDOSE: {exc}") from None
    else:
        out = args.out or Path(f"{case.name}_physics.npz")
        pd.write_npz_atomic(out, {
            "dose_gy": from_case_axes(result.dose.array).astype(np.float32),
            "gantry_deg": np.asarray(result.delivery_gantry_deg, dtype=np.float32),
            "physics_json": np.asarray(json.dumps({"engine": result.info,
                                                   "normalization": result.normalization})),
        })
    report = {"case": case.name, "delivery_gantry_deg": list(result.delivery_gantry_deg),
              "normalization": result.normalization, "primary_target": result.primary_target,
              "seconds": result.info["timings_s"]["total"], "out": str(out)}
    if case.dose is not None:
        report["comparison_vs_case_dose"] = dose_comparison(case, result.dose.array,
                                                            case.dose.array)
    print(json.dumps(report, indent=1))
    return 0


def run_pack(args: argparse.Namespace) -> int:
    if not args.generated_dir.is_dir():
        raise UserError(f"folder {args.generated_dir} does not exist")
    try:
        n = physics_pack.pack_folder(args.generated_dir, args.pack_dir)
    except physics_pack.PackError as exc:
        raise UserError(str(exc)) from None
    print(f"packed {n} new plan(s) into {args.pack_dir}", file=sys.stderr)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    if not args.generated_dir.is_dir():
        raise UserError(f"folder {args.generated_dir} does not exist")
    path = args.generated_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    plans: dict[str, dict] = manifest.setdefault("plans", {})
    files = [p for p in pd.list_cases(args.generated_dir) if "_plan" in p.stem]
    if not files:
        raise UserError(f"no generated plan files (*_planK.npz) in {args.generated_dir}")
    for plan_path in tqdm(files, unit="plan", dynamic_ncols=True):
        try:
            case = load_openkbp(plan_path)
            record = pd.quality_record(case, pd.load_arrays(plan_path))
        except (OpenKBPFormatError, PhysicsError, KeyError) as exc:
            raise UserError(f"{plan_path}: not a generated plan file ({exc})") from None
        plans[plan_path.stem] = {**plans.get(plan_path.stem, {}), **record}
    manifest.update(pd.acceptance_summary(plans))
    pd.write_json_atomic(path, manifest)
    summary = pd.acceptance_summary(plans)
    print(f"{summary['plans_accepted']} of {summary['plans_evaluated']} plans accepted; "
          f"failed limits: {summary['rejections_by_limit']}", file=sys.stderr)
    return 0


def run_unpack(args: argparse.Namespace) -> int:
    for folder in (args.pack_dir, args.dataset_dir):
        if not folder.is_dir():
            raise UserError(f"folder {folder} does not exist")
    try:
        n = physics_pack.unpack_folder(args.pack_dir, args.dataset_dir, args.out_dir)
    except physics_pack.PackError as exc:
        raise UserError(str(exc)) from None
    print(f"restored {n} plan(s) into {args.out_dir}", file=sys.stderr)
    return 0
