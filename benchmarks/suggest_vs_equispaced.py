"""Does a suggested beam arrangement beat the equispaced one in **physics**? (issue 19)

``python -m benchmarks.suggest_vs_equispaced [--cases pt_201 ...] [--beams 7] [--budget 60]
[--model DIR] [--out DIR]``

For each OpenKBP validation patient: ``engine.beam_search.suggest_beams`` with the model's
preview (``--budget`` seconds), then the physics dose (pyRadPlan, the settings of the v2 training
plans: 5 mm dose grid, 7 mm bixels, 200 iterations, normalised to PTV70 D95 = 70 Gy, so both
arrangements have the same target coverage) of the best suggestion and of the equispaced
arrangement from 0 deg. Compared on the head-and-neck scorecard and on the mean doses of the
parotids and the maxima of the spinal cord and brainstem. One JSON file per patient in
``--out`` (a rerun skips patients already done), then a Markdown table. Needs the physics
environment (``make physics-env``).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from engine.beam_search import MIN_SEPARATION_DEG, plan_with_angles, suggest_beams
from engine.io.openkbp import load_openkbp_npz
from engine.metrics.dvh import all_metrics, prepare
from engine.metrics.scorecard import BoundScorecard, builtin_template
from engine.physics.dose_calc import PhysicsSettings, compute_physics_dose
from engine.runtime import DoseEngine, default_model_path
from engine.structure_names import canonical_name

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared/data/openkbp/validation"
CASES = ("pt_201", "pt_206", "pt_210", "pt_215", "pt_221")  # all in the validation split
SETTINGS = PhysicsSettings(dose_grid_mm=5.0, bixel_width_mm=7.0, max_iter=200)
ORGANS = (("Parotid_L", "mean"), ("Parotid_R", "mean"), ("SpinalCord", "max"),
          ("Brainstem", "max"))


def physics_figures(case, angles) -> dict:
    """Scorecard total and organ figures (Gy) of the physics dose of ``angles`` on ``case``."""
    result = compute_physics_dose(case, plan_with_angles(case.plan, angles), SETTINGS)
    dose = result.dose.array
    structures = prepare(case.structures, case.geometry)
    _, metrics = all_metrics(dose, structures, case.geometry)
    by_name = {m.name: m for m in metrics}
    figures = {"scorecard": BoundScorecard(builtin_template("head_neck"), case.structures,
                                           case.geometry).score(dose).total}
    for s in case.structures:
        for organ, figure in ORGANS:
            if canonical_name(s.name) == organ and s.name in by_name:
                m = by_name[s.name]
                figures[f"{organ} {figure}"] = m.mean_gy if figure == "mean" else m.max_gy
    figures["physics_s"] = result.info.get("timings_s", {}).get("total")
    return figures


def run_case(engine: DoseEngine, name: str, beams: int, budget: float, out: Path,
             min_separation: float) -> dict:
    path = out / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    case = load_openkbp_npz(DATASET / f"{name}.npz")
    search = suggest_beams(engine, case, beams, budget_s=budget, keep=1,
                           min_separation_deg=min_separation)
    best = search.best[0]
    record = {"case": name, "beams": beams, "min_separation_deg": min_separation,
              "evaluated": search.evaluated,
              "search_s": round(search.seconds, 1), "objective": search.objective,
              "suggested": {"gantry_deg": list(best.gantry_deg), "model_objective": best.value,
                            "physics": physics_figures(case, best.gantry_deg)},
              "equispaced": {"gantry_deg": list(search.equispaced.gantry_deg),
                             "model_objective": search.equispaced.value,
                             "physics": physics_figures(case, search.equispaced.gantry_deg)},
              "machine": platform.processor() or platform.machine()}
    path.write_text(json.dumps(record, indent=1))
    return record


def table(records: list[dict]) -> str:
    keys = ["scorecard"] + [f"{o} {f}" for o, f in ORGANS]
    lines = ["| case | arrangement | model objective | " + " | ".join(keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for r in records:
        for kind in ("equispaced", "suggested"):
            phys = r[kind]["physics"]
            cells = [f"{phys[k]:.3f}" if k == "scorecard" else
                     (f"{phys[k]:.1f}" if k in phys else "-") for k in keys]
            lines.append(f"| {r['case']} | {kind} {r[kind]['gantry_deg']} | "
                         f"{r[kind]['model_objective']:.2f} | " + " | ".join(cells) + " |")
    won = sum(r["suggested"]["physics"]["scorecard"] > r["equispaced"]["physics"]["scorecard"]
              for r in records)
    lines.append(f"\nsuggestion better on the physics scorecard: {won} of {len(records)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--beams", type=int, default=7)
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--min-separation", type=float, default=MIN_SEPARATION_DEG,
                        help="closest two beams may come, degrees")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("suggest-vs-equispaced"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    engine = DoseEngine.from_checkpoint(args.model, device="cpu", threads=args.threads)
    records = []
    for name in args.cases:
        records.append(run_case(engine, name, args.beams, args.budget, args.out,
                                args.min_separation))
        print(json.dumps(records[-1]), flush=True)
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
