"""The real main window under Xvfb (xcb): views, beam dragging with previews and predictions,
undo/redo, table edits, visibility, compare modes, a responsive event loop.

Run under a display: ``make test`` uses ``xvfb-run`` with ``QT_QPA_PLATFORM=xcb``.
"""

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

from gui_helpers import (  # noqa: E402
    PhysicsDoseEngine,
    body_width_fraction,
    changed_pixels,
    grab_rgb,
    image_pixels,
    make_case,
)
from PySide6 import QtCore, QtGui  # noqa: E402

from planner_gui.beam_geometry import gantry_from_axial_direction  # noqa: E402
from planner_gui.engine_api import NO_ENGINE  # noqa: E402
from planner_gui.main_window import MainWindow  # noqa: E402
from planner_gui.views.slice_view import OVERLAY_MODES  # noqa: E402

LEFT = QtCore.Qt.MouseButton.LeftButton


@pytest.fixture(scope="module")
def case():
    return make_case()


def make_window(qtbot, settings, engine=None, message=""):
    window = MainWindow(engine, message, settings=settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    return window


@pytest.fixture
def win(qtbot, aloop, gui_settings, case):
    engine = PhysicsDoseEngine()
    window = make_window(qtbot, gui_settings, engine)
    window.open_case(case)
    qtbot.waitUntil(lambda: window.controller.predictions_done == 1, timeout=10_000)
    yield window
    window.close()


def count_color(rgb: np.ndarray, color, tol=12) -> int:
    return int((np.abs(rgb.astype(int) - np.asarray(color)).max(axis=2) <= tol).sum())


def test_views_show_ct_and_contours(qtbot, aloop, gui_settings, case):
    window = make_window(qtbot, gui_settings, None, f"{NO_ENGINE}: not installed")
    window.open_case(case)
    qtbot.wait(100)
    axial = grab_rgb(window.axial.plot)
    grey = (np.ptp(axial, axis=2) < 4) & (axial[..., 0] > 60) & (axial[..., 0] < 200)
    assert grey.sum() > 2000, "the soft-tissue CT should be visible as grey"
    for name, color in (("PTV70", (255, 0, 0)), ("Parotid_L", (0, 120, 255)),
                        ("BODY", (0, 180, 80))):
        assert count_color(axial, color) > 20, f"{name} outline missing"
    for view in (window.coronal, window.sagittal):
        assert count_color(grab_rgb(view.plot), (255, 0, 0)) > 20
    # no pyqtgraph context menu (axis ranges, export) on the slices: it is never built
    assert all(view.view_box.menu is None for view in window.slice_views)
    shot = window.view3d.plotter.screenshot(return_img=True)
    assert shot.std() > 5, "3D view is blank"
    # hiding a structure removes its outline everywhere
    window.structures_panel.item_for("Parotid_L").setCheckState(QtCore.Qt.CheckState.Unchecked)
    qtbot.wait(50)
    assert count_color(grab_rgb(window.axial.plot), (0, 120, 255), tol=6) == 0
    assert not window.view3d.structure_actors["Parotid_L"].GetVisibility()
    # no engine: the window says so, and nothing is predicted
    assert window.engine_label.text() == NO_ENGINE
    assert "not installed" in window.engine_label.toolTip()
    assert not window.predict_action.isEnabled() and window.session.result is None
    window.close()


def test_scrolling_and_crosshair_are_linked(win, qtbot):
    before = win.axial.slice_index
    win.axial.scroll(2)
    assert win.axial.slice_index == before + 2
    z = win.axial.grid.z[before + 2]
    assert win.session.cursor_mm[2] == pytest.approx(z)
    # clicking in the axial view moves the coronal and sagittal slices to that point
    target = (30.0, 20.0)
    pos = win.axial.view_to_widget(*target)
    qtbot.mouseClick(win.axial.plot.viewport(), LEFT, pos=pos)
    assert win.session.cursor_mm[0] == pytest.approx(target[0], abs=2.0)
    assert win.session.cursor_mm[1] == pytest.approx(target[1], abs=2.0)
    assert abs(win.sagittal.grid.x[win.sagittal.slice_index] - target[0]) <= 2.0
    assert abs(win.coronal.grid.y[win.coronal.slice_index] - target[1]) <= 2.0


def test_dragging_a_beam_previews_then_predicts_on_release(win, qtbot):
    engine = win.controller.engine
    dvh_before = win.dvh_panel.curves["Parotid_L"].getData()[1].copy()
    view = win.axial
    iso = np.asarray(win.session.plan.isocenter_mm[:2])
    handle = view.beam_rays[0].handle_xy
    radius = float(np.linalg.norm(handle - iso))
    viewport = view.plot.viewport()
    qtbot.mousePress(viewport, LEFT, pos=view.view_to_widget(*handle))
    previews_seen = []
    for angle in range(10, 91, 10):          # sweep B1 from 0 to 90 degrees (source to the left)
        a = math.radians(angle)
        point = iso + radius * np.array([math.sin(a), -math.cos(a)])
        qtbot.mouseMove(viewport, view.view_to_widget(*point))
        qtbot.wait(60)
        previews_seen.append(win.controller.previews_done)
    assert win.session.editing
    assert win.session.plan.beams[0].gantry_deg == pytest.approx(90.0, abs=3.0)
    qtbot.waitUntil(lambda: win.controller.previews_done >= 1, timeout=5000)
    assert win.session.result.kind == "preview"
    dvh_preview = win.dvh_panel.curves["Parotid_L"].getData()[1]
    assert not np.array_equal(dvh_before, dvh_preview), "the DVH should follow the preview"
    with qtbot.waitSignal(win.session.result_changed, timeout=10_000,
                          check_params_cb=lambda r: r is not None and r.kind == "predict"):
        qtbot.mouseRelease(viewport, LEFT, pos=view.view_to_widget(
            *(iso + radius * np.array([1.0, 0.0]))))
    assert not win.session.editing
    assert engine.kinds.count("predict") == 2
    assert win.beams_panel.table.item(0, 1).text() == f"{win.session.plan.beams[0].gantry_deg:.1f}"
    # one drag = one undo step
    win.undo_action.trigger()
    assert win.session.plan.beams[0].gantry_deg == 0.0
    win.redo_action.trigger()
    assert win.session.plan.beams[0].gantry_deg == pytest.approx(90.0, abs=3.0)


def test_event_loop_keeps_ticking_during_inference(qtbot, aloop, gui_settings):
    """A 10 ms timer keeps firing while the engine computes on its worker thread: the worst
    gap between ticks taken while predictions are running stays <= 150 ms."""
    big = make_case(shape=(48, 96, 112), spacing=(2.0, 2.0, 2.0), with_dose=False)
    window = make_window(qtbot, gui_settings, PhysicsDoseEngine())
    controller = window.controller
    window.open_case(big)
    qtbot.waitUntil(lambda: controller.predictions_done == 1 and not controller.busy,
                    timeout=30_000)
    ticks: list[tuple[float, bool]] = []
    timer = QtCore.QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append((time.perf_counter(), bool(controller.busy))))
    timer.start()
    for _ in range(3):                        # three predictions back to back (~0.5 s each)
        controller.request_prediction()
        qtbot.waitUntil(lambda: not controller.busy, timeout=30_000)
    timer.stop()
    t = np.array([tick[0] for tick in ticks])
    busy = np.array([tick[1] for tick in ticks])
    during = busy[:-1] & busy[1:]
    gaps = np.diff(t)[during]
    assert controller.predictions_done == 4
    assert during.sum() > 30, "inference should have taken a while for this test to mean something"
    assert gaps.max() <= 0.150, f"UI stalled for {gaps.max() * 1000:.0f} ms during inference"
    window.close()


