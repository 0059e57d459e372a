"""Comparing two doses of one patient (engine.plan_compare) and its report
(engine.compare_report), on the phantom with synthetic doses whose differences are known."""

from __future__ import annotations

import re

import numpy as np
import pytest

from engine.case import Role, Volume
from engine.compare_report import (
    comparison_figures,
    diff_limit_gy,
    scorecard_rows,
    write_comparison_report,
)
from engine.metrics.scorecard import builtin_template
from engine.phantom import PhantomSpec, make_phantom
from engine.plan_compare import compare_doses

SCALE = 1.1


@pytest.fixture(scope="module")
def case():
    return make_phantom(PhantomSpec(shape=(24, 56, 64), spacing=(4.0, 4.0, 4.0),
                                    with_dose=True, n_beams=5))


@pytest.fixture(scope="module")
def scaled(case):
    """A = 1.1 x the reference dose, B = the reference dose."""
    a = Volume((case.dose.array * SCALE).astype(np.float32), case.geometry)
    return compare_doses(case, a, case.dose, "hot", "reference", plan_a=case.plan,
                         source_a="synthetic")


def test_difference_is_a_minus_b_in_gy(case, scaled):
    b = case.dose.array
    np.testing.assert_allclose(scaled.difference.array, (SCALE - 1.0) * b, atol=1e-4)
    body = next(s.mask for s in case.structures if s.role is Role.EXTERNAL)
    assert scaled.max_diff_gy == pytest.approx((SCALE - 1.0) * b[body].max(), rel=1e-4)
    assert scaled.min_diff_gy >= -1e-6  # A is hotter everywhere: no negative A - B
    assert scaled.mean_abs_diff_gy == pytest.approx((SCALE - 1.0) * b[body].mean(), rel=1e-3)
    swapped = compare_doses(case, case.dose, scaled.a.dose, "reference", "hot")
    assert swapped.min_diff_gy == pytest.approx(-scaled.max_diff_gy, rel=1e-6)


def test_dvhs_and_structure_deltas_follow_the_doses(case, scaled):
    ptv = case.structure("PTV70").mask
    a, b = scaled.a.dose.array, case.dose.array
    assert scaled.a.dvhs["PTV70"].mean_gy == pytest.approx(float(a[ptv].mean()), rel=0.02)
    assert scaled.b.dvhs["PTV70"].mean_gy == pytest.approx(float(b[ptv].mean()), rel=0.02)
    rows = {s.name: s for s in scaled.structures}
    assert "BODY" in rows and "PTV70" in rows
    ptv_row = rows["PTV70"]
    assert ptv_row.mean_delta_gy == pytest.approx((SCALE - 1.0) * ptv_row.mean_b_gy, rel=1e-3)
    assert ptv_row.mean_delta_gy > 5.0  # A is the hotter one: A - B is positive
    assert ptv_row.max_a_gy == pytest.approx(SCALE * ptv_row.max_b_gy, rel=1e-3)
    assert scaled.a.metrics["PTV70"].d95_gy > scaled.b.metrics["PTV70"].d95_gy


def test_scorecard_rows_pair_both_doses_with_a_minus_b(scaled):
    assert scaled.template == builtin_template("head_neck").name
    assert len(scaled.objectives) == len(builtin_template("head_neck").objectives)
    by_label = {r.label: r for r in scaled.objectives}
    d2 = by_label["PTV_High D2 <= 107 % Rx"]
    assert d2.unit == "% Rx"
    assert d2.value_a == pytest.approx(SCALE * d2.value_b, rel=0.01)
    assert d2.delta == pytest.approx(d2.value_a - d2.value_b) and d2.delta > 5.0
    assert d2.passed_a is False and d2.passed_b is True  # 10% hotter breaks the hot-spot goal
    parotid = by_label["Parotid_R Dmean <= 26 Gy"]
    assert parotid.unit == "Gy" and parotid.delta == pytest.approx(
        (SCALE - 1.0) * parotid.value_b, rel=1e-3)
    missing = by_label["OpticChiasm D0.03cc <= 54 Gy"]
    assert missing.value_a is None and missing.delta is None and missing.passed_a is None
    assert scaled.a.scorecard.failed == scaled.b.scorecard.failed + 1
    assert scaled.total_delta == pytest.approx(
        scaled.a.scorecard.total - scaled.b.scorecard.total) and scaled.total_delta < 0
    summary = scaled.summary()
    assert summary["difference"] == "A - B"
    assert summary["a"]["plan"]["gantry_deg"] == [b.gantry_deg for b in scaled.a.plan.beams]
    row = next(o for o in summary["objectives"] if o["objective"] == d2.label)
    assert row["delta"] == pytest.approx(d2.delta) and row["passed_a"] is False
    assert summary["structures"]["PTV70"]["mean_delta_gy"] > 5.0


def test_identical_doses_compare_equal(case):
    same = compare_doses(case, case.dose, case.dose, "x", "y")
    assert not same.difference.array.any()
    assert same.max_abs_diff_gy == 0.0 and same.total_delta == 0.0
    assert all(r.delta == 0.0 for r in same.objectives if r.delta is not None)
    assert diff_limit_gy(same) > 0  # a readable colour scale all the same


def test_a_dose_off_the_ct_grid_is_refused(case):
    from engine.case import Geometry

    other = Volume(np.zeros((4, 4, 4), np.float32), Geometry((4, 4, 4), (0.0, 0.0, 0.0),
                                                      (1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="not on the patient's CT grid"):
        compare_doses(case, other, case.dose)


def test_report_panels_show_a_b_and_their_difference(case, scaled):
    figures, artists = comparison_figures(case, scaled)
    assert len(figures) == 2
    iso = np.rint(case.geometry.lps_to_index(np.asarray(case.plan.isocenter_mm))).astype(int)
    shown = np.ma.filled(artists["axial A-B"].get_array(), 0.0)
    expected = scaled.difference.array[iso[0]]
    big = np.abs(expected) >= 0.02 * diff_limit_gy(scaled)
    np.testing.assert_allclose(shown[big], expected[big], atol=1e-5)
    assert shown.max() > 5.0 and artists["axial A-B"].get_clim() == (
        -diff_limit_gy(scaled), diff_limit_gy(scaled))
    assert artists["axial A"].get_clim() == artists["axial B"].get_clim()
    lines = artists["dvh"].get_lines()
    styles = {(line.get_color(), line.get_linestyle()) for line in lines}
    ptv_colour = next(line.get_color() for line in lines if line.get_label() == "PTV70")
    assert {(ptv_colour, "-"), (ptv_colour, "--")} <= styles
    cells = {cell.get_text().get_text() for cell in artists["table"].get_celld().values()}
    for row in scorecard_rows(scaled):
        assert row[0] in cells and row[3] in cells
    assert "FAIL" in cells and "+10.00" in cells


def test_identical_doses_draw_no_difference(case):
    same = compare_doses(case, case.dose, case.dose, "x", "y")
    _, artists = comparison_figures(case, same, pages=False)
    assert artists["axial A-B"].get_array().mask.all()  # nothing drawn over the CT


def test_report_files_are_valid_png_and_two_page_pdf(case, scaled, tmp_path):
    png = write_comparison_report(case, scaled, tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = write_comparison_report(case, scaled, tmp_path / "report.pdf",
                                  point_mm=case.plan.isocenter_mm)
    data = pdf.read_bytes()
    assert data[:5] == b"%PDF-" and data.rstrip().endswith(b"%%EOF")
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.pdf", "report.png"]
