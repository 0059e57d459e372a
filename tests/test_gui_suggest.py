"""'Suggest beam angles' in the real window, searching with a real beam-dependent dose
(tests/gui_helpers.PhysicsDoseEngine): progress, the time budget, the new plans in the plan
bar, forbidden sectors, input errors, Cancel, closing the window mid-search and "Verify with
physics" on a suggestion.

Run under a display: ``make test`` uses ``xvfb-run`` with ``QT_QPA_PLATFORM=xcb``.
"""

from __future__ import annotations

import os
import time
import types

import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
]

from gui_helpers import PhysicsDose, PhysicsDoseEngine, make_case  # noqa: E402
from PySide6 import QtCore  # noqa: E402

from engine.beam_search import SearchCancelled, allowed, in_sector  # noqa: E402
from engine.case import Volume  # noqa: E402
from planner_gui.main_window import MainWindow  # noqa: E402

LEFT = QtCore.Qt.MouseButton.LeftButton
BUDGET_S = 3
#: beyond the budget: the preview in flight when it runs out (~0.2 s here) and a loaded CI box
SLACK_S = 4.0


@pytest.fixture
def window(qtbot, aloop, gui_settings):
    win = MainWindow(PhysicsDoseEngine(), "", settings=gui_settings)
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    win.open_case(make_case())
    qtbot.waitUntil(lambda: win.controller.predictions_done == 1 and not win.controller.busy,
                    timeout=20_000)
    yield win
    win.close()


def open_dialog(window, beams=3, budget=BUDGET_S, keep=2, forbid=""):
    assert window.suggest_action in window.plan_menu.actions()
    assert window.suggest_action.isEnabled()
    window.suggest_action.trigger()
    dialog = window.suggest_dialog
    assert dialog is not None and dialog.isVisible() and not dialog.isModal()
    dialog.beams_spin.setValue(beams)
    dialog.budget_spin.setValue(budget)
    dialog.keep_spin.setValue(keep)
    dialog.forbid_edit.setText(forbid)
    return dialog


def test_a_search_shows_progress_and_adds_the_best_arrangements_as_plans(window, qtbot):
    session, bar = window.session, window.plans_bar
    first = session.plan
    dialog = open_dialog(window)
    assert dialog.objective_label.text() == dialog.objective().describe()
    dialog.oar_spin.setValue(0.2)  # the objective is editable and shown live
    assert "0.2 x (Parotid_L mean" in dialog.objective_label.text()
    progress = []
    dialog.run.progress.connect(lambda n, best: progress.append((n, best)))

    t0 = time.perf_counter()
    with qtbot.waitSignal(dialog.plans_added, timeout=(BUDGET_S + 30) * 1000) as added:
        qtbot.mouseClick(dialog.start_button, LEFT)
        assert not dialog.start_button.isEnabled() and dialog.cancel_button.isEnabled()
        qtbot.waitUntil(lambda: dialog.evaluated >= 3, timeout=10_000)
        assert "arrangements evaluated" in dialog.status_label.text()
        assert f"of {BUDGET_S} s" in dialog.progress_bar.text()
    wall = time.perf_counter() - t0
    result = dialog.last_result
    assert result.seconds <= BUDGET_S + SLACK_S and wall <= BUDGET_S + SLACK_S + 2.0
    assert [n for n, _ in progress] == list(range(1, result.evaluated + 1))
    assert result.evaluated > 5 and progress[-1][1] == min(b for _, b in progress)
    assert result.best[0].value <= result.equispaced.value

    names = added.args[0]
    assert names == ["Suggested 1 (3 fields)", "Suggested 2 (3 fields)", "Equispaced 3"]
    assert [bar.combo.itemText(i) for i in range(bar.combo.count())] == (
        [first.name, *names])
    assert session.active_plan == 0 and session.plan == first  # nothing switched
    for entry, candidate in zip(session.plans[1:], (*result.best, result.equispaced)):
        assert tuple(b.gantry_deg for b in entry.plan.beams) == candidate.gantry_deg
        assert {b.isocenter_mm for b in entry.plan.beams} == {first.isocenter_mm}
        assert not entry.undo and entry.result is None
    table = dialog.table
    assert table.rowCount() == 3 and table.item(0, 0).text() == names[0]
    assert table.item(0, 1).text() == " ".join(f"{a:g}" for a in result.best[0].gantry_deg)
    assert float(table.item(0, 2).text()) == pytest.approx(result.best[0].value, abs=1e-3)
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    assert "scorecard" in headers and "target D95 deficit (Gy)" in headers
    assert not dialog.cancel_button.isEnabled() and dialog.start_button.isEnabled()

    bar.combo.setCurrentIndex(1)  # a suggestion is a plan like any other: predicted on switch
    qtbot.waitUntil(lambda: window.controller.predictions_done == 2, timeout=20_000)
    assert window.beams_panel.table.rowCount() == 3


