"""200 rapid beam drags in the real main window: only the newest result is ever shown, the final
one is the full prediction of the final plan, and nothing raises.

The drags are real mouse input on the axial view played by ``benchmarks.bench_rapid_drags``'s
driver, one event per timer tick of the running event loop (the benchmark measures the
event-loop stall of the same run with the shipped model). Exceptions in Qt handlers fail the
test through pytest-qt's capture; asyncio errors and engine failures are collected here.
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

from gui_helpers import PhysicsDoseEngine, make_case  # noqa: E402

from benchmarks.bench_rapid_drags import (  # noqa: E402
    DragStorm,
    RecordingEngine,
    ShownResults,
    drag_angles,
)
from planner_gui.main_window import MainWindow  # noqa: E402

DRAGS = 200


def _turn(from_deg, to_deg) -> np.ndarray:
    """Signed smallest rotation in degrees, in [-180, 180)."""
    return (np.asarray(to_deg) - np.asarray(from_deg) + 180.0) % 360.0 - 180.0


def test_rapid_drags_show_only_the_newest_result(qtbot, aloop, gui_settings):
    case = make_case()
    physics = PhysicsDoseEngine()
    record = ShownResults()
    window = MainWindow(RecordingEngine(physics, record), settings=gui_settings)
    qtbot.addWidget(window)
    window.resize(900, 600)  # software rendering: fewer pixels, a faster test
    window.show()
    qtbot.waitExposed(window)
    session, controller = window.session, window.controller
    session.result_changed.connect(record.on_result(session))
    failures: list[str] = []
    controller.failed.connect(failures.append)
    loop_errors: list[dict] = []
    aloop.set_exception_handler(lambda loop, context: loop_errors.append(context))
    commits: list[float] = []  # gantry of beam 1 at each committed edit
    transient: list[float] = []  # ... at each plan shown while dragging (each asks for a preview)
    session.plan_changed.connect(
        lambda plan, final: (commits if final else transient).append(plan.beams[0].gantry_deg))
    window.open_case(case)
    qtbot.waitUntil(lambda: controller.predictions_done == 1 and not controller.busy,
                    timeout=20_000)
    commits.clear()
    jobs_before = controller.runner.started

    angles = drag_angles([b.gantry_deg for b in session.plan.beams[1:]], DRAGS)
    storm = DragStorm(window.axial, 0, angles, moves=1, interval_ms=2)
    storm.start()
    qtbot.waitUntil(lambda: storm.finished, timeout=120_000)
    qtbot.waitUntil(lambda: not controller.busy and session.result.kind == "predict",
                    timeout=30_000)
    aloop.set_exception_handler(None)

    # every drag was a real drag: one committed edit each, ending at its target angle
    assert len(commits) == DRAGS
    assert np.abs(_turn(angles, commits)).max() <= 2.0
    assert len(transient) >= DRAGS, "the move of every drag asked for a preview"
    requests = len(transient) + len(commits)
    assert controller.runner.started - jobs_before < requests, "superseded requests are dropped"
    # only the newest result is ever shown, and the last one is the final plan's prediction
    assert record.shown and record.stale == 0
    final, final_plan, _ = record.shown[-1]
    assert final is session.result and final.kind == "predict"
    assert final_plan == session.plan
    assert abs(_turn(angles[-1], session.plan.beams[0].gantry_deg)) <= 2.0
    expected = physics.physics.dose(case, session.plan)
    assert np.array_equal(final.dose.array, expected)
    assert np.array_equal(window.axial._overlay, window.axial.grid.orient(expected))
    for name, curve in window.dvh_panel.curves.items():
        assert np.array_equal(curve.getData()[1], final.dvhs[name].cumulative_pct)
    assert not failures and not loop_errors