def test_table_edits_and_dial_are_undoable(win, qtbot):
    table = win.beams_panel.table
    table.item(1, 1).setText("100")
    assert win.session.plan.beams[1].gantry_deg == 100.0
    table.item(1, 1).setText("abc")
    assert table.item(1, 1).text() == "100.0", "bad input is reverted"
    win.session.select_beam(2)
    dial = win.beams_panel.dial
    dial.setSliderDown(True)
    win.session.begin_edit()
    dial.setValue(2000)
    assert win.session.plan.beams[2].gantry_deg == 200.0 and win.session.editing
    dial.setSliderDown(False)
    win.session.commit_edit()
    n = len(win.session.plan.beams)
    qtbot.mouseClick(win.beams_panel.add_button, LEFT)
    assert table.rowCount() == n + 1
    assert len(win.view3d.beam_meshes) == n + 1 and len(win.axial.beam_rays) == n + 1
    win.session.undo()
    win.session.undo()
    assert table.rowCount() == n and win.session.plan.beams[2].gantry_deg == 144.0
    win.session.undo()
    assert win.session.plan.beams[1].gantry_deg == 72.0


def test_dragging_a_beam_handle_in_3d(win, qtbot):
    view = win.view3d
    widget = view.handles[3]
    iso = np.asarray(win.session.plan.isocenter_mm)
    widget.InvokeEvent("StartInteractionEvent")
    for angle in (250.0, 260.0, 270.0):
        a = math.radians(angle)
        center = iso + 200.0 * np.array([math.sin(a), -math.cos(a), 0.1])
        widget.SetCenter(*center)
        widget.InvokeEvent("InteractionEvent")
    assert win.session.editing and win.session.plan.beams[3].gantry_deg == pytest.approx(270.0)
    with qtbot.waitSignal(win.session.result_changed, timeout=10_000,
                          check_params_cb=lambda r: r is not None and r.kind == "predict"):
        widget.InvokeEvent("EndInteractionEvent")
    assert not win.session.editing
    src = np.asarray(view.beam_meshes[3].points[0])
    assert src[0] < iso[0] and abs(src[1] - iso[1]) < 1.0, "ray now comes from the right"
    win.session.undo()
    assert win.session.plan.beams[3].gantry_deg == 216.0


