"""``dosepilot suggest-beams PATIENT --beams N [--forbid A-B ...] [--budget SECONDS] --out DIR``

Searches coplanar ``N``-field static arrangements for the patient (a DICOM folder or a dataset
case file) with the AI preview as the objective (:mod:`engine.beam_search`) and writes, in
``DIR``:

* ``suggestion_1/plan.dcm`` .. ``suggestion_K/plan.dcm``: the best ``--keep`` arrangements as
  RTPLANs of the patient (same isocentre and prescription), best first;
* ``equispaced/plan.dcm``: the equispaced arrangement from 0 deg, the usual class solution;
* ``suggestions.json``: the objective, every suggestion's angles, objective value and terms
  (scorecard, target D95 deficit, organ figures from the model's preview dose), the equispaced
  reference, how many arrangements were evaluated, the seconds spent and the slowest single
  evaluation's seconds (the search starts none after the budget, so it overruns by less).

``--forbid 300-60`` keeps every beam out of the clockwise sector from 300 to 60 deg (through 0);
repeat it for several sectors. The suggestion is the model's word: verify it with physics
(``dosepilot physics dose``) before trusting it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.beam_search import MIN_SEPARATION_DEG
from engine.commands.bench_cmd import add_precision_argument
from engine.errors import UserError


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.beam_search import parse_sector, plan_with_angles, suggest_beams
    from engine.commands.bench_cmd import load_engine
    from engine.commands.predict_cmd import load_one_patient
    from engine.io.dicom_export import write_rtplan

    try:
        forbid = [parse_sector(s) for s in args.forbid]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.budget <= 0:
        raise UserError(f"--budget must be > 0 seconds, got {args.budget}")
    if args.keep < 1:
        raise UserError(f"--keep must be >= 1, got {args.keep}")
    case = load_one_patient(args.patient)
    if case.plan is None or not case.plan.beams:
        raise UserError(f"{case.name}: the patient has no plan to take the isocentre from")
    engine = load_engine(args.model, args.threads, precision=args.precision)
    bar = tqdm(desc="arrangements", unit="eval", disable=args.json or not sys.stderr.isatty(),
               file=sys.stderr)

    def progress(evaluated: int, best: float) -> None:
        bar.update(evaluated - bar.n)
        bar.set_postfix(best=f"{best:.2f}")

    try:
        result = suggest_beams(engine, case, args.beams, forbid, args.budget, args.keep,
                               progress=progress, min_separation_deg=args.min_separation)
    except ValueError as exc:  # also a --min-separation above 360 / N
        raise UserError(str(exc)) from None
    finally:
        bar.close()
    if not result.best:
        raise UserError(f"no {args.beams}-beam arrangement keeps out of the forbidden sectors "
                        f"{args.forbid} with beams {args.min_separation:g} deg apart")
    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for rank, candidate in enumerate(result.best, start=1):
        folder = args.out / f"suggestion_{rank}"
        folder.mkdir(exist_ok=True)
        write_rtplan(case, plan_with_angles(case.plan, candidate.gantry_deg),
                     folder / "plan.dcm")
        entries.append({"rank": rank, "gantry_deg": list(candidate.gantry_deg),
                        "objective": round(candidate.value, 4), "terms": candidate.terms,
                        "plan": str(folder / "plan.dcm")})
    reference = args.out / "equispaced"
    reference.mkdir(exist_ok=True)
    write_rtplan(case, plan_with_angles(case.plan, result.equispaced.gantry_deg),
                 reference / "plan.dcm")
    summary = {"patient": case.name, "beams": args.beams, "forbid": args.forbid,
               "objective": result.objective, "suggestions": entries,
               "equispaced": {"gantry_deg": list(result.equispaced.gantry_deg),
                              "objective": round(result.equispaced.value, 4),
                              "terms": result.equispaced.terms,
                              "plan": str(reference / "plan.dcm")},
               "evaluated": result.evaluated, "seconds": round(result.seconds, 2),
               "budget_s": args.budget, "slowest_evaluation_s": round(result.slowest_s, 2),
               "model": str(engine.model.path),
               "note": "objective values are of the model's preview dose; verify with physics"}
    (args.out / "suggestions.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{result.evaluated} arrangements in {result.seconds:.1f} s; objective "
              f"{result.objective}")
        print(f"  equispaced  {' '.join(f'{a:5.1f}' for a in result.equispaced.gantry_deg)}"
              f"   objective {result.equispaced.value:.3f}")
        for e in entries:
            print(f"  suggestion {e['rank']} {' '.join(f'{a:5.1f}' for a in e['gantry_deg'])}"
                  f"   objective {e['objective']:.3f}   -> {e['plan']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "suggest-beams", help="search beam angles with the AI preview as the objective",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("patient", type=Path, help="DICOM patient folder or dataset case file")
    p.add_argument("--beams", type=int, required=True, help="number of coplanar static beams")
    p.add_argument("--forbid", action="append", default=[], metavar="A-B",
                   help="forbidden gantry sector, clockwise from A to B degrees (repeatable)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="search time in seconds (default 60)")
    p.add_argument("--keep", type=int, default=3, help="suggestions to write (default 3)")
    p.add_argument("--min-separation", type=float, default=MIN_SEPARATION_DEG, metavar="DEG",
                   help="closest two beams may come, degrees (default "
                        f"{MIN_SEPARATION_DEG:g}; at most 360 / N)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--model", type=Path, help="model bundle folder (default: the shipped model)")
    p.add_argument("--threads", type=int,
                   help="CPU threads (default: the cores other processes leave free)")
    add_precision_argument(p)
    p.set_defaults(func=run)
