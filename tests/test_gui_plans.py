"""Several plans of one patient in the real window: the plan bar duplicates, renames, switches
and deletes; each plan keeps its beams and dose, and export writes the chosen plan."""

from __future__ import annotations

import os

import pydicom
import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
]

from gui_helpers import PhysicsDoseEngine, make_case  # noqa: E402
from PySide6 import QtCore  # noqa: E402

from planner_gui.main_window import MainWindow  # noqa: E402

LEFT = QtCore.Qt.MouseButton.LeftButton


def test_plans_in_the_window(qtbot, aloop, gui_settings, tmp_path):
    window = MainWindow(PhysicsDoseEngine(), "", settings=gui_settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    window.open_case(make_case())
    controller, bar, table = window.controller, window.plans_bar, window.beams_panel.table
    qtbot.waitUntil(lambda: controller.predictions_done == 1, timeout=10_000)
    beams = table.rowCount()
    assert bar.combo.count() == 1 and not bar.delete_button.isEnabled()

    qtbot.mouseClick(bar.duplicate_button, LEFT)
    assert bar.combo.count() == 2 and bar.combo.currentIndex() == 1
    assert bar.rename_current("9 fields") and bar.combo.currentText() == "9 fields"
    messages = []
    bar.message.connect(messages.append)
    assert not bar.rename_current(bar.combo.itemText(0))
    assert "exists already" in messages[-1]
    qtbot.mouseClick(window.beams_panel.add_button, LEFT)
    qtbot.waitUntil(lambda: controller.predictions_done == 2 and not controller.busy,
                    timeout=10_000)
    nine = window.session.result
    assert table.rowCount() == beams + 1

    bar.combo.setCurrentIndex(0)  # back to the first plan: its beams and its own dose
    assert table.rowCount() == beams and window.session.result is not nine
    assert window.session.result_plan == window.session.plan
    qtbot.wait(300)
    assert controller.predictions_done == 2, "switching back must not predict again"

    bar.combo.setCurrentIndex(1)
    with qtbot.waitSignal(window.exported, timeout=30_000) as blocker:
        window.export_to(tmp_path / "out")
    plan = pydicom.dcmread(blocker.args[0].rtplan)
    assert plan.RTPlanLabel == "9 fields" and len(plan.BeamSequence) == beams + 1

    assert bar.delete_current() and bar.combo.count() == 1 and table.rowCount() == beams
    assert not bar.delete_current() and "at least one plan" in messages[-1]
    window.close()