def test_compare_modes_show_difference_and_reference(win, qtbot):
    window = win
    window.overlay_combo.setCurrentText(OVERLAY_MODES[2])
    axial = window.axial
    low, high = axial._overlay_levels
    assert low < 0 < high and low == -high
    diff = window.session.result.dose.array - window.session.case.dose.array
    assert np.allclose(axial.grid.orient(diff), axial._overlay)
    window.overlay_combo.setCurrentText(OVERLAY_MODES[1])
    assert np.allclose(axial._overlay, axial.grid.orient(window.session.case.dose.array))
    window.overlay_combo.setCurrentText(OVERLAY_MODES[3])
    assert axial._overlay is None, "a one-seed result has no uncertainty"
    qtbot.waitUntil(lambda: len(window.dvh_panel.reference_curves)
                    == len(window.session.case.structures), timeout=10_000)
    window.window_combo.setCurrentText("Bone")
    assert axial.ct_item.levels is not None and tuple(axial.ct_item.levels) == (-500.0, 1300.0)


def test_opening_a_bad_folder_shows_a_clear_error(win, qtbot, tmp_path):
    with qtbot.waitSignal(win.error_shown, timeout=5000) as blocker:
        win.open_path(tmp_path / "missing")
    assert "does not exist" in blocker.args[0]


def test_scorecard_and_metrics_follow_the_result(win, qtbot):
    panel = win.metrics_panel
    card = win.session.result.scorecard
    assert panel.scorecard.rowCount() == len(card.results) > 0
    colors = {panel.scorecard.item(r, 4).text(): panel.scorecard.item(r, 4).background().color()
              for r in range(panel.scorecard.rowCount())}
    from planner_gui.metrics_panel import FAIL_COLOR, PASS_COLOR
    for verdict, color in colors.items():
        if verdict == "PASS":
            assert color == PASS_COLOR
        elif verdict == "FAIL":
            assert color == FAIL_COLOR
    assert f"{card.total:.2f}" in panel.total_label.text()
    rows = [panel.metrics.verticalHeaderItem(r).text() for r in range(panel.metrics.rowCount())]
    assert "PTV70" in rows
    headers = [panel.metrics.horizontalHeaderItem(c).text()
               for c in range(panel.metrics.columnCount())]
    col = headers.index("Dmean (Gy)")
    shown = float(panel.metrics.item(rows.index("PTV70"), col).text())
    assert shown == pytest.approx(win.session.result.metrics["PTV70"].mean_gy, abs=0.01)


