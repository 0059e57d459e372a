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
from pathlib import Path
from typing import Any

import numpy as np

from engine.case import Case, Role
from engine.durable import replacing
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


def _iso_index(case: Case, result: DoseResult) -> np.ndarray:
    """The isocentre's voxel on the CT grid (clipped into it), else the dose maximum."""
    g = result.dose.geometry
    if case.plan is not None and case.plan.beams:
        idx = np.rint(g.lps_to_index(np.asarray(case.plan.isocenter_mm))).astype(int)
    else:
        idx = np.array(np.unravel_index(int(np.argmax(result.dose.array)), g.shape))
    return np.clip(idx, 0, np.array(g.shape) - 1)


def write_report_figure(case: Case, result: DoseResult, path: str | Path,
                        max_structures: int = 12) -> Path:
    """Axial, coronal and sagittal dose slices with contours, and the DVH plot, as a PNG (or
    a PDF when ``path`` ends in ``.pdf``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    g = result.dose.geometry
    dose = result.dose.array
    ct = case.ct.array
    vmax = max(float(dose.max()), 1e-6)
    structures = [s for s in case.structures if s.role is not Role.EXTERNAL
                  and s.mask.any()][:max_structures]
    colours = {s.name: f"C{i % 10}" for i, s in enumerate(structures)}
    iz, iy, ix = _iso_index(case, result)
    dz, dy, dx = g.spacing
    nz, ny, nx = g.shape
    views = (  # (title, slicer, extent [left, right, bottom, top] in mm, origin)
        (f"axial (slice {iz})", (iz, slice(None), slice(None)), (0, nx * dx, ny * dy, 0)),
        (f"coronal (row {iy})", (slice(None), iy, slice(None)), (0, nx * dx, 0, nz * dz)),
        (f"sagittal (column {ix})", (slice(None), slice(None), ix), (0, ny * dy, 0, nz * dz)),
    )
    fig = Figure(figsize=(13, 8.5), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3, height_ratios=(1.0, 0.9))
    slice_axes = [fig.add_subplot(grid[0, i]) for i in range(3)]
    image = None
    for ax, (title, sl, extent) in zip(slice_axes, views):
        origin = "upper" if title.startswith("axial") else "lower"
        ax.imshow(ct[sl], cmap="gray", vmin=-400, vmax=600, extent=extent, origin=origin)
        d = np.ma.masked_less(dose[sl], 0.05 * vmax)
        image = ax.imshow(d, cmap="jet", alpha=0.45, vmin=0, vmax=vmax, extent=extent,
                          origin=origin)
        for s in structures:
            m = s.mask[sl]
            if m.any() and m.min() != m.max():
                ax.contour(m.astype(np.float32), levels=[0.5], colors=colours[s.name],
                           linewidths=0.8, extent=extent, origin=origin)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
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
