"""What ``dosepilot predict`` writes next to a dose: DVH table, metrics document, report figure.

* :func:`write_dvh_csv`: the cumulative DVH of every structure, one row per (structure, dose
  bin): ``structure, dose_gy, volume_cc, volume_pct``.
* :func:`metrics_document`: a JSON-able dict of the per-structure metrics (Gy, cm³, %), the
  scorecard, the timing breakdown and the sampler settings; NaN becomes ``null``.
* :func:`write_report_figure`: a PNG with axial, coronal and sagittal dose slices through the
  isocentre (dose colour wash over the CT, structure contours) and the DVH plot. Rendered with
  matplotlib's Agg canvas directly, so no GUI backend is touched.

Files are written all-or-nothing (:mod:`engine.durable`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.case import Case, Geometry, Role, Structure
from engine.durable import replacing

if TYPE_CHECKING:
    from engine.runtime import DoseResult

DVH_COLUMNS = ("structure", "dose_gy", "volume_cc", "volume_pct")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python numbers, containers recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_dvh_csv(result: DoseResult, path: str | Path) -> Path:
    """The cumulative DVHs of ``result`` as a CSV table (see the module docstring)."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(DVH_COLUMNS)
        for name, curve in result.dvhs.items():
            pct = curve.cumulative_pct
            for d, cc, p in zip(curve.dose_gy, curve.cumulative_cc, pct):
                writer.writerow((name, f"{d:.4f}", f"{cc:.6g}", f"{p:.6g}"))
    return path


def read_dvh_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Structure -> array of (dose_gy, volume_cc, volume_pct) rows, from :func:`write_dvh_csv`."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for r in reader:
            rows.setdefault(r["structure"], []).append(
                (float(r["dose_gy"]), float(r["volume_cc"]), float(r["volume_pct"])))
    return {k: np.array(v) for k, v in rows.items()}


def metrics_document(case: Case, result: DoseResult, model: str | None = None) -> dict[str, Any]:
    """Per-structure metrics, scorecard, dose summary and timings of one prediction."""
    roles = {s.name: s.role.value for s in case.structures}
    structures = {}
    for name, m in result.metrics.items():
        entry = dataclasses.asdict(m)
        del entry["name"]
        structures[name] = {"role": roles.get(name), **entry}
    dose = result.dose.array
    doc: dict[str, Any] = {
        "case": case.name,
        "kind": result.kind,
        "steps": result.steps,
        "seeds": list(result.seeds),
        "model": model,
        "dose": {"max_gy": float(dose.max()), "mean_gy": float(dose.mean()),
                 "shape": list(result.dose.geometry.shape),
                 "spacing_mm": list(result.dose.geometry.spacing),
                 "origin_mm": list(result.dose.geometry.origin)},
        "uncertainty": None,
        "structures": structures,
        "scorecard": None,
        "timings_s": dict(result.timings_s),
        "warnings": list(case.warnings),
    }
    if result.std is not None:
        std = result.std.array
        doc["uncertainty"] = {"max_std_gy": float(std.max()), "mean_std_gy": float(std.mean())}
    if result.scorecard is not None:
        card = result.scorecard
        doc["scorecard"] = {"template": card.template, "total": card.total,
                            "passed": card.passed, "failed": card.failed}
    return _clean(doc)


def slice_index(case: Case, geometry: Geometry, dose: np.ndarray | None = None,
                point_mm: tuple[float, float, float] | None = None) -> np.ndarray:
    """The voxel (iz, iy, ix) the report's slices go through: ``point_mm`` (LPS mm) when
    given, else the plan's isocentre, else the maximum of ``dose``, else the grid's centre;
    clipped into the grid."""
    g = geometry
    if point_mm is None and case.plan is not None and case.plan.beams:
        point_mm = case.plan.isocenter_mm
    if point_mm is not None:
        idx = np.rint(g.lps_to_index(np.asarray(point_mm, dtype=float))).astype(int)
    elif dose is not None:
        idx = np.array(np.unravel_index(int(np.argmax(dose)), g.shape))
    else:
        idx = np.asarray(g.shape) // 2
    return np.clip(idx, 0, np.array(g.shape) - 1)


