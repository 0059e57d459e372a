"""``dosepilot inspect PATH [--json]``: what a DICOM patient folder holds.

Prints the CT grid, every structure of the structure set (role, volume, prescription; those
without a mask on the CT marked "not on the CT" with the reason), each beam (gantry angle or arc
range, couch, technique, isocentre), the dose if any (on the CT grid and, from an RTDOSE, on its
own grid, which shows the whole dose when the CT misses part of it), and every import warning.
``--json`` prints one JSON object with the keys ``ct``, ``structures`` (each with ``on_ct``),
``beams``, ``plan``, ``dose`` (with ``own_grid``) and ``warnings``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from engine.case import Beam, Case, Technique, Volume
from engine.errors import UserError
from engine.io.dicom import DicomImportError, load_dicom_case


def _r(values: Any, nd: int = 3) -> list[float]:
    return [round(float(v), nd) for v in values]


def _beam(b: Beam) -> dict[str, Any]:
    out: dict[str, Any] = {"name": b.name, "technique": b.technique.value}
    if b.technique is Technique.ARC:
        out["gantry_start_deg"] = round(b.control_point_gantry_deg[0], 3)
        out["gantry_stop_deg"] = round(b.control_point_gantry_deg[-1], 3)
        out["control_points"] = len(b.control_point_gantry_deg)
    else:
        out["gantry_deg"] = round(b.gantry_deg, 3)
    out["couch_deg"] = round(b.couch_deg, 3)
    out["collimator_deg"] = round(b.collimator_deg, 3)
    out["isocenter_mm"] = _r(b.isocenter_mm, 2)
    return out


def _structures(case: Case) -> list[dict[str, Any]]:
    """Every ROI: those with a mask, then those without, merged by ROI number when the
    listing holds ROIs not on the CT (ROI numbers come from the structure set then)."""
    g = case.geometry
    rows = [(s.number, {"name": s.name, "role": s.role.value, "on_ct": True,
                        "volume_cc": round(s.volume_cc(g), 3),
                        "prescription_gy": s.prescription_gy}) for s in case.structures]
    rows += [(s.number, {"name": s.name, "role": s.role.value, "on_ct": False,
                         "volume_cc": None, "prescription_gy": None, "reason": s.reason})
             for s in case.structures_not_on_ct]
    if case.structures_not_on_ct:
        rows.sort(key=lambda row: row[0])
    return [row for _, row in rows]


def _dose(volume: Volume) -> dict[str, Any]:
    g = volume.geometry
    return {"shape": list(g.shape), "spacing_mm": _r(g.spacing), "origin_mm": _r(g.origin),
            "max_gy": round(float(volume.array.max()), 3),
            "mean_gy": round(float(np.mean(volume.array)), 3)}


def summarize(case: Case) -> dict[str, Any]:
    """The inspect report as plain JSON-able data."""
    g = case.geometry
    ct = case.ct.array
    report: dict[str, Any] = {
        "name": case.name,
        "ct": {"shape": list(g.shape), "spacing_mm": _r(g.spacing), "origin_mm": _r(g.origin),
               "direction": [_r(row, 6) for row in g.direction],
               "hu_min": round(float(ct.min()), 1), "hu_max": round(float(ct.max()), 1)},
        "structures": _structures(case),
        "beams": [_beam(b) for b in case.plan.beams] if case.plan else [],
        "plan": None, "dose": None, "warnings": list(case.warnings),
    }
    if case.plan is not None:
        p = case.plan
        report["plan"] = {"name": p.name, "fractions": p.fractions,
                          "prescription_gy": p.prescription_gy,
                          "patient_position": p.patient_position.value}
    if case.dose is not None:
        report["dose"] = {**_dose(case.dose), "on_ct_grid": True,
                          "own_grid": _dose(case.dose_grid) if case.dose_grid is not None
                          else None}
    return report


def _text(r: dict[str, Any]) -> str:
    ct = r["ct"]
    lines = [f"Patient {r['name']}",
             f"CT  {' x '.join(map(str, ct['shape']))} voxels (z, y, x), spacing "
             f"{' x '.join(f'{v:g}' for v in ct['spacing_mm'])} mm, origin "
             f"({', '.join(f'{v:g}' for v in ct['origin_mm'])}) mm LPS, "
             f"HU {ct['hu_min']:g} .. {ct['hu_max']:g}"]
    off = sum(not s["on_ct"] for s in r["structures"])
    lines.append(f"Structures ({len(r['structures'])}"
                 f"{f', {off} not on the CT' if off else ''}):")
    for s in r["structures"]:
        if not s["on_ct"]:
            lines.append(f"  {s['name']:<24} {s['role']:<9}  not on the CT: {s['reason']}")
            continue
        rx = f"  Rx {s['prescription_gy']:g} Gy" if s["prescription_gy"] else ""
        lines.append(f"  {s['name']:<24} {s['role']:<9} {s['volume_cc']:10.2f} cc{rx}")
    if r["plan"]:
        p = r["plan"]
        rx = f", Rx {p['prescription_gy']:g} Gy" if p["prescription_gy"] else ""
        lines.append(f"Plan {p['name']!r}: {p['fractions']} fractions{rx}, "
                     f"{p['patient_position']}")
    else:
        lines.append("Plan: none")
    for b in r["beams"]:
        if b["technique"] == "arc":
            angle = (f"arc {b['gantry_start_deg']:g} -> {b['gantry_stop_deg']:g} deg "
                     f"({b['control_points']} control points)")
        else:
            angle = f"gantry {b['gantry_deg']:g} deg"
        iso = ", ".join(f"{v:g}" for v in b["isocenter_mm"])
        lines.append(f"  {b['name']:<12} {angle}, couch {b['couch_deg']:g} deg, "
                     f"isocentre ({iso}) mm")
    if r["dose"]:
        d = r["dose"]
        lines.append(f"Dose on the CT grid: max {d['max_gy']:g} Gy, mean {d['mean_gy']:g} Gy")
        own = d["own_grid"]
        if own is not None:
            lines.append(f"Dose on its own grid ({' x '.join(map(str, own['shape']))} voxels, "
                         f"spacing {' x '.join(f'{v:g}' for v in own['spacing_mm'])} mm): "
                         f"max {own['max_gy']:g} Gy, mean {own['mean_gy']:g} Gy")
    else:
        lines.append("Dose: none")
    lines.append(f"Warnings ({len(r['warnings'])}):")
    lines.extend(f"  - {w}" for w in r["warnings"])
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        case = load_dicom_case(args.path)
    except DicomImportError as exc:
        raise UserError(str(exc)) from exc
    report = summarize(case)
    print(json.dumps(report, indent=2) if args.json else _text(report))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="show what a DICOM patient folder holds",
        description="Show what a DICOM patient folder holds: CT grid, structures, beams, dose "
                    "and every import warning.")
    p.add_argument("path", help="folder with the patient's DICOM files (searched recursively)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