def test_opening_a_dicom_folder_and_exporting_round_trips(qtbot, aloop, gui_settings,
                                                          phantom_dicom, tmp_path):
    import shutil

    from engine.io.dicom import load_dicom_case

    window = make_window(qtbot, gui_settings, PhysicsDoseEngine())
    folder = phantom_dicom.ct_paths[0].parent
    with qtbot.waitSignal(window.case_loaded, timeout=30_000):
        window.open_path(folder)
    assert window.recent_paths()[0] == str(folder)
    qtbot.waitUntil(lambda: window.controller.predictions_done == 1, timeout=20_000)
    window.session.set_gantry(1, 123.0)
    qtbot.waitUntil(lambda: window.controller.predictions_done == 2
                    and not window.controller.busy, timeout=20_000)
    with qtbot.waitSignal(window.exported, timeout=30_000) as blocker:
        window.export_to(tmp_path / "out")
    files = blocker.args[0]
    assert not files.whole_case and files.rtplan.exists() and files.rtdose.exists()
    # re-open: the original CT and structures with the exported plan and dose
    reopen = tmp_path / "reopen"
    reopen.mkdir()
    for path in (*phantom_dicom.ct_paths, phantom_dicom.rtstruct_path, files.rtplan,
                 files.rtdose):
        shutil.copy(path, reopen)
    case = load_dicom_case(reopen)
    assert case.plan.beams[1].gantry_deg == pytest.approx(123.0)
    assert np.allclose(case.dose.array, window.session.result.dose.array, atol=0.01)
    window.close()


def test_exporting_a_case_without_dicom_writes_a_whole_study(win, qtbot, tmp_path):
    from engine.io.dicom import load_dicom_case

    win.session.set_gantry(0, 30.0)
    qtbot.waitUntil(lambda: win.controller.predictions_done == 2 and not win.controller.busy,
                    timeout=20_000)
    with qtbot.waitSignal(win.exported, timeout=30_000) as blocker:
        win.export_to(tmp_path)
    files = blocker.args[0]
    assert files.whole_case
    case = load_dicom_case(files.folder)
    assert case.plan.beams[0].gantry_deg == pytest.approx(30.0)
    assert np.allclose(case.dose.array, win.session.result.dose.array, atol=0.01)
    assert {s.name for s in case.structures} >= {"PTV70", "Parotid_L", "BODY"}
    # a second export never touches the first
    before = sorted(p.name for p in files.folder.iterdir())
    with qtbot.waitSignal(win.exported, timeout=30_000) as second:
        win.export_to(tmp_path)
    assert second.args[0].folder != files.folder
    assert sorted(p.name for p in files.folder.iterdir()) == before


def test_opening_a_dataset_case_and_a_broken_one(qtbot, aloop, gui_settings, openkbp_dir,
                                                 tmp_path):
    window = make_window(qtbot, gui_settings, None)
    case_file = sorted((openkbp_dir / "train").glob("*.npz"))[0]
    with qtbot.waitSignal(window.case_loaded, timeout=60_000) as loaded:
        window.open_path(case_file)
    case = loaded.args[0]
    assert window.session.plan is not None and window.session.plan.beams
    assert window.structures_panel.count() == len(case.structures)
    axial = grab_rgb(window.axial.plot)
    grey = (np.ptp(axial, axis=2) < 4) & (axial[..., 0] > 60) & (axial[..., 0] < 200)
    assert grey.sum() > 500, "the dataset's CT should be visible"
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip file")
    with qtbot.waitSignal(window.error_shown, timeout=10_000) as blocker:
        window.open_path(broken)
    assert "Not a readable OpenKBP case" in blocker.args[0]
    assert window.session.case is case, "a failed open keeps the current patient"
    window.close()


