"""Comparing plans in the real window: Plan > Compare plans opens a window with A, B and A - B
panes on one slice, the DVHs of both (A solid, B dashed), both scorecards with A - B, the
reference dose as a choice, a missing dose computed off the UI thread, and a PDF report."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
]

from gui_helpers import PhysicsDoseEngine, make_case  # noqa: E402
from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402

from planner_gui.main_window import MainWindow  # noqa: E402
from planner_gui.views.display import OrthoGrid  # noqa: E402

LEFT = QtCore.Qt.MouseButton.LeftButton


def shown_slice(grid: OrthoGrid, volume: np.ndarray, orientation: str, cursor) -> np.ndarray:
    return grid.slice(grid.orient(volume), orientation, grid.nearest(orientation, cursor))


def wheel(pane, steps: int) -> None:
    """A real wheel event over the middle of a pane's image."""
    viewport = pane.plot.viewport()
    pos = QtCore.QPointF(viewport.width() / 2, viewport.height() / 2)
    event = QtGui.QWheelEvent(pos, viewport.mapToGlobal(pos), QtCore.QPoint(0, 0),
                              QtCore.QPoint(0, 120 * steps), QtCore.Qt.MouseButton.NoButton,
                              QtCore.Qt.KeyboardModifier.NoModifier,
                              QtCore.Qt.ScrollPhase.NoScrollPhase, False)
    QtWidgets.QApplication.sendEvent(viewport, event)


