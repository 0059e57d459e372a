"""``dosepilot compare PATIENT --a A --b B --out report.pdf|.png [--json] [--preview]``

Compares two doses of one patient (a DICOM folder or a dataset case file) and writes the
comparison report (:mod:`engine.compare_report`): A, B and A − B slices through the isocentre,
the DVHs of both (A solid, B dashed) and both scorecards with each objective's A − B. A and B
are each

* an RTPLAN file: its dose is predicted with the model (10 steps, or a 1-step preview with
  ``--preview``), as ``dosepilot predict`` does for the patient's own plan;
* an RTDOSE file: used as it is, resampled onto the patient's CT grid;
* ``reference``: the patient's own dose (its RTDOSE, or a dataset case's dose).

A file of another patient (PatientID) or another frame of reference than the CT is refused.
``--json`` prints the summary: both scorecards, per-objective A − B, difference statistics.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.case import Case, Plan, Role, Volume
from engine.commands.bench_cmd import add_precision_argument
from engine.errors import UserError

REFERENCE = "reference"
REPORT_SUFFIXES = (".pdf", ".png")


@dataclass(frozen=True)
class Source:
    """One side as given on the command line, checked against the patient: a plan to predict
    (``plan``) or a dose on the CT grid (``dose``, Gy)."""

    name: str
    plan: Plan | None = None
    dose: Volume | None = None
    description: str = ""
    notes: tuple[str, ...] = ()


def _check_identity(ds: Any, case: Case, path: Path) -> None:
    """Refuse a file of another patient or another frame of reference than the CT."""
    patient = str(ds.get("PatientID", "") or "")
    if patient and case.refs.patient_id and patient != case.refs.patient_id:
        raise UserError(f"{path}: belongs to patient {patient!r}, not to "
                        f"{case.refs.patient_id!r}")
    frame = str(ds.get("FrameOfReferenceUID", "") or "")
    if frame and case.refs.frame_of_reference_uid and frame != case.refs.frame_of_reference_uid:
        raise UserError(f"{path}: is in another frame of reference ({frame}) than the "
                        f"patient's CT ({case.refs.frame_of_reference_uid})")


def resolve_source(spec: str, case: Case) -> Source:
    """``spec`` ("reference", an RTPLAN or an RTDOSE file) as a :class:`Source`; UserError
    says what is wrong with it."""
    from engine.io.dicom_errors import DicomImportError
    from engine.io.dicom_rtdose import dose_on_ct, read_rtdose
    from engine.io.dicom_rtplan import read_rtplan
    from engine.io.dicom_scan import read_object

    if spec.lower() == REFERENCE:
        if case.dose is None:
            raise UserError(f"{case.name}: the patient has no reference dose (no RTDOSE in its "
                            "folder); give an RTPLAN or RTDOSE file instead of 'reference'")
        return Source("Reference", dose=case.dose, description="the patient's own dose")
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{path}: no such file (give an RTPLAN or RTDOSE file, or "
                        f"'{REFERENCE}')")
    obj = read_object(path)
    if obj is None:
        raise UserError(f"{path}: not a DICOM file")
    if isinstance(obj, str):
        raise UserError(f"{path}: {obj}")
    if obj.modality not in ("RTPLAN", "RTDOSE"):
        raise UserError(f"{path}: expected an RTPLAN or RTDOSE, found modality "
                        f"{obj.modality or '?'}")
    _check_identity(obj.ds, case, path)
    try:
        if obj.modality == "RTPLAN":
            position = case.plan.patient_position.value if case.plan is not None else None
            info = read_rtplan(obj.ds, position)
            if not info.plan.beams:
                raise UserError(f"{path}: the plan has no treatment beams to predict a dose for")
            return Source(info.plan.name or path.stem, plan=info.plan,
                          description=f"RTPLAN {path.name}", notes=info.notes)
        grid = read_rtdose(obj.ds, path.name)
    except DicomImportError as exc:
        raise UserError(f"{path}: {exc}") from None
    if grid.units != "GY":
        raise UserError(f"{path}: the dose is in {grid.units}, not Gy; it cannot be compared")
    body = next((s.mask for s in case.structures if s.role is Role.EXTERNAL), None)
    dose, notes = dose_on_ct(grid.volume, case.geometry, body, path.name)
    if float(grid.volume.array.max()) > 0 and not dose.array.any():
        raise UserError(f"{path}: the dose grid does not overlap the patient's CT")
    return Source(f"RTDOSE {path.stem}", dose=dose, notes=grid.notes + notes,
                  description=f"RTDOSE {path.name}, {grid.summation_type or 'summation ?'}")


def _unique(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a != b else (f"{a} (A)", f"{b} (B)")


def run(args: argparse.Namespace) -> int:
    from engine.commands.predict_cmd import load_one_patient
    from engine.compare_report import write_comparison_report
    from engine.plan_compare import compare_doses

    if args.out.suffix.lower() not in REPORT_SUFFIXES:
        raise UserError(f"--out {args.out}: the report is a .pdf or a .png file")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    case = load_one_patient(args.patient)
    sides = [resolve_source(spec, case) for spec in (args.a, args.b)]
    engine = None
    if any(s.plan is not None for s in sides):
        from engine.commands.bench_cmd import load_engine

        engine = load_engine(args.model, args.threads, precision=args.precision)
    doses, plans, sources = [], [], []
    for side in sides:
        if side.plan is None:
            doses.append(side.dose)
            plans.append(None)
            sources.append(side.description)
            continue
        if args.preview:
            result = engine.preview(case, side.plan)
            how = "AI preview, 1 step"
        else:
            result = engine.predict(case, side.plan, steps=args.steps)
            how = f"AI prediction, {args.steps} steps"
        model = engine.model.path.name if engine.model.path else "model"
        doses.append(result.dose)
        plans.append(side.plan)
        sources.append(f"{how}, model {model}, {side.description}")
    name_a, name_b = _unique(sides[0].name, sides[1].name)
    comparison = compare_doses(case, doses[0], doses[1], name_a, name_b, plan_a=plans[0],
                               plan_b=plans[1], source_a=sources[0], source_b=sources[1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_comparison_report(case, comparison, args.out)
    summary = {"case": case.name, "out": str(args.out), **comparison.summary(),
               "input_notes": [n for s in sides for n in s.notes]}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"A = {name_a}, B = {name_b}: mean |A - B| {comparison.mean_abs_diff_gy:.2f} Gy, "
          f"max |A - B| {comparison.max_abs_diff_gy:.2f} Gy in the body")
    if comparison.template:
        ca, cb = comparison.a.scorecard, comparison.b.scorecard
        print(f"scorecard {comparison.template}: A {ca.total:.2f}, B {cb.total:.2f}, "
              f"A - B {comparison.total_delta:+.2f}")
        for r in comparison.objectives:
            if r.delta is not None:
                print(f"  {r.label:40s} A {r.value_a:8.2f}  B {r.value_b:8.2f}  "
                      f"A-B {r.delta:+8.2f}")
    print(f"report written to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="compare two plans or doses of one patient (PDF/PNG report)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("patient", type=Path, metavar="PATIENT",
                   help="DICOM patient folder or dataset case file")
    p.add_argument("--a", required=True, metavar="A",
                   help="RTPLAN file, RTDOSE file or 'reference'")
    p.add_argument("--b", required=True, metavar="B",
                   help="RTPLAN file, RTDOSE file or 'reference'")
    p.add_argument("--out", type=Path, required=True, help="the report: a .pdf or .png file")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--preview", action="store_true",
                   help="predict plans with the 1-step preview instead of the full prediction")
    p.add_argument("--steps", type=int, default=10,
                   help="sampler steps of a full prediction (default 10)")
    p.add_argument("--model", type=Path, help="model bundle folder (default: the shipped model)")
    p.add_argument("--threads", type=int,
                   help="CPU threads (default: the cores other processes leave free)")
    add_precision_argument(p)
    p.set_defaults(func=run)