def test_dropping_a_folder_opens_it_and_bad_dicom_gets_a_readable_error(
        qtbot, aloop, gui_settings, phantom_dicom, tmp_path):
    window = make_window(qtbot, gui_settings, None)
    mime = QtCore.QMimeData()
    mime.setUrls([QtCore.QUrl.fromLocalFile(str(phantom_dicom.ct_paths[0].parent))])
    drop = QtGui.QDropEvent(QtCore.QPointF(200, 200), QtCore.Qt.DropAction.CopyAction, mime,
                            LEFT, QtCore.Qt.KeyboardModifier.NoModifier)
    with qtbot.waitSignal(window.case_loaded, timeout=30_000):
        window.dropEvent(drop)
    assert window.session.case.name
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    with qtbot.waitSignal(window.error_shown, timeout=10_000) as blocker:
        window.open_path(empty)
    message = blocker.args[0]
    assert "Traceback" not in message and str(empty) in message
    window.close()


def test_views_show_the_ai_dose_once_there_is_one_until_the_planner_picks(
        qtbot, aloop, gui_settings, case):
    """`dosepilot demo` opens the patient before its model has loaded: the views show the
    reference until then, and the AI dose (with its label) as soon as it exists."""
    window = make_window(qtbot, gui_settings, None)
    window.open_case(case)
    assert window.overlay_combo.currentText() == OVERLAY_MODES[1]
    assert [v.dose_label.text() for v in window.slice_views] == ["Reference (dataset)"] * 3
    reference = image_pixels(window.axial)
    window.set_engine(PhysicsDoseEngine())
    qtbot.waitUntil(lambda: window.controller.predictions_done == 1, timeout=10_000)
    assert window.overlay_combo.currentText() == OVERLAY_MODES[0]
    assert [v.dose_label.text() for v in window.slice_views] == ["AI 10-step"] * 3
    assert np.array_equal(window.axial._overlay,
                          window.axial.grid.orient(window.session.result.dose.array))
    first = image_pixels(window.axial)
    assert changed_pixels(reference, first) > 500, "the AI dose should replace the reference"
    window.session.set_gantry(0, 51.0)
    qtbot.waitUntil(lambda: window.controller.predictions_done == 2, timeout=10_000)
    assert changed_pixels(first, image_pixels(window.axial)) > 200, "the dose should move"
    # the planner's pick stays, whatever results arrive; the others are one click away
    window.overlay_combo.setCurrentText(OVERLAY_MODES[1])
    window.session.set_gantry(0, 90.0)
    qtbot.waitUntil(lambda: window.controller.predictions_done == 3, timeout=10_000)
    assert window.overlay_combo.currentText() == OVERLAY_MODES[1]
    assert window.axial.dose_label.text() == "Reference (dataset)"
    window.overlay_combo.setCurrentText(OVERLAY_MODES[2])
    assert window.axial.dose_label.text() == "AI 10-step − Reference (dataset)"
    window.close()


def test_views_open_fitted_to_the_body_and_r_resets_zoom_and_pan(win, qtbot):
    fractions = [body_width_fraction(view) for view in win.slice_views]
    assert min(fractions) >= 0.5, f"body spans {fractions} of the views' widths"
    view = win.axial
    fitted = view.view_box.viewRect()
    view.view_box.scaleBy((0.3, 0.3))
    view.view_box.translateBy((40.0, -25.0))
    assert body_width_fraction(view) == pytest.approx(1.0, abs=0.02)  # zoomed into the body
    win.activateWindow()
    qtbot.waitUntil(win.isActiveWindow, timeout=5000)
    qtbot.keyClick(view.plot.viewport(), QtCore.Qt.Key.Key_R)
    again = view.view_box.viewRect()
    assert (again.center() - fitted.center()).manhattanLength() < 0.5
    assert again.width() == pytest.approx(fitted.width(), rel=1e-3)


