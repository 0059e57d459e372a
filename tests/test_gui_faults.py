"""The real window under faults: a broken model bundle (at start and when switching models) and
an export onto a full disk. The window says what is wrong, names the file, and keeps working:
patients open, beams move, doses follow."""

from __future__ import annotations

import os
import shutil

import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
]

from fault_harness import SmallDevice  # noqa: E402
from gui_helpers import PhysicsDoseEngine, make_case  # noqa: E402

from planner_gui.engine_api import NO_ENGINE, load_dose_engine  # noqa: E402
from planner_gui.main_window import MainWindow  # noqa: E402


@pytest.fixture
def truncated_bundle(tiny_dose_bundle, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_dose_bundle, path)
    data = (path / "dit.safetensors").read_bytes()
    (path / "dit.safetensors").write_bytes(data[:len(data) // 2])   # an interrupted copy
    return path


def _window(qtbot, settings, engine=None, message=""):
    window = MainWindow(engine, message, settings=settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    return window


def test_a_broken_model_at_start_still_opens_patients(qtbot, aloop, gui_settings,
                                                      truncated_bundle, phantom_dicom):
    window = _window(qtbot, gui_settings)
    engine, message = load_dose_engine(str(truncated_bundle))   # what app.run does, then:
    window.set_engine(engine, message)
    assert window.engine_label.text() == NO_ENGINE
    assert "dit.safetensors" in window.engine_label.toolTip()
    assert str(truncated_bundle) in window.engine_label.toolTip()
    with qtbot.waitSignal(window.case_loaded, timeout=30_000) as loaded:
        window.open_path(phantom_dicom.rtplan_path.parent)
    case = loaded.args[0]
    assert window.session.case is case and window.structures_panel.count() == len(
        case.structures)
    assert not window.predict_action.isEnabled()
    window.close()


def test_switching_to_a_broken_model_keeps_the_working_one(qtbot, aloop, gui_settings,
                                                           truncated_bundle):
    engine = PhysicsDoseEngine()
    window = _window(qtbot, gui_settings, engine)
    window.open_case(make_case())
    qtbot.waitUntil(lambda: window.controller.predictions_done == 1, timeout=20_000)
    with qtbot.waitSignal(window.error_shown, timeout=30_000) as shown:
        window.use_checkpoint(str(truncated_bundle))
    assert "dit.safetensors" in shown.args[0] and str(truncated_bundle) in shown.args[0]
    assert window.controller.engine is engine
    window.session.set_gantry(0, 40.0)
    qtbot.waitUntil(lambda: window.controller.predictions_done == 2
                    and not window.controller.busy, timeout=20_000)
    assert window.session.plan.beams[0].gantry_deg == pytest.approx(40.0)
    window.close()


@pytest.mark.skipif(bool(SmallDevice.unavailable()),
                    reason=SmallDevice.unavailable() or "root")
def test_export_onto_a_full_disk_is_a_clear_error_and_the_window_carries_on(
        qtbot, aloop, gui_settings, tmp_path):
    window = _window(qtbot, gui_settings, PhysicsDoseEngine())
    window.open_case(make_case())
    qtbot.waitUntil(lambda: window.controller.predictions_done == 1, timeout=20_000)
    with SmallDevice(tmp_path / "usb") as device:
        with qtbot.waitSignal(window.exported, timeout=30_000) as first:
            window.export_to(device.path)
        before = sorted(p.name for p in first.args[0].folder.iterdir())
        device.fill()
        with qtbot.waitSignal(window.error_shown, timeout=30_000) as shown:
            window.export_to(device.path)
        assert "no space left on the device" in shown.args[0]
        assert str(device.path) in shown.args[0] and "Traceback" not in shown.args[0]
        assert [p.name for p in device.path.iterdir() if p != device.filler] == [
            first.args[0].folder.name]
        assert sorted(p.name for p in first.args[0].folder.iterdir()) == before
    window.session.set_gantry(0, 50.0)
    qtbot.waitUntil(lambda: window.controller.predictions_done == 2
                    and not window.controller.busy, timeout=20_000)
    window.close()
