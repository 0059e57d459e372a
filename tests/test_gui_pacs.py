"""The window's PACS entries on the real widgets, against the real Orthanc of the ``orthanc``
fixture: search, retrieve with progress and open; predict, export, Send to PACS (checked over
Orthanc's REST API); the node settings (saved in the settings file the CLI reads, C-ECHO test);
errors shown in the dialog."""

from __future__ import annotations

import asyncio
import json
import os
import threading

import pydicom
import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
    pytest.mark.timeout(600),
]

from orthanc_server import ORTHANC_AET  # noqa: E402

from engine.pacs.nodes import PacsSettings, RemoteNode, load_settings, save_settings  # noqa: E402
from planner_gui.main_window import MainWindow  # noqa: E402
from tests.conftest import DEMO  # noqa: E402


@pytest.fixture
def pacs_settings(tmp_path, orthanc, monkeypatch):
    """A settings file with the Orthanc as default node, C-MOVE to the fixture's move port."""
    path = tmp_path / "pacs.json"
    node = RemoteNode(ORTHANC_AET, "127.0.0.1", orthanc.dicom_port, name="orthanc")
    settings = PacsSettings(local_aet="DOSEPILOT", local_port=orthanc.move_port,
                            retrieve_method="move").with_node(node, make_default=True)
    save_settings(settings, path)
    monkeypatch.setenv("DOSEPILOT_PACS_SETTINGS", str(path))
    return path


@pytest.fixture
def window(qtbot, aloop, gui_settings, pacs_settings, tmp_path):
    win = MainWindow(None, settings=gui_settings)
    qtbot.addWidget(win)
    win.pacs.store_root = tmp_path / "studies"
    win.show()
    qtbot.waitExposed(win)
    yield win
    win.close()


def test_open_from_pacs_then_predict_export_and_send_back(window, qtbot, orthanc, tmp_path,
                                                          tiny_dose_bundle, sent_to_orthanc):
    menu_texts = [a.text() for a in window.menuBar().actions()[0].menu().actions()]
    assert {"Open from PACS…", "Send to PACS…", "PACS nodes…"} <= set(menu_texts)
    assert not window.pacs.send_action.isEnabled()  # nothing exported yet
    window.controller.steps = 1
    window.use_checkpoint(str(tiny_dose_bundle))
    qtbot.waitUntil(lambda: window.controller.available or bool(window.last_error),
                    timeout=60_000)
    assert window.controller.available, window.last_error

    dialog = window.pacs.open_dialog()
    qtbot.waitExposed(dialog)
    assert dialog.picker.node().port == orthanc.dicom_port
    dialog.name_edit.setText("pt_2*")
    dialog.search_button.click()
    qtbot.waitUntil(lambda: dialog.table.rowCount() == 1 or bool(dialog.last_error),
                    timeout=30_000)
    assert dialog.last_error == ""
    assert [dialog.table.item(0, c).text() for c in (0, 4, 5)] == [
        "pt_201", "CT/RTDOSE/RTPLAN/RTSTRUCT", "131"]
    assert dialog.retrieve_button.isEnabled()
    seen = []
    dialog.retrieve_job.progressed.connect(seen.append)
    with qtbot.waitSignal(window.case_loaded, timeout=120_000):
        dialog.retrieve_button.click()
        assert dialog.progress.isVisible() and dialog.progress.maximum() == 131
        assert not dialog.retrieve_button.isEnabled()  # one retrieve at a time
    # the bar moved while the objects arrived; the dialog closed once the study was whole
    assert seen and max(seen) == 131 and len(seen) > 1
    case = window.session.case
    assert case.name == "pt_201" and len(case.plan.beams) == 9
    study_uid = case.refs.study_instance_uid
    assert (tmp_path / "studies" / "pt_201" / study_uid).is_dir()

    qtbot.waitUntil(lambda: window.session.result is not None
                    and window.session.result.kind == "predict", timeout=180_000)
    with qtbot.waitSignal(window.exported, timeout=60_000) as exported:
        window.export_to(tmp_path / "export")
    files = exported.args[0]
    assert files.rtdose is not None and not files.whole_case
    assert window.pacs.send_action.isEnabled()
    assert "Send to PACS" in window.statusBar().currentMessage()

    plan = pydicom.dcmread(files.rtplan, stop_before_pixels=True)
    dose = pydicom.dcmread(files.rtdose, stop_before_pixels=True)
    sent_to_orthanc += [str(plan.SOPInstanceUID), str(dose.SOPInstanceUID)]
    sender = window.pacs.send_dialog()
    qtbot.waitExposed(sender)
    assert sender.files.count() == 2
    with qtbot.waitSignal(sender.sent, timeout=60_000):
        sender.send_button.click()
    assert sender.report.failed == [] and sender.progress.value() == 2
    stored_dose = orthanc.instance(str(dose.SOPInstanceUID))
    stored_plan = orthanc.instance(str(plan.SOPInstanceUID))
    assert stored_dose["StudyInstanceUID"] == stored_plan["StudyInstanceUID"] == study_uid
    assert stored_dose["ReferencedRTPlanSequence"][0]["ReferencedSOPInstanceUID"] \
        == str(plan.SOPInstanceUID)
    source_plan = pydicom.dcmread(DEMO / "RTPLAN.dcm", stop_before_pixels=True)
    assert stored_plan["ReferencedRTPlanSequence"][0]["ReferencedSOPInstanceUID"] \
        == str(source_plan.SOPInstanceUID)
    assert stored_dose["FrameOfReferenceUID"] == source_plan.FrameOfReferenceUID