def test_beam_handles_stay_on_screen_and_draggable_at_every_zoom(win, qtbot):
    """At each zoom every handle is inside the view, and dragging a handle turns its beam by
    20 degrees (the mouse released where that beam's handle would be)."""
    from engine.features.beam_geometry import source_direction_lps
    from planner_gui.beam_geometry import handle_point
    from planner_gui.main_window import DRAG_HINT, HINT_DONE_KEY

    view, box = win.axial, win.axial.view_box
    assert view.hint_label.isVisible() and view.hint_label.text() == DRAG_HINT
    iso = np.asarray(win.session.plan.isocenter_mm[:2])
    position = win.session.plan.patient_position
    viewport = view.plot.viewport()
    double_click_ms = QtGui.QGuiApplication.styleHints().mouseDoubleClickInterval()
    dragged = []
    # zoom factor about a point (< 1 zooms in): fitted, in 3x and 10x, out 3x, and in 3x with
    # the isocentre out of view
    for scale, about in ((1.0, iso), (0.3, iso), (0.1, iso), (3.0, iso),
                         (0.3, iso + np.array([120.0, 90.0]))):
        view.fit_to_body()
        box.scaleBy((scale, scale), center=QtCore.QPointF(*about))
        qtbot.wait(20)
        area = view.plot.mapFromScene(box.sceneBoundingRect()).boundingRect()
        iso_in_view = area.contains(view.view_to_widget(*iso))
        shown = [ray for ray in view.beam_rays if ray.isVisible()]
        assert len(shown) == len(view.beam_rays) or not iso_in_view and shown, scale
        for ray in shown:
            assert area.adjusted(4, 4, -4, -4).contains(view.view_to_widget(*ray.handle_xy))
        rect = box.viewRect()
        inset = 15.0 * rect.width() / box.width()
        visible = (rect.left() + inset, rect.top() + inset, rect.right() - inset,
                   rect.bottom() - inset)
        for ray in shown:
            gantry = win.session.plan.beams[ray.index].gantry_deg
            turned = source_direction_lps(gantry + 20.0, 0.0, position)[:2]
            target_mm = handle_point(iso, turned, visible)
            if target_mm is None:  # the isocentre is out of view: turn the other way
                turned = source_direction_lps(gantry - 20.0, 0.0, position)[:2]
                target_mm = handle_point(iso, turned, visible)
            expected = gantry_from_axial_direction(*(target_mm - iso), position)
            start, target = view.view_to_widget(*ray.handle_xy), view.view_to_widget(*target_mm)
            qtbot.wait(double_click_ms + 50)  # a quick second press would be a double click
            qtbot.mousePress(viewport, LEFT, pos=start)
            qtbot.mouseMove(viewport, (start + target) / 2)
            qtbot.mouseMove(viewport, target)
            qtbot.mouseRelease(viewport, LEFT, pos=target)
            assert win.session.selected_beam == ray.index
            now = win.session.plan.beams[ray.index].gantry_deg
            assert abs((now - expected + 180.0) % 360.0 - 180.0) < 1.0, (scale, ray.index)
            assert abs((now - gantry + 180.0) % 360.0 - 180.0) > 5.0, (scale, ray.index)
            dragged.append((scale, ray.index))
            if len(dragged) == 1:
                assert not view.hint_label.isVisible(), "the hint goes after the first drag"
    assert len(dragged) >= 4 * len(view.beam_rays) + 1
    win.reset_view_action.trigger()
    qtbot.waitUntil(lambda: all(ray.isVisible() for ray in view.beam_rays), timeout=2000)
    qtbot.waitUntil(lambda: not win.controller.busy, timeout=20_000)
    assert win.settings.value(HINT_DONE_KEY, False, type=bool)
    win.open_case(win.session.case)
    assert not view.hint_label.isVisible(), "the hint is for the first run only"
