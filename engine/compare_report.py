"""The comparison report of two doses (:class:`engine.plan_compare.PlanComparison`) as a PNG or
a PDF, drawn with matplotlib's Agg canvas (no GUI backend).

* **Slices**: axial, coronal and sagittal through the isocentre (or a given point): dose A,
  dose B (one colour scale for both, Gy) and A − B (diverging map symmetric about 0, red where
  A gives more, colour bar in Gy), structure contours on all of them.
* **DVHs**: A solid, B dashed, one colour per structure (the contours' colours), a legend.
* **Scorecard**: each objective's value under A and B, A − B, and pass/fail of both; the totals.
* A header naming both doses, their plans' beam angles and where each dose came from.

A ``.pdf`` gets two pages (slices; DVHs and scorecard), any other suffix one tall PNG. Files
are written all-or-nothing (:mod:`engine.durable`) and drawing is styled as the single-dose
report (:mod:`engine.reports`: same CT window, contours and structure colours).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.case import Case
from engine.durable import replacing
from engine.plan_compare import ComparedDose, PlanComparison
from engine.reports import (
    draw_contours,
    draw_ct,
    report_structures,
    slice_index,
    slice_planes,
)

DIFF_CMAP = "RdBu_r"
DOSE_CMAP = "jet"
MIN_DIFF_LIMIT_GY = 0.1


def diff_limit_gy(comparison: PlanComparison) -> float:
    """Half-range (Gy) of the symmetric difference colour scale: the largest |A − B| in the
    body, at least :data:`MIN_DIFF_LIMIT_GY` (identical doses still get a readable scale)."""
    return max(comparison.max_abs_diff_gy, MIN_DIFF_LIMIT_GY)


def describe(side: ComparedDose) -> str:
    """One line about a side: its name, plan beams (gantry degrees) and source."""
    text = side.name
    if side.plan is not None and side.plan.beams:
        angles = ", ".join(f"{b.gantry_deg:g}" for b in side.plan.beams)
        text += f": {len(side.plan.beams)} beams at {angles} deg"
    if side.source:
        text += f" ({side.source})"
    return text


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _verdict(passed: bool | None) -> str:
    return "—" if passed is None else ("pass" if passed else "FAIL")


def scorecard_rows(comparison: PlanComparison) -> list[list[str]]:
    """The scorecard table as text: objective, A, B, A − B, A pass/fail, B pass/fail."""
    return [[r.label, _fmt(r.value_a), _fmt(r.value_b),
             "—" if r.delta is None else f"{r.delta:+.2f}",
             _verdict(r.passed_a), _verdict(r.passed_b)] for r in comparison.objectives]


def draw_slices(fig: Any, case: Case, comparison: PlanComparison,
                point_mm: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """Nine slice panels (rows: axial, coronal, sagittal; columns: A, B, A − B) on ``fig`` (a
    Figure or SubFigure). Returns the panels' images by name ("axial A", "axial A-B", ...)."""
    a, b = comparison.a.dose.array, comparison.b.dose.array
    diff = comparison.difference.array
    geometry = comparison.difference.geometry
    plan = comparison.a.plan or comparison.b.plan
    if point_mm is None and plan is not None and plan.beams:
        point_mm = plan.isocenter_mm
    vmax = max(float(a.max()), float(b.max()), 1e-6)
    limit = diff_limit_gy(comparison)
    structures, colours = report_structures(case)
    planes = slice_planes(geometry, slice_index(case, geometry, a, point_mm))
    grid = fig.add_gridspec(3, 3)
    images: dict[str, Any] = {}
    dose_axes, diff_axes = [], []
    for row, plane in enumerate(planes):
        orientation = plane.title.split()[0]
        for col, (key, volume) in enumerate((("A", a), ("B", b), ("A-B", diff))):
            ax = fig.add_subplot(grid[row, col])
            draw_ct(ax, case, plane)
            data = volume[plane.slicer]
            if key == "A-B":
                shown = np.ma.masked_where(np.abs(data) < 0.02 * limit, data)
                image = ax.imshow(shown, cmap=DIFF_CMAP, vmin=-limit, vmax=limit, alpha=0.8,
                                  extent=plane.extent, origin=plane.origin)
                diff_axes.append(ax)
            else:
                shown = np.ma.masked_less(data, 0.05 * vmax)
                image = ax.imshow(shown, cmap=DOSE_CMAP, vmin=0, vmax=vmax, alpha=0.45,
                                  extent=plane.extent, origin=plane.origin)
                dose_axes.append(ax)
            draw_contours(ax, plane, structures, colours)
            side = {"A": comparison.a.name, "B": comparison.b.name,
                    "A-B": f"{comparison.a.name} − {comparison.b.name}"}[key]
            ax.set_title(f"{side}: {plane.title}", fontsize=8)
            images[f"{orientation} {key}"] = image
    fig.colorbar(images["axial A"], ax=dose_axes, label="dose (Gy)", shrink=0.8,
                 location="left")
    fig.colorbar(images["axial A-B"], ax=diff_axes, label="A − B (Gy)", shrink=0.8)
    return images


def draw_dvh_and_scorecard(fig: Any, case: Case, comparison: PlanComparison) -> dict[str, Any]:
    """The DVH overlay (A solid, B dashed) above the scorecard table on ``fig``. Returns
    {"dvh": axes, "table": the matplotlib table or None}."""
    _, colours = report_structures(case)
    grid = fig.add_gridspec(2, 1, height_ratios=(1.0, 1.1))
    ax = fig.add_subplot(grid[0])
    vmax = 1e-6
    for side, style in ((comparison.a, "-"), (comparison.b, "--")):
        for name, curve in side.dvhs.items():
            if curve.volume_cc <= 0 or name not in colours:
                continue
            vmax = max(vmax, curve.max_gy)
            ax.plot(curve.dose_gy, curve.cumulative_pct, color=colours[name], ls=style,
                    lw=1.2, label=name if style == "-" else None)
    ax.plot([], [], color="k", ls="-", label=f"A: {comparison.a.name}")
    ax.plot([], [], color="k", ls="--", label=f"B: {comparison.b.name}")
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_xlim(0, vmax * 1.05)
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.set_title(f"DVHs: {comparison.a.name} solid, {comparison.b.name} dashed", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    table_ax = fig.add_subplot(grid[1])
    table_ax.axis("off")
    rows = scorecard_rows(comparison)
    table = None
    if rows:
        a_name, b_name = comparison.a.name, comparison.b.name
        columns = ["objective", f"A: {a_name}", f"B: {b_name}", "A − B", "A", "B"]
        table = table_ax.table(cellText=rows, colLabels=columns, loc="upper center",
                               colWidths=[0.38, 0.16, 0.16, 0.1, 0.1, 0.1])
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        for (r, c), cell in table.get_celld().items():
            if c == 0:
                cell.set_text_props(ha="left")
            if r > 0 and c >= 4:
                cell.set_facecolor({"pass": "#c8e6c9", "FAIL": "#ffcdd2"}.get(
                    cell.get_text().get_text(), "white"))
        ca, cb = comparison.a.scorecard, comparison.b.scorecard
        table_ax.set_title(
            f"Scorecard {comparison.template}\ntotal A {ca.total:.2f} ({ca.passed} passed, "
            f"{ca.failed} failed), B {cb.total:.2f} ({cb.passed} passed, {cb.failed} failed), "
            f"A − B {comparison.total_delta:+.2f}; values in the objective's units",
            fontsize=8)
    else:
        table_ax.text(0.5, 0.5, "no scorecard template applies to this patient",
                      ha="center", va="center")
    return {"dvh": ax, "table": table}


def _header(case: Case, comparison: PlanComparison) -> str:
    return (f"{case.name}: A = {describe(comparison.a)}\nB = {describe(comparison.b)}\n"
            f"A − B in the body: mean |A − B| {comparison.mean_abs_diff_gy:.2f} Gy, "
            f"max |A − B| {comparison.max_abs_diff_gy:.2f} Gy "
            f"(from {comparison.min_diff_gy:+.2f} to {comparison.max_diff_gy:+.2f} Gy)")


def comparison_figures(case: Case, comparison: PlanComparison,
                       point_mm: tuple[float, float, float] | None = None,
                       pages: bool = True) -> tuple[list[Any], dict[str, Any]]:
    """The report's figures (two pages, or one tall figure with ``pages=False``) and the drawn
    artists by name (slice images, "dvh" axes, "table")."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    header = _header(case, comparison)
    if pages:
        first = Figure(figsize=(11.7, 11), dpi=90, layout="constrained")
        second = Figure(figsize=(11.7, 11), dpi=90, layout="constrained")
        figures, slices_fig, table_fig = [first, second], first, second
        second.suptitle(header, fontsize=9)
    else:
        first = Figure(figsize=(11.7, 21), dpi=80, layout="constrained")
        slices_fig, table_fig = first.subfigures(2, 1, height_ratios=(1.05, 1.0))
        figures = [first]
    for fig in figures:
        FigureCanvasAgg(fig)
    first.suptitle(header, fontsize=9)
    artists = draw_slices(slices_fig, case, comparison, point_mm)
    artists.update(draw_dvh_and_scorecard(table_fig, case, comparison))
    return figures, artists


def write_comparison_report(case: Case, comparison: PlanComparison, path: str | Path,
                            point_mm: tuple[float, float, float] | None = None) -> Path:
    """Write the report to ``path``: a two-page PDF for ``.pdf``, else a PNG (see the module
    docstring); slices through ``point_mm`` (LPS mm) or the plan's isocentre."""
    path = Path(path)
    pdf = path.suffix.lower() == ".pdf"
    figures, _ = comparison_figures(case, comparison, point_mm, pages=pdf)
    with replacing(path) as tmp:
        if pdf:
            from matplotlib.backends.backend_pdf import PdfPages

            with PdfPages(tmp, metadata={"Title": f"{comparison.a.name} vs "
                                                  f"{comparison.b.name}"}) as doc:
                for fig in figures:
                    doc.savefig(fig)
        else:
            figures[0].savefig(tmp, format="png")
    return path