def test_compare_two_plans_and_the_reference(qtbot, aloop, gui_settings, tmp_path):
    engine = PhysicsDoseEngine()
    window = MainWindow(engine, "", settings=gui_settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    case = make_case()
    window.open_case(case)
    session, controller = window.session, window.controller
    qtbot.waitUntil(lambda: controller.predictions_done == 1, timeout=10_000)
    qtbot.mouseClick(window.plans_bar.duplicate_button, LEFT)
    session.set_gantry(0, (session.plan.beams[0].gantry_deg + 60.0) % 360.0)
    qtbot.waitUntil(lambda: controller.predictions_done == 2 and not controller.busy,
                    timeout=10_000)
    first, second = session.plans

    window.compare_action.trigger()
    compare = window.compare_window
    qtbot.waitExposed(compare)
    assert window.compare_action.shortcut().toString() == "Ctrl+K"
    assert compare.combo_a.currentText() == second.plan.name  # the active plan
    assert compare.combo_b.currentText() == first.plan.name
    assert compare.combo_b.findText(session.reference_source) >= 0
    qtbot.waitUntil(lambda: compare.comparison is not None, timeout=10_000)

    # the three panes: A, B and A - B of the shown slice
    grid = OrthoGrid.from_geometry(case.geometry)
    dose_a, dose_b = second.result.dose.array, first.result.dose.array
    expected = shown_slice(grid, dose_a - dose_b, "axial", session.cursor_mm)
    assert np.abs(expected).max() > 1.0  # the turned beam really changes the dose
    np.testing.assert_allclose(compare.panes["A-B"].shown_overlay(), expected, atol=1e-4)
    np.testing.assert_allclose(compare.panes["A"].shown_overlay(),
                               shown_slice(grid, dose_a, "axial", session.cursor_mm))
    np.testing.assert_allclose(compare.panes["B"].shown_overlay(),
                               shown_slice(grid, dose_b, "axial", session.cursor_mm))
    assert compare.panes["A"].color_bar.levels() == compare.panes["B"].color_bar.levels()
    low, high = compare.panes["A-B"].color_bar.levels()
    assert low == pytest.approx(-high) and high >= np.abs(expected).max() - 1e-4
    assert compare.panes["A"].ct_item.levels.tolist() == compare.panes["A-B"].ct_item.levels \
        .tolist()

    # the DVH overlay: per structure a solid A curve and a dashed B curve of one colour
    for name in ("PTV70", "SpinalCord", "Parotid_R"):
        solid = compare.dvh_curves[(name, "A")].opts["pen"]
        dashed = compare.dvh_curves[(name, "B")].opts["pen"]
        assert solid.style() == QtCore.Qt.PenStyle.SolidLine
        assert dashed.style() == QtCore.Qt.PenStyle.DashLine
        assert solid.color() == dashed.color()
        x, y = compare.dvh_curves[(name, "B")].getData()
        np.testing.assert_allclose(y, first.result.dvhs[name].cumulative_pct)

    # both scorecards with A - B per objective
    table = compare.table
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    assert headers == ["Objective", "A", "B", "A − B", "A result", "B result"]
    assert table.rowCount() == len(second.result.scorecard.results)
    for row, (ra, rb) in enumerate(zip(second.result.scorecard.results,
                                       first.result.scorecard.results)):
        assert table.item(row, 0).text() == ra.objective.label
        if ra.value is not None:
            assert table.item(row, 1).text() == f"{ra.value:.2f}"
            assert table.item(row, 2).text() == f"{rb.value:.2f}"
            assert float(table.item(row, 3).text()) == pytest.approx(ra.value - rb.value,
                                                                     abs=0.006)
            assert table.item(row, 4).text() == ("PASS" if ra.passed else "FAIL")

    # one slice for all: a wheel in the B pane scrolls all three and the main views
    index, main_index = compare.slice_index, window.axial.slice_index
    wheel(compare.panes["B"], -1)
    qtbot.waitUntil(lambda: compare.slice_index == index - 1, timeout=2_000)
    assert window.axial.slice_index == main_index - 1
    np.testing.assert_allclose(compare.panes["A-B"].shown_overlay(), shown_slice(
        grid, dose_a - dose_b, "axial", session.cursor_mm), atol=1e-4)
    compare.set_orientation("coronal")
    np.testing.assert_allclose(compare.panes["A"].shown_overlay(), shown_slice(
        grid, dose_a, "coronal", session.cursor_mm))
    compare.panes["A"].view_box.setRange(QtCore.QRectF(-20, -10, 40, 30), padding=0)
    qtbot.wait(50)
    (ax, ay) = compare.panes["A"].view_box.viewRange()
    for key in ("B", "A-B"):  # pan and zoom are linked (panes keep their aspect ratio)
        (x, y) = compare.panes[key].view_box.viewRange()
        np.testing.assert_allclose(x, ax, atol=0.5)  # panes differ by a pixel or two
        assert sum(y) / 2 == pytest.approx(sum(ay) / 2, abs=0.5)
    compare.set_orientation("axial")

    # the reference dose as B
    compare.pick(second.plan.name, session.reference_source)
    qtbot.waitUntil(lambda: compare.comparison.b.name == session.reference_source,
                    timeout=10_000)
    np.testing.assert_allclose(compare.panes["A-B"].shown_overlay(), shown_slice(
        grid, dose_a - case.dose.array, "axial", session.cursor_mm), atol=1e-4)

    # a plan without a dose: named in the window, computed off the UI thread on request
    controller.set_engine(None)
    qtbot.mouseClick(window.plans_bar.duplicate_button, LEFT)
    session.set_gantry(1, (session.plan.beams[1].gantry_deg + 90.0) % 360.0)
    third = session.plans[2]
    assert third.result_plan != third.plan
    compare.pick(third.plan.name, first.plan.name)
    assert f"Plan {third.plan.name} has no dose yet" in compare.message.text()
    assert compare.comparison is None and not compare.compute_button.isEnabled()
    controller.set_engine(engine)
    compare.refresh()
    assert compare.compute_button.isEnabled()
    calls = engine.physics.calls
    qtbot.mouseClick(compare.compute_button, LEFT)
    qtbot.waitUntil(lambda: compare.comparison is not None
                    and compare.comparison.a.name == third.plan.name, timeout=10_000)
    assert engine.physics.calls == calls + 1 and compare.message.text() == ""
    computed = compare.computed[third.plan].dose.array
    np.testing.assert_allclose(compare.panes["A-B"].shown_overlay(), shown_slice(
        grid, computed - dose_b, "axial", session.cursor_mm), atol=1e-4)

    # the report
    with qtbot.waitSignal(compare.report_written, timeout=30_000) as blocker:
        assert compare.save_report(tmp_path / "comparison.pdf") is not None
    data = blocker.args[0].read_bytes()
    assert data[:5] == b"%PDF-" and b"/Type /Page" in data
    window.close()
    assert not compare.isVisible()