@dataclass(frozen=True)
class SlicePlane:
    """One report slice: title, the ``[z, y, x]`` index that cuts it, its extent in mm
    ([left, right, bottom, top]) and matplotlib's image origin."""

    title: str
    slicer: tuple[Any, Any, Any]
    extent: tuple[float, float, float, float]
    origin: str


def slice_planes(geometry: Geometry, index: np.ndarray) -> tuple[SlicePlane, ...]:
    """Axial, coronal and sagittal planes through voxel ``index`` (iz, iy, ix)."""
    iz, iy, ix = (int(v) for v in index)
    dz, dy, dx = geometry.spacing
    nz, ny, nx = geometry.shape
    whole = slice(None)
    return (SlicePlane(f"axial (slice {iz})", (iz, whole, whole), (0, nx * dx, ny * dy, 0),
                       "upper"),
            SlicePlane(f"coronal (row {iy})", (whole, iy, whole), (0, nx * dx, 0, nz * dz),
                       "lower"),
            SlicePlane(f"sagittal (column {ix})", (whole, whole, ix), (0, ny * dy, 0, nz * dz),
                       "lower"))


def report_structures(case: Case, max_structures: int = 12
                      ) -> tuple[list[Structure], dict[str, str]]:
    """The structures a report draws (non-empty, not the body, at most ``max_structures``)
    and their matplotlib colours ("C0".."C9"), the same in contours and DVH curves."""
    structures = [s for s in case.structures if s.role is not Role.EXTERNAL
                  and s.mask.any()][:max_structures]
    return structures, {s.name: f"C{i % 10}" for i, s in enumerate(structures)}


def draw_ct(ax: Any, case: Case, plane: SlicePlane) -> None:
    """The CT slice in grey (window -400..600 HU), no ticks, the plane's title."""
    ax.imshow(case.ct.array[plane.slicer], cmap="gray", vmin=-400, vmax=600,
              extent=plane.extent, origin=plane.origin)
    ax.set_title(plane.title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_contours(ax: Any, plane: SlicePlane, structures: list[Structure],
                  colours: dict[str, str]) -> None:
    """The structures' outlines on the plane, in their report colours."""
    for s in structures:
        m = s.mask[plane.slicer]
        if m.any() and m.min() != m.max():
            ax.contour(m.astype(np.float32), levels=[0.5], colors=colours[s.name],
                       linewidths=0.8, extent=plane.extent, origin=plane.origin)


def write_report_figure(case: Case, result: DoseResult, path: str | Path,
                        max_structures: int = 12) -> Path:
    """Axial, coronal and sagittal dose slices with contours, and the DVH plot, as a PNG (or
    a PDF when ``path`` ends in ``.pdf``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    dose = result.dose.array
    vmax = max(float(dose.max()), 1e-6)
    structures, colours = report_structures(case, max_structures)
    planes = slice_planes(result.dose.geometry, slice_index(case, result.dose.geometry, dose))
    fig = Figure(figsize=(13, 8.5), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3, height_ratios=(1.0, 0.9))
    slice_axes = [fig.add_subplot(grid[0, i]) for i in range(3)]
    image = None
    for ax, plane in zip(slice_axes, planes):
        draw_ct(ax, case, plane)
        d = np.ma.masked_less(dose[plane.slicer], 0.05 * vmax)
        image = ax.imshow(d, cmap="jet", alpha=0.45, vmin=0, vmax=vmax, extent=plane.extent,
                          origin=plane.origin)
        draw_contours(ax, plane, structures, colours)
    if image is not None:
        fig.colorbar(image, ax=slice_axes, label="dose (Gy)", shrink=0.9)
    ax = fig.add_subplot(grid[1, :])
    for name, curve in result.dvhs.items():
        if curve.volume_cc <= 0:
            continue
        ax.plot(curve.dose_gy, curve.cumulative_pct, color=colours.get(name, "k"),
                lw=1.2 if name in colours else 0.8, label=name)
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_xlim(0, vmax * 1.05)
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1 + len(
        result.dvhs) // 16)
    seeds = f", {len(result.seeds)} seeds" if len(result.seeds) > 1 else ""
    fig.suptitle(f"{case.name}: predicted dose ({result.kind}, {result.steps} steps{seeds}), "
                 f"max {float(dose.max()):.1f} Gy")
    with replacing(path) as tmp:
        fig.savefig(tmp, format="pdf" if path.suffix.lower() == ".pdf" else "png")
    return path