def test_forbidden_sectors_are_validated_and_kept_out_of(window, qtbot):
    session = window.session
    dialog = open_dialog(window, forbid="300")
    assert dialog.forbid_error.isVisible() and "two angles 'A-B'" in dialog.forbid_error.text()
    assert dialog.start() is None
    qtbot.mouseClick(dialog.start_button, LEFT)
    assert not dialog.run.running and dialog.evaluated == 0
    assert "fix the forbidden sectors" in dialog.error_label.text()
    assert len(session.plans) == 1

    dialog.forbid_edit.setText("30-150, 200-220")
    assert not dialog.forbid_error.isVisible()
    with qtbot.waitSignal(dialog.plans_added, timeout=(BUDGET_S + 30) * 1000):
        qtbot.mouseClick(dialog.start_button, LEFT)
    assert not dialog.error_label.isVisible()
    assert dialog.table.item(2, 0).text() == "Equispaced 3"  # 0, 120, 240: 120 is forbidden
    assert "enters a forbidden sector" in dialog.table.item(2, 0).toolTip()
    sectors = [(30.0, 150.0), (200.0, 220.0)]
    suggested = [e.plan for e in session.plans if e.plan.name.startswith("Suggested")]
    assert len(suggested) == 2
    for plan in suggested:
        angles = [b.gantry_deg for b in plan.beams]
        assert allowed(angles, sectors)
        assert not any(in_sector(a, s) for a in angles for s in sectors)


def test_an_impossible_request_and_a_missing_engine_are_shown_in_the_dialog(window, qtbot):
    dialog = open_dialog(window, beams=5, forbid="0-359")
    with qtbot.waitSignal(dialog.idle, timeout=20_000):
        dialog.start()
    assert "No 5-beam arrangement keeps out of the forbidden sectors" in (
        dialog.error_label.text())
    assert len(window.session.plans) == 1 and dialog.start_button.isEnabled()
    window.set_engine(None, "no engine for this test")
    assert dialog.start() is None and "No dose engine" in dialog.error_label.text()


def test_cancel_and_closing_the_window_mid_search_add_nothing(window, qtbot):
    session = window.session
    names = session.plan_names()
    dialog = open_dialog(window, budget=60)
    with qtbot.waitSignal(dialog.idle, timeout=10_000):
        qtbot.mouseClick(dialog.start_button, LEFT)
        qtbot.waitUntil(lambda: dialog.evaluated >= 2, timeout=10_000)
        qtbot.mouseClick(dialog.cancel_button, LEFT)
    assert "Cancelled" in dialog.status_label.text() and dialog.start_button.isEnabled()
    assert not dialog.run.running and session.plan_names() == names
    assert dialog.table.rowCount() == 0

    future = dialog.start()
    qtbot.waitUntil(lambda: dialog.evaluated >= 1, timeout=10_000)
    t0 = time.perf_counter()
    window.close()  # cancels the search: it stops before its next preview
    qtbot.waitUntil(future.done, timeout=5_000)
    assert time.perf_counter() - t0 < 5.0 and isinstance(future.exception(), SearchCancelled)
    assert session.plan_names() == names


def test_verify_with_physics_on_a_suggestion_makes_it_active_and_the_reference(
        window, qtbot, monkeypatch):
    """The window's own verification runs on the selected suggestion. pyRadPlan takes
    minutes, so the physics here is the helper's beam model (tests/test_gui_physics.py runs
    the real one); what is checked is the wiring: which plan is computed, and that its dose
    becomes the reference."""
    import engine.physics.dose_calc as dose_calc

    computed = []

    def physics(case, plan, cancel=None):
        computed.append(plan)
        return types.SimpleNamespace(dose=Volume(PhysicsDose().dose(case, plan), case.geometry),
                                     info={"engine": "test beams"}, primary_target="PTV70")

    monkeypatch.setattr(dose_calc, "compute_physics_dose", physics)
    session = window.session
    dialog = open_dialog(window, keep=1)
    assert dialog.verify_selected() is None  # nothing selected yet
    with qtbot.waitSignal(dialog.plans_added, timeout=(BUDGET_S + 30) * 1000):
        dialog.start()
    assert not dialog.verify_button.isEnabled()
    dialog.table.selectRow(0)
    assert dialog.verify_button.isEnabled()
    with qtbot.waitSignal(window.physics_ready, timeout=30_000):
        qtbot.mouseClick(dialog.verify_button, LEFT)
    suggestion = session.plans[1].plan
    assert session.active_plan == 1 and session.plan == suggestion
    assert computed == [suggestion]
    assert session.reference_source == "Physics (test beams)"
    assert window.plans_bar.combo.currentText() == "Suggested 1 (3 fields)"

    session.rename_plan(1, "Mine")  # the table follows renames; a deleted plan is not verified
    assert dialog.table.item(0, 0).text() == "Mine"
    session.delete_plan(1)
    dialog.table.selectRow(0)
    assert not dialog.verify_button.isEnabled() and dialog.verify_selected() is None
    qtbot.waitUntil(lambda: not window.controller.busy, timeout=20_000)  # the plan switched to
