"""The window driven by the real dose engine (``engine.runtime.DoseEngine`` with a small
randomly initialised DiffKT3D bundle): loading a checkpoint as the model, previews while a beam
is dragged, a full prediction on release, and a UI that keeps ticking during torch inference."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
]

from gui_helpers import make_case  # noqa: E402
from PySide6 import QtCore  # noqa: E402

from planner_gui.main_window import MainWindow  # noqa: E402
from planner_gui.views.slice_view import OVERLAY_MODES  # noqa: E402

LEFT = QtCore.Qt.MouseButton.LeftButton


def test_real_engine_previews_while_dragging_and_predicts_on_release(
        qtbot, aloop, gui_settings, tiny_dose_bundle):
    window = MainWindow(None, settings=gui_settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    window.controller.steps = 4
    window.use_checkpoint(str(tiny_dose_bundle))
    qtbot.waitUntil(lambda: window.controller.available or bool(window.last_error),
                    timeout=60_000)
    assert window.controller.available, window.last_error
    assert window.engine_label.text() == "Dose engine ready"

    controller = window.controller
    window.open_case(make_case())
    qtbot.waitUntil(lambda: controller.predictions_done == 1 and not controller.busy,
                    timeout=120_000)
    # from here on the timer watches the interactive part: previews while dragging and the
    # full prediction on release (the case's condition latents are cached by now)
    ticks: list[tuple[float, bool]] = []
    timer = QtCore.QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append((time.perf_counter(), bool(controller.busy))))
    timer.start()
    first = window.session.result
    assert first.kind == "predict" and first.dose.geometry == window.session.case.geometry

    view = window.axial
    iso = np.asarray(window.session.plan.isocenter_mm[:2])
    radius = float(np.linalg.norm(view.beam_rays[0].handle_xy - iso))
    viewport = view.plot.viewport()
    qtbot.mousePress(viewport, LEFT, pos=view.view_to_widget(*view.beam_rays[0].handle_xy))
    for angle in (20, 40, 60):
        a = math.radians(angle)
        qtbot.mouseMove(viewport, view.view_to_widget(
            *(iso + radius * np.array([math.sin(a), -math.cos(a)]))))
        qtbot.waitUntil(lambda: not controller.busy, timeout=60_000)
    assert controller.previews_done >= 1 and window.session.result.kind == "preview"
    preview = window.session.result
    assert preview.metrics["Parotid_L"].mean_gy != first.metrics["Parotid_L"].mean_gy
    curve = window.dvh_panel.curves["Parotid_L"].getData()[1]
    assert np.array_equal(curve, preview.dvhs["Parotid_L"].cumulative_pct)
    window.seeds_spin.setValue(2)  # the full prediction gives a mean and an uncertainty map
    bar = window.progress_bar
    shown: list[tuple[bool, int, int]] = []
    controller.progress.connect(
        lambda done, total: shown.append((bar.isVisible(), bar.value(), bar.maximum())))
    with qtbot.waitSignal(window.session.result_changed, timeout=120_000,
                          check_params_cb=lambda r: r is not None and r.kind == "predict"):
        qtbot.mouseRelease(viewport, LEFT, pos=view.view_to_widget(
            *(iso + radius * np.array([math.sin(math.radians(60)),
                                       -math.cos(math.radians(60))]))))
    assert window.session.plan.beams[0].gantry_deg == pytest.approx(60.0, abs=3.0)
    assert controller.predictions_done == 2
    assert shown and all(visible for visible, _, _ in shown)
    assert [v for _, v, _ in shown] == sorted(v for _, v, _ in shown)
    assert shown[-1][1:] == (controller.steps, controller.steps)
    assert not bar.isVisible(), "the bar goes away with the finished prediction"
    timer.stop()
    t = np.array([tick[0] for tick in ticks])
    busy = np.array([tick[1] for tick in ticks])
    during = busy[:-1] & busy[1:]
    gaps = np.diff(t)[during]
    assert during.sum() > 50, "torch inference should have taken a while"
    assert gaps.max() <= 0.150, f"UI stalled for {gaps.max() * 1000:.0f} ms during inference"
    final = window.session.result
    assert final.std is not None and final.std.array.max() > 0
    window.overlay_combo.setCurrentText(OVERLAY_MODES[3])
    assert np.array_equal(view._overlay, view.grid.orient(final.std.array))
    window.close()
