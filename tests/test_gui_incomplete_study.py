"""The real window opening an incomplete study (a CT series with most files missing): the planner
sees the study warning in a dialog and the status bar, every ROI of the structure set is listed
(those not on the CT greyed out, without a check box), and a complete study opens without one.

Run under a display: ``make test`` uses ``xvfb-run`` with ``QT_QPA_PLATFORM=xcb``.
"""

from __future__ import annotations

import os
import shutil

import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
]

from gui_helpers import PhysicsDoseEngine  # noqa: E402
from PySide6 import QtCore, QtWidgets  # noqa: E402

from planner_gui.main_window import MainWindow  # noqa: E402


def _window(qtbot, settings) -> MainWindow:
    window = MainWindow(PhysicsDoseEngine(), settings=settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    return window


def _dialogs(window: MainWindow) -> list[QtWidgets.QMessageBox]:
    return [box for box in window.findChildren(QtWidgets.QMessageBox) if box.isVisible()]


def _wait_for_reference_dvhs(qtbot, window: MainWindow) -> None:
    """Let the reference-DVH job finish before the window goes (it runs on a worker thread)."""
    task = window.dvh_panel.reference_task
    if task is not None:
        qtbot.waitUntil(task.done, timeout=30_000)


def test_an_incomplete_series_warns_and_lists_every_structure(qtbot, aloop, gui_settings,
                                                              phantom_dicom, tmp_path):
    folder = tmp_path / "incomplete"
    shutil.copytree(phantom_dicom.rtplan_path.parent, folder)
    ct = sorted((folder / "CT").glob("*.dcm"))
    for path in ct[1:]:
        path.unlink()
    window = _window(qtbot, gui_settings)
    with qtbot.waitSignal(window.warning_shown, timeout=30_000) as blocker:
        window.open_path(folder)
    message = blocker.args[0]
    assert message.startswith(f"CT series incomplete: {len(ct) - 1} of {len(ct)} images "
                              "referenced by the structure set are missing.")
    case = window.session.case
    assert case is not None and case.study_warnings == (message,)
    (box,) = _dialogs(window)
    assert box.text() == message and box.icon() == QtWidgets.QMessageBox.Icon.Warning
    assert "CT series incomplete" in window.statusBar().currentMessage()
    panel = window.structures_panel
    names = [panel.item(row).text() for row in range(panel.count())]
    assert panel.count() == len(phantom_dicom.case.structures)
    off = [panel.item(row) for row in range(panel.count())
           if "not on the CT" in panel.item(row).text()]
    assert len(off) == len(case.structures_not_on_ct) > 0, names
    for item in off:
        assert not item.flags() & QtCore.Qt.ItemFlag.ItemIsEnabled
        assert not item.flags() & QtCore.Qt.ItemFlag.ItemIsUserCheckable
        assert "its contours lie outside the CT" in item.toolTip()
    # the planner keeps working on what there is: the prediction of the one slice arrives
    qtbot.waitUntil(lambda: window.controller.predictions_done >= 1, timeout=20_000)
    _wait_for_reference_dvhs(qtbot, window)
    box.close()
    window.close()


def test_a_complete_study_opens_without_a_warning(qtbot, aloop, gui_settings, phantom_dicom):
    window = _window(qtbot, gui_settings)
    with qtbot.assertNotEmitted(window.warning_shown):
        with qtbot.waitSignal(window.case_loaded, timeout=30_000):
            window.open_path(phantom_dicom.rtplan_path.parent)
    assert _dialogs(window) == []
    assert window.structures_panel.count() == len(phantom_dicom.case.structures)
    _wait_for_reference_dvhs(qtbot, window)
    window.close()
