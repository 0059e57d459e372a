"""``dosepilot evaluate PRED_DIR REF_DIR [--format openkbp|gdp-hmm] [--json]``: benchmark scores.

OpenKBP (default): ``PRED_DIR`` holds ``pt_N.csv`` (the challenge's sparse submission format) or
``pt_N.npy`` (dense 128³ in the dataset's layout, Gy) files, or the ``pt_N/dose.npy`` folders
``dosepilot predict`` writes; ``REF_DIR`` the shared ``pt_N.npz`` references or the original
dataset's ``pt_N/`` folders (read by :mod:`engine.io.openkbp`). Prints one CSV row per patient
(dose score, DVH score, GDP-HMM-style MAE) and the summary: the OpenKBP dose and DVH scores over
the patients scored, and the mean GDP-HMM leaderboard MAE computed on the OpenKBP patients (the
highest-prescription PTV as the high PTV, the possible-dose mask as the body).

GDP-HMM: ``PRED_DIR`` holds ``{plan}_pred.npy`` files (Gy, the npz grid) or the
``{plan}/dose.npy`` folders ``dosepilot predict`` writes, ``REF_DIR`` the plans' ``{plan}.npz``
files; the prescriptions come from ``PTV_DICT.json`` (``--ptv-dict``, else found in ``REF_DIR``
or its parent). Prints one row per plan (MAE) and the mean MAE.

``--scorecard SITE_OR_TOML`` (OpenKBP) adds each patient's clinical scorecard total for the
prediction and the reference. ``--json`` prints one JSON object instead of CSV and summary.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UserError
from engine.io.openkbp import PRESCRIPTIONS_GY, to_case_axes
from engine.metrics.benchmark_io import (
    BenchmarkFileError,
    gdp_hmm_predictions,
    openkbp_predictions,
    openkbp_references,
    patient_sort_key,
    read_gdp_hmm_npz,
    read_openkbp_prediction,
    read_openkbp_reference,
    read_prediction_array,
    read_ptv_dict,
)
from engine.metrics.scorecard import (
    BoundScorecard,
    ScorecardError,
    ScorecardTemplate,
    builtin_template,
    load_template,
)
from engine.metrics.scores import (
    BenchmarkScore,
    CaseScore,
    gdp_hmm_benchmark,
    gdp_hmm_mae,
    openkbp_benchmark,
    openkbp_case_score,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="benchmark scores of predicted doses against references",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("pred_dir", type=Path, help="folder of predicted doses")
    p.add_argument("ref_dir", type=Path, help="folder of reference cases")
    p.add_argument("--format", choices=("openkbp", "gdp-hmm"), default="openkbp",
                   help="benchmark (default: openkbp)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--ptv-dict", type=Path, help="GDP-HMM PTV_DICT.json (prescriptions)")
    p.add_argument("--scorecard", help="OpenKBP: also score each dose with this scorecard "
                                       "(head_neck, lung, prostate or a .toml file)")
    p.set_defaults(func=run)


def _template(spec: str) -> ScorecardTemplate:
    try:
        if spec.endswith(".toml") or Path(spec).is_file():
            return load_template(spec)
        return builtin_template(spec)
    except ScorecardError as exc:
        raise UserError(str(exc)) from exc


def _match(preds: dict[str, Path], refs: dict[str, Path], warnings: list[str]) -> list[str]:
    both = [k for k in refs if k in preds]
    if not both:
        raise UserError(f"no prediction matches a reference case ({len(preds)} prediction(s), "
                        f"{len(refs)} reference case(s))")
    missing = [k for k in refs if k not in preds]
    extra = [k for k in preds if k not in refs]
    if missing:
        warnings.append(f"{len(missing)} reference case(s) have no prediction and are not "
                        f"scored: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if extra:
        warnings.append(f"{len(extra)} prediction(s) have no reference: {', '.join(extra[:10])}")
    return both


def _evaluate_openkbp(args: argparse.Namespace, warnings: list[str]
                      ) -> tuple[BenchmarkScore, dict[str, dict[str, float]]]:
    """OpenKBP scores (the case model holds reference doses in float32, so scores can differ
    from a float64 evaluation by about 1e-6 Gy) and optional scorecard totals."""
    refs = openkbp_references(args.ref_dir)
    if not refs:
        raise UserError(f"{args.ref_dir}: no OpenKBP references (pt_N.npz files or pt_N/ "
                        "folders)")
    preds = openkbp_predictions(args.pred_dir)
    template = _template(args.scorecard) if args.scorecard else None
    rows: list[CaseScore] = []
    extra: dict[str, dict[str, float]] = {}
    for pid in _match(preds, refs, warnings):
        ref = read_openkbp_reference(refs[pid])
        pred = read_openkbp_prediction(preds[pid])
        rows.append(openkbp_case_score(pid, ref.dose_gy, pred, ref.masks,
                                       ref.possible_dose_mask, ref.voxel_mm))
        extra[pid] = _gdp_hmm_style(ref, pred)
        if template is not None:
            card = BoundScorecard(template, ref.case)
            extra[pid].update(scorecard_pred=card.score(to_case_axes(pred)).total,
                              scorecard_ref=card.score(ref.case.dose.array).total)
    return openkbp_benchmark(rows), extra


def _gdp_hmm_style(ref, pred: np.ndarray) -> dict[str, float]:
    """The GDP-HMM leaderboard MAE on an OpenKBP patient: the highest-prescription PTV as the
    high PTV (reference rescaled to its D97 = prescription), the possible-dose mask as the body;
    empty when the patient has no such PTV."""
    for name in sorted(PRESCRIPTIONS_GY, key=PRESCRIPTIONS_GY.get, reverse=True):
        mask = ref.masks.get(name)
        if mask is not None and mask.any():
            try:
                return {"gdp_hmm_mae": gdp_hmm_mae(pred, ref.dose_gy, ref.possible_dose_mask,
                                                   mask, PRESCRIPTIONS_GY[name])}
            except ValueError:      # no voxel above 5 Gy: not defined
                return {}
    return {}


def _ptv_dict(args: argparse.Namespace) -> dict:
    candidates = ([args.ptv_dict] if args.ptv_dict
                  else [args.ref_dir / "PTV_DICT.json", args.ref_dir.parent / "PTV_DICT.json"])
    for path in candidates:
        if path.is_file():
            return read_ptv_dict(path)
    raise UserError("GDP-HMM scoring needs the prescriptions in PTV_DICT.json: pass --ptv-dict "
                    "(looked in " + ", ".join(str(c) for c in candidates) + ")")


def _evaluate_gdp_hmm(args: argparse.Namespace, warnings: list[str]) -> BenchmarkScore:
    refs = {p.stem: p for p in sorted(args.ref_dir.glob("*.npz"))}
    if not refs:
        raise UserError(f"{args.ref_dir}: no GDP-HMM plan files (*.npz)")
    preds = gdp_hmm_predictions(args.pred_dir)
    ptv = _ptv_dict(args)
    rows = []
    for plan in _match(preds, refs, warnings):
        data = read_gdp_hmm_npz(refs[plan])
        pid = plan.split("+")[0]
        high = (ptv.get(pid) or {}).get("PTV_High") or {}
        name, rx = high.get("OPTName"), high.get("PDose")
        if not name or rx is None:
            raise UserError(f"PTV_DICT.json has no PTV_High (OPTName, PDose) for patient {pid}")
        for key in ("dose", "Body", name):
            if key not in data:
                raise UserError(f"{refs[plan]}: no {key!r} array")
        pred = read_prediction_array(preds[plan], np.shape(data["dose"]))
        try:
            mae = gdp_hmm_mae(pred, data["dose"], data["Body"], data[name], float(rx),
                              float(data.get("dose_scale", 1.0)))
        except ValueError as exc:
            raise UserError(f"{refs[plan]}: {exc}") from exc
        rows.append(CaseScore(plan, mae))
    return gdp_hmm_benchmark(rows)


def _report(result: BenchmarkScore, extra: dict[str, dict[str, float]],
            warnings: list[str]) -> dict[str, Any]:
    cases = []
    for c in sorted(result.cases, key=lambda c: patient_sort_key(c.case)):
        row: dict[str, Any] = {"case": c.case, "dose_score": c.dose_score}
        if result.benchmark == "openkbp":
            row["dvh_score"] = c.dvh_score
        row.update(extra.get(c.case, {}))
        cases.append(row)
    summary: dict[str, Any] = {"benchmark": result.benchmark, "n_cases": len(result.cases),
                               "dose_score": result.dose_score}
    if result.benchmark == "openkbp":
        summary["dvh_score"] = result.dvh_score
    for key in ("gdp_hmm_mae", "scorecard_pred", "scorecard_ref"):
        values = np.array([e[key] for e in extra.values() if key in e])
        if values.size:
            summary[key] = {"mean": float(values.mean()), "min": float(values.min()),
                            "median": float(np.median(values)), "max": float(values.max())}
    return {**summary, "cases": cases, "warnings": warnings}


def _print_text(report: dict[str, Any]) -> None:
    rows = report["cases"]
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    print(buf.getvalue(), end="")
    print()
    if report["benchmark"] == "openkbp":
        print(f"OpenKBP dose score: {report['dose_score']:.4f} Gy over {report['n_cases']} "
              "patient(s)")
        dvh = report["dvh_score"]
        print(f"OpenKBP DVH score: {dvh:.4f} Gy" if dvh is not None else "OpenKBP DVH score: -")
    else:
        print(f"GDP-HMM MAE: {report['dose_score']:.4f} Gy over {report['n_cases']} plan(s)")
    if "gdp_hmm_mae" in report:
        s = report["gdp_hmm_mae"]
        print(f"GDP-HMM-style MAE (highest PTV D97 = prescription, possible-dose mask): mean "
              f"{s['mean']:.4f} Gy, median {s['median']:.4f} Gy")
    for key, label in (("scorecard_pred", "prediction"), ("scorecard_ref", "reference")):
        if key in report:
            s = report[key]
            print(f"Scorecard total ({label}): mean {s['mean']:.3f}, median {s['median']:.3f}, "
                  f"min {s['min']:.3f}, max {s['max']:.3f}")
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    for d in (args.pred_dir, args.ref_dir):
        if not d.is_dir():
            raise UserError(f"{d}: not a folder")
    if args.scorecard and args.format != "openkbp":
        raise UserError("--scorecard works with --format openkbp")
    warnings: list[str] = []
    try:
        if args.format == "openkbp":
            result, extra = _evaluate_openkbp(args, warnings)
        else:
            result, extra = _evaluate_gdp_hmm(args, warnings), {}
    except BenchmarkFileError as exc:
        raise UserError(str(exc)) from exc
    report = _report(result, extra, warnings)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0
