"""'Verify with physics' in the real window: the physics dose becomes the reference.

Run under a display: ``make test`` uses ``xvfb-run`` with ``QT_QPA_PLATFORM=xcb``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
]

from gui_helpers import make_case  # noqa: E402

from engine.physics.dose_calc import PHYSICS_PYTHON_ENV  # noqa: E402
from planner_gui.engine_api import NO_ENGINE  # noqa: E402
from planner_gui.main_window import MainWindow  # noqa: E402
from planner_gui.views.slice_view import OVERLAY_MODES  # noqa: E402


@pytest.fixture
def window(qtbot, aloop, gui_settings):
    win = MainWindow(None, f"{NO_ENGINE}: not needed here", settings=gui_settings)
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    yield win
    win.close()


def test_a_missing_physics_environment_is_a_clear_error(window, qtbot, monkeypatch, tmp_path):
    monkeypatch.setenv(PHYSICS_PYTHON_ENV, str(tmp_path / "no-such-python"))
    window.open_case(make_case(with_dose=True))
    before = window.session.case.dose
    with qtbot.waitSignal(window.error_shown, timeout=10_000) as shown:
        window.verify_with_physics()
    assert "make physics-env" in shown.args[0]
    assert window.session.case.dose is before  # the reference is untouched


def test_the_physics_dose_becomes_the_reference(window, qtbot, physics_env):
    case = make_case(with_dose=False, n_beams=5)
    window.open_case(case)
    plan = window.session.plan.with_gantry(0, window.session.plan.beams[0].gantry_deg + 20)
    window.session.set_plan(plan)
    with qtbot.waitSignal(window.physics_ready, timeout=900_000) as ready:
        window.verify_with_physics()
    physics = ready.args[0]
    reference = window.session.case.dose
    assert reference is physics.dose and reference.geometry == case.geometry
    assert window.session.plan == plan  # the edited plan and its undo history are kept
    assert window.session.can_undo
    ptv = case.structure("PTV70").mask
    assert np.percentile(reference.array[ptv], 5) == pytest.approx(70.0, rel=0.02)
    assert window.overlay_combo.currentText() == OVERLAY_MODES[1]
    assert all(view.dose_label.text().startswith("Physics (") for view in window.slice_views)
    qtbot.waitUntil(lambda: len(window.dvh_panel.reference_curves) == len(case.structures),
                    timeout=30_000)