def test_node_settings_are_saved_for_the_cli_and_tested_with_c_echo(window, qtbot, orthanc,
                                                                    pacs_settings):
    dialog = window.pacs.nodes_dialog()
    qtbot.waitExposed(dialog)
    assert dialog.table.rowCount() == 1
    dialog.table.selectRow(0)
    dialog.echo_button.click()
    qtbot.waitUntil(lambda: "answers" in dialog.status.text()
                    or "rejected" in dialog.status.text(), timeout=20_000)
    assert f"ORTHANC@127.0.0.1:{orthanc.dicom_port} answers" in dialog.status.text()

    row = dialog.add_row(None, "")
    dialog.set_row(row, "tps", "TPS_AE", "tps.example.org", 104, tls=True)
    dialog.table.selectRow(row)
    dialog.local_aet.setText("PLANNER1")
    dialog.default_combo.setCurrentText("tps")
    dialog.save()
    assert dialog.result() == dialog.DialogCode.Accepted
    saved = load_settings(pacs_settings)
    assert saved.default_node == "tps" and saved.local_aet == "PLANNER1"
    assert saved.nodes["tps"] == RemoteNode("TPS_AE", "tps.example.org", 104, True, "tps")
    assert json.loads(pacs_settings.read_text())["nodes"]["orthanc"]["port"] == orthanc.dicom_port

    bad = window.pacs.nodes_dialog()
    qtbot.waitExposed(bad)
    bad.set_row(0, "orthanc", "NAME_LONGER_THAN_16", "127.0.0.1", 1)
    bad.save()
    assert "Not saved" in bad.status.text() and "AE title" in bad.status.text()
    assert bad.isVisible()
    bad.reject()


def test_a_search_that_fails_says_why_in_the_dialog(window, qtbot, orthanc, pacs_settings):
    settings = load_settings(pacs_settings)
    wrong = RemoteNode("NOT_ORTHANC", "127.0.0.1", orthanc.dicom_port, name="wrong")
    save_settings(settings.with_node(wrong, make_default=True), pacs_settings)
    dialog = window.pacs.open_dialog()
    qtbot.waitExposed(dialog)
    assert dialog.picker.node().aet == "NOT_ORTHANC"
    dialog.date_edit.setText("not a date")
    dialog.search_button.click()
    assert "is not a date" in dialog.last_error
    dialog.date_edit.setText("")
    dialog.search_button.click()

    def failed() -> None:  # on a timeout, the message says what the dialog shows instead
        assert "Search failed" in dialog.last_error, (dialog.last_error, dialog.status.text())

    qtbot.waitUntil(failed, timeout=20_000)
    # Orthanc's reason, or (its reject lost to its close, test_pacs_orthanc) the AE title to check
    assert ("Called AE title not recognised" in dialog.status.text()
            or "answers to AE title 'NOT_ORTHANC'" in dialog.status.text())
    assert dialog.table.rowCount() == 0 and not dialog.retrieve_button.isEnabled()
    dialog.reject()


def test_a_search_answers_while_the_windows_other_jobs_fill_the_default_executor(
        window, qtbot, orthanc, pacs_settings):
    blocked = threading.Event()
    loop = asyncio.get_event_loop()
    # more long jobs than the default executor has threads (at most 32): loads, dose
    # computations and beam searches of the window all run there
    busy = [loop.run_in_executor(None, blocked.wait) for _ in range(40)]
    try:
        dialog = window.pacs.open_dialog()
        qtbot.waitExposed(dialog)
        dialog.id_edit.setText("pt_201")
        dialog.search_button.click()
        qtbot.waitUntil(lambda: dialog.table.rowCount() == 1, timeout=30_000)
        dialog.reject()
    finally:
        blocked.set()
    qtbot.waitUntil(lambda: all(f.done() for f in busy), timeout=10_000)


def test_a_cancelled_retrieve_opens_nothing(window, qtbot, tmp_path):
    dialog = window.pacs.open_dialog()
    qtbot.waitExposed(dialog)
    dialog.id_edit.setText("pt_201")
    dialog.search_button.click()
    qtbot.waitUntil(lambda: dialog.table.rowCount() == 1, timeout=30_000)
    seen = []
    dialog.retrieve_job.progressed.connect(seen.append)
    opened = []
    window.case_loaded.connect(opened.append)
    dialog.retrieve_button.click()
    qtbot.waitUntil(lambda: bool(seen) and seen[-1] >= 5, timeout=60_000)
    assert dialog.cancel_button.isVisible()
    dialog.cancel_button.click()
    qtbot.waitUntil(lambda: "cancelled" in dialog.last_error, timeout=60_000)
    assert "Nothing of it was added" in dialog.status.text()
    assert dialog.isVisible() and dialog.retrieve_button.isEnabled()
    qtbot.wait(200)
    assert opened == [] and window.session.case is None
    assert not (tmp_path / "studies" / "pt_201").exists()
    dialog.reject()
