"""Closing the window while a prediction runs, and closing it again, shuts everything down
once (engine worker, training panel, 3D render window, GC hold) and never crashes."""

from __future__ import annotations

import os

import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
]

from gui_helpers import PhysicsDoseEngine, make_case  # noqa: E402

from planner_gui import gui_gc  # noqa: E402
from planner_gui.main_window import MainWindow  # noqa: E402


def test_closing_twice_during_a_prediction(qtbot, aloop, gui_settings):
    engine = PhysicsDoseEngine(delay_s=0.2)  # each beam takes a while: the prediction runs
    window = MainWindow(engine, "", settings=gui_settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    window.open_case(make_case())
    qtbot.waitUntil(lambda: window.controller.busy == "predict", timeout=10_000)
    assert window.close()
    assert window.close()  # a second close (e.g. the session ending) is harmless
    qtbot.wait(1500)  # the cancelled prediction's thread finishes; nothing may touch the views
    assert not gui_gc.held()
