"""The first five minutes with the shipped model (issue 21): what `dosepilot demo` shows.

The real window opens the demo patient before its model has loaded, as `dosepilot demo` does;
the body then fills most of the axial view, and dragging a beam's handle visibly moves the AI
dose's colour wash: the preview while dragging, the 10-step prediction on release.

Run under a display: ``make test`` uses ``xvfb-run`` with ``QT_QPA_PLATFORM=xcb``. Takes one to
a few minutes on a 2-core CPU (two 10-step predictions and a few previews).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
]

from gui_helpers import body_width_fraction, changed_pixels, image_pixels  # noqa: E402
from PySide6 import QtCore  # noqa: E402

from planner_gui.dose_display import OVERLAY_MODES  # noqa: E402
from planner_gui.engine_api import load_dose_engine  # noqa: E402
from planner_gui.main_window import DRAG_HINT, MainWindow  # noqa: E402

LEFT = QtCore.Qt.MouseButton.LeftButton
AI = "default model"
# a moved dose wash changes thousands of pixels of the ~150,000 in the axial view; the same
# dose drawn again changes none
MOVED_PIXELS = 1000


def test_dragging_a_beam_moves_the_ai_dose_of_the_shipped_model(qtbot, aloop, gui_settings):
    window = MainWindow(None, settings=gui_settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    with qtbot.waitSignal(window.case_loaded, timeout=60_000):
        window.open_demo()
    view, controller = window.axial, window.controller
    fraction = body_width_fraction(view)
    assert fraction >= 0.5, f"the body spans {fraction:.2f} of the axial view's width"
    assert view.dose_label.text() == "Reference (RTDOSE)"  # no model yet: what there is

    engine, message = load_dose_engine()  # the shipped model, loaded after the patient
    assert engine is not None, message
    window.set_engine(engine)
    assert view.hint_label.isVisible() and view.hint_label.text() == DRAG_HINT
    qtbot.waitUntil(lambda: controller.predictions_done == 1 and not controller.busy,
                    timeout=600_000)
    assert window.overlay_combo.currentText() == OVERLAY_MODES[0]
    assert [v.dose_label.text() for v in window.slice_views] == [f"AI 10-step · {AI}"] * 3
    before = image_pixels(view)

    iso = np.asarray(window.session.plan.isocenter_mm[:2])
    assert window.session.plan.beams[0].gantry_deg == 0.0
    radius = 0.6 * float(np.linalg.norm(view.beam_rays[0].handle_xy - iso))
    viewport = view.plot.viewport()

    def at(angle_deg: float) -> QtCore.QPoint:  # gantry angle -> widget pixel (HFS)
        a = math.radians(angle_deg)
        return view.view_to_widget(*(iso + radius * np.array([math.sin(a), -math.cos(a)])))

    qtbot.mousePress(viewport, LEFT, pos=view.view_to_widget(*view.beam_rays[0].handle_xy))
    for angle in (10, 20, 30, 40, 51):
        assert viewport.rect().contains(at(angle))
        qtbot.mouseMove(viewport, at(angle))
        qtbot.wait(50)
    assert not view.hint_label.isVisible(), "the hint goes with the first drag"
    qtbot.waitUntil(lambda: not controller.busy and controller.previews_done >= 1,
                    timeout=300_000)
    assert window.session.editing and window.session.result.kind == "preview"
    assert view.dose_label.text() == f"AI preview · {AI}"
    preview = image_pixels(view)
    assert changed_pixels(before, preview) > MOVED_PIXELS, "the preview should show"

    with qtbot.waitSignal(window.session.result_changed, timeout=600_000,
                          check_params_cb=lambda r: r is not None and r.kind == "predict"):
        qtbot.mouseRelease(viewport, LEFT, pos=at(51))
    assert window.session.plan.beams[0].gantry_deg == pytest.approx(51.0, abs=2.0)
    assert view.dose_label.text() == f"AI 10-step · {AI}"
    assert np.array_equal(view._overlay, view.grid.orient(window.session.result.dose.array))
    after = image_pixels(view)
    assert changed_pixels(before, after) > MOVED_PIXELS, "the 10-step dose should have moved"
    window.close()
