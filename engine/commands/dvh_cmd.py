"""``dosepilot dvh --dose RTDOSE --structures RTSTRUCT [--json] [--plot out.png]``.

DVH metrics of every ROI of a structure set under a dose, for any DICOM pair (no CT needed).
The ROIs are filled with partial volumes on a grid with the dose grid's rows and columns and one
slice per contour plane; the dose is interpolated onto it (trilinear). Per structure it prints
``volume_cc``, ``mean_gy``, ``max_gy``, ``min_gy``, ``d95_gy``, ``d2_gy``, ``d98_gy``,
``d0_03cc_gy``, ``v20gy_pct`` (% of the volume receiving >= 20 Gy), ``v20gy_cc`` and
``coverage_fraction`` (the part of the ROI inside the dose grid; the metrics cover only that
part, and a warning says so).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.case import AXIAL_DIRECTION, Geometry, Role, Structure
from engine.durable import replacing
from engine.errors import UserError
from engine.geometry import resample
from engine.io.dicom_errors import DicomImportError
from engine.io.dicom_rtdose import read_rtdose
from engine.io.dicom_rtstruct import RoiContours, rasterize, read_rois
from engine.io.dicom_scan import DicomObject, read_object
from engine.metrics.dvh import DVH, DoseMetrics, all_metrics, prepare
from engine.structure_names import prescription_from_name, role_from_observation

RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
RTDOSE_CLASS = "1.2.840.10008.5.1.4.1.1.481.2"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dvh", help="DVH metrics of an RTSTRUCT under an RTDOSE",
                              description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dose", type=Path, required=True, help="RTDOSE file")
    p.add_argument("--structures", type=Path, required=True, help="RTSTRUCT file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=Path, help="write the cumulative DVHs to this PNG")
    p.set_defaults(func=run)


def _read(path: Path, modality: str, sop_class: str) -> DicomObject:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    obj = read_object(path)
    if obj is None:
        raise UserError(f"{path}: not a DICOM file")
    if isinstance(obj, str):
        raise UserError(f"{path}: {obj}")
    found = str(obj.ds.get("SOPClassUID", ""))
    if obj.modality != modality and found != sop_class:
        raise UserError(f"{path}: expected an {modality} object, found modality "
                        f"{obj.modality or '?'}")
    return obj


def structure_grid(dose: Geometry, rois: list[RoiContours]) -> tuple[Geometry, list[str]]:
    """The dose grid's rows and columns with one slice per contour plane (z from the contours)."""
    notes: list[str] = []
    zs = np.unique(np.round(np.concatenate([c[:, 2] for r in rois for c in r.contours]), 3))
    if len(zs) == 1:
        dz = dose.spacing[0]
    else:
        dz = float(np.median(np.diff(zs)))
        off = np.abs((zs - zs[0]) / dz - np.round((zs - zs[0]) / dz)).max()
        if off > 0.25:
            notes.append(f"contour planes are unevenly spaced (median {dz:.2f} mm); each "
                         "contour fills the nearest plane")
    n = int(round((zs[-1] - zs[0]) / dz)) + 1
    origin = (dose.origin[0], dose.origin[1], float(zs[0]))
    return Geometry((n, dose.shape[1], dose.shape[2]), origin, (dz, *dose.spacing[1:]),
                    AXIAL_DIRECTION), notes


def _structures(rois: list[RoiContours], grid: Geometry, warnings: list[str]
                ) -> list[Structure]:
    out = []
    for roi in rois:
        warnings.extend(f"ROI {roi.name!r}: {n}" for n in roi.notes)
        if not roi.contours:
            warnings.append(f"ROI {roi.name!r} has no contours; skipped")
            continue
        role, _ = role_from_observation(roi.interpreted_type, roi.name)
        rx = prescription_from_name(roi.name) if role is Role.TARGET else None
        out.append(Structure(roi.name, role, rasterize(roi.contours, grid).mask,
                             prescription_gy=rx, number=roi.number, contours=roi.contours))
    return out


def _row(m: DoseMetrics, curve: DVH) -> dict[str, Any]:
    return {"volume_cc": m.volume_cc, "mean_gy": m.mean_gy, "max_gy": m.max_gy,
            "min_gy": m.min_gy, "d95_gy": m.d95_gy, "d2_gy": m.d2_gy, "d98_gy": m.d98_gy,
            "d0_03cc_gy": m.d0_03cc_gy, "v20gy_pct": m.v20gy_pct,
            "v20gy_cc": curve.volume_at_dose_cc(20.0),
            "coverage_fraction": m.coverage_fraction}


def _plot(curves: list[DVH], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    top = max((c.max_gy for c in curves if c.volume_cc > 0), default=1.0)
    for c in curves:
        if c.volume_cc > 0:
            ax.plot(c.dose_gy, c.cumulative_pct, label=c.name, linewidth=1.2)
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, 102)
    ax.set_xlabel("Dose (Gy)")
    ax.set_ylabel("Volume (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    except OSError as exc:
        raise UserError(f"{path}: cannot write the plot ({exc})") from exc
    finally:
        plt.close(fig)


def compute(dose_path: Path, rtstruct_path: Path) -> tuple[dict[str, Any], list[DVH]]:
    """The dvh report (plain JSON-able data) and the DVH curves."""
    dose_obj = _read(dose_path, "RTDOSE", RTDOSE_CLASS)
    ss_obj = _read(rtstruct_path, "RTSTRUCT", RTSTRUCT_CLASS)
    try:
        grid = read_rtdose(dose_obj.ds, str(dose_path))
        rois = read_rois(ss_obj.ds)
    except (DicomImportError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    warnings = list(grid.notes)
    if (grid.frame_of_reference_uid and dose_obj.frame_of_reference_uid
            and ss_obj.frame_of_reference_uid
            and dose_obj.frame_of_reference_uid != ss_obj.frame_of_reference_uid):
        warnings.append("the dose and the structure set are in different frames of reference")
    with_contours = [r for r in rois if r.contours]
    if not with_contours:
        raise UserError(f"{rtstruct_path}: no ROI has closed planar contours")
    geometry, notes = structure_grid(grid.volume.geometry, with_contours)
    warnings.extend(notes)
    structures = _structures(rois, geometry, warnings)
    dose = resample(grid.volume, geometry, order=1, fill=float("nan")).array
    curves, metrics = all_metrics(dose, prepare(structures, geometry), geometry)
    for c in curves:
        warnings.extend(c.warnings)
    report = {"dose": str(dose_path), "structures_file": str(rtstruct_path),
              "dose_units": grid.units,
              "structures": {m.name: _row(m, c) for m, c in zip(metrics, curves)},
              "warnings": warnings}
    return report, list(curves)


def run(args: argparse.Namespace) -> int:
    report, curves = compute(args.dose, args.structures)
    if args.plot:
        _plot(curves, args.plot)
    if args.json:
        print(json.dumps(_nan_to_none(report), indent=2))
        return 0
    keys = ("volume_cc", "mean_gy", "max_gy", "d95_gy", "d2_gy", "d98_gy", "v20gy_pct")
    print(f"{'structure':<24}" + "".join(f"{k:>11}" for k in keys))
    for name, row in report["structures"].items():
        print(f"{name[:24]:<24}" + "".join(f"{row[k]:>11.2f}" for k in keys))
    for w in report["warnings"]:
        print(f"warning: {w}")
    return 0


def _nan_to_none(obj: Any) -> Any:
    """JSON has no NaN: metrics of a ROI outside the dose grid become null."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj
