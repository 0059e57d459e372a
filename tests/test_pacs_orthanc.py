"""DosePilot against a real PACS (Orthanc, started by the ``orthanc`` fixture with the demo
patient): C-ECHO, C-FIND at three levels, C-MOVE and C-GET into the study store, the round
trip retrieve -> predict -> send back (checked through Orthanc's REST API), and the errors:
unreachable host, wrong AE titles, timeouts, a retrieve interrupted half-way."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time

import pydicom
import pytest
from orthanc_server import ORTHANC_AET, OrthancServer, free_port, orthanc_binary

from engine.cli import main
from engine.errors import UserError
from engine.io.dicom import DicomImportError, load_dicom_case
from engine.io.dicom_export import write_rtdose, write_rtplan
from engine.io.dicom_scan import scan_folder
from engine.pacs.association import Client, echo
from engine.pacs.errors import (
    AssociationAborted,
    AssociationRejected,
    PacsTimeout,
    PacsUnreachable,
    RetrieveIncomplete,
)
from engine.pacs.nodes import RemoteNode, Timeouts
from engine.pacs.query import FindQuery, find
from engine.pacs.retrieve import retrieve
from engine.pacs.store import StudyStore
from tests.conftest import demo_files

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def demo_uids():
    """SOP Instance UIDs of the demo patient, and its identifiers."""
    uids, info = set(), {}
    for f in demo_files():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        uids.add(str(ds.SOPInstanceUID))
        info.setdefault("study", str(ds.StudyInstanceUID))
        info.setdefault("for", str(ds.FrameOfReferenceUID))
        if ds.Modality == "RTPLAN":
            info["plan"] = str(ds.SOPInstanceUID)
    return uids, info


def node_args(orthanc, **extra) -> list[str]:
    args = ["--host", "127.0.0.1", "--port", str(orthanc.dicom_port), "--called-aet",
            ORTHANC_AET, "--aet", "DOSEPILOT", "--timeout", "20"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def run_json(capsys, *args) -> tuple[int, dict]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip().startswith("{") else
                  {"err": captured.err})


def node_of(orthanc) -> RemoteNode:
    return RemoteNode(ORTHANC_AET, "127.0.0.1", orthanc.dicom_port)


def test_echo_and_find_at_patient_study_and_series_level(orthanc, capsys, tmp_path):
    settings = ["--settings", str(tmp_path / "none.json")]
    code, doc = run_json(capsys, "pacs", "echo", *node_args(orthanc), "--json", *settings)
    assert code == 0 and doc["ok"] and doc["node"].startswith("ORTHANC@127.0.0.1")

    code, doc = run_json(capsys, "pacs", "find", *node_args(orthanc), "--json", *settings)
    assert code == 0 and len(doc["matches"]) == 1
    study = doc["matches"][0]
    assert study["PatientID"] == "pt_201" and study["NumberOfStudyRelatedInstances"] == 131
    assert set(study["ModalitiesInStudy"].split("\\")) == {"CT", "RTSTRUCT", "RTPLAN", "RTDOSE"}

    code, doc = run_json(capsys, "pacs", "find", "--level", "patient", "--name", "pt_2*",
                         *node_args(orthanc), "--json", *settings)
    assert [m["PatientID"] for m in doc["matches"]] == ["pt_201"]
    code, doc = run_json(capsys, "pacs", "find", "--level", "patient", "--name", "NOBODY*",
                         *node_args(orthanc), "--json", *settings)
    assert code == 0 and doc["matches"] == []

    code, doc = run_json(capsys, "pacs", "find", "--level", "series", "--patient-id", "pt_201",
                         *node_args(orthanc), "--json", *settings)
    assert sorted((m["Modality"], m["NumberOfSeriesRelatedInstances"]) for m in doc["matches"]) \
        == [("CT", 128), ("RTDOSE", 1), ("RTPLAN", 1), ("RTSTRUCT", 1)]

    date = study["StudyDate"]
    iso = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    _, doc = run_json(capsys, "pacs", "find", "--study-date", f"{iso}..{iso}",
                      *node_args(orthanc), "--json", *settings)
    assert len(doc["matches"]) == 1
    _, doc = run_json(capsys, "pacs", "find", "--study-date", "-19991231",
                      *node_args(orthanc), "--json", *settings)
    assert doc["matches"] == []
    # the text table, for people
    capsys.readouterr()
    assert main(["pacs", "find", *node_args(orthanc), *settings]) == 0
    out = capsys.readouterr().out
    assert "pt_201" in out and "CT/RTDOSE/RTPLAN/RTSTRUCT" in out and "1 study(s)" in out


def retrieve_cli(capsys, orthanc, out, method, tmp_path) -> tuple[int, dict]:
    return run_json(capsys, "pacs", "retrieve", "--patient-id", "pt_201", "--out", out,
                    "--method", method, "--move-port", orthanc.move_port, *node_args(orthanc),
                    "--json", "--settings", tmp_path / "none.json")


def check_whole_study(doc, store, demo_uids):
    uids, info = demo_uids
    (study,) = doc["studies"]
    folder = store / "pt_201" / info["study"]
    assert study["folder"] == str(folder) and study["objects"] == study["added"] == 131
    assert {o.sop_instance_uid for o in scan_folder(folder).objects} == uids
    case = load_dicom_case(folder)
    assert case.plan is not None and len(case.plan.beams) == 9 and case.dose is not None
    return folder


@pytest.fixture(scope="module")
def retrieved(orthanc, tmp_path_factory):
    """The demo patient retrieved with C-GET by ``dosepilot pacs retrieve`` (once per module)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("retrieved")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in (
            "pacs", "retrieve", "--patient-id", "pt_201", "--out", tmp / "store", "--method",
            "get", *node_args(orthanc), "--json", "--settings", tmp / "none.json")])
    return code, json.loads(out.getvalue()), tmp / "store"


def test_retrieve_with_c_get_puts_the_whole_study_into_the_store_once(
        retrieved, orthanc, capsys, tmp_path, demo_uids):
    code, doc, store = retrieved
    assert code == 0, doc
    folder = check_whole_study(doc, store, demo_uids)
    # again: everything is there already; nothing is written twice or overwritten
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != "study.json"}
    code, doc = retrieve_cli(capsys, orthanc, store, "get", tmp_path)
    assert code == 0 and doc["studies"][0]["added"] == 0
    assert doc["studies"][0]["duplicates"] == 131
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()
            if p.name != "study.json"} == before


def test_retrieve_with_c_move(orthanc, capsys, tmp_path, demo_uids):
    code, doc = retrieve_cli(capsys, orthanc, tmp_path / "store", "move", tmp_path)
    assert code == 0, doc
    check_whole_study(doc, tmp_path / "store", demo_uids)


def test_round_trip_retrieve_predict_send_back(orthanc, retrieved, capsys, tmp_path,
                                               tiny_dose_bundle, demo_uids, sent_to_orthanc):
    """The planner's loop: retrieve the patient, predict, send the RTDOSE (and an edited
    RTPLAN with the dose predicted for it) back; Orthanc then holds them in the patient's
    study, referencing the right plan and frame of reference."""
    _, info = demo_uids
    settings = ["--settings", tmp_path / "none.json"]
    code, doc, _ = retrieved
    assert code == 0, doc
    folder = doc["studies"][0]["folder"]
    code, doc = run_json(capsys, "predict", folder, "--steps", "1", "--model", tiny_dose_bundle,
                         "--threads", "1", "--out", tmp_path / "pred", "--json")
    assert code == 0, doc
    dose_file = tmp_path / "pred" / doc["cases"][0]["case"] / "dose.dcm"
    dose = pydicom.dcmread(dose_file)

    # the edited plan (beam 1 turned by 20 degrees) and a dose that refers to it
    case = load_dicom_case(folder)
    beams = list(case.plan.beams)
    beams[0] = dataclasses.replace(beams[0], gantry_deg=(beams[0].gantry_deg + 20) % 360)
    edited = dataclasses.replace(case.plan, beams=tuple(beams))
    export = tmp_path / "export"
    export.mkdir()
    plan_uid = write_rtplan(case, edited, export / "RTPLAN_dosepilot.dcm")
    edited_dose_uid = write_rtdose(case.dose, case, export / "RTDOSE_dosepilot.dcm",
                                   plan_sop_instance_uid=plan_uid)
    (export / "notes.txt").write_text("not DICOM: skipped")

    sent_to_orthanc += [str(dose.SOPInstanceUID), plan_uid, edited_dose_uid]
    code, doc = run_json(capsys, "pacs", "send", dose_file, export, *node_args(orthanc),
                         "--json", *settings)
    assert code == 0, doc
    assert doc["sent"] == 3 and doc["failed"] == 0

    stored = orthanc.instance(str(dose.SOPInstanceUID))
    assert stored is not None, "the predicted RTDOSE did not arrive"
    assert stored["Modality"] == "RTDOSE" and stored["PatientID"] == "pt_201"
    assert stored["StudyInstanceUID"] == info["study"]
    assert stored["FrameOfReferenceUID"] == info["for"]
    assert stored["ReferencedRTPlanSequence"][0]["ReferencedSOPInstanceUID"] == info["plan"]
    plan = orthanc.instance(plan_uid)
    assert plan["StudyInstanceUID"] == info["study"]
    assert plan["FrameOfReferenceUID"] == info["for"]
    assert plan["ReferencedRTPlanSequence"][0]["ReferencedSOPInstanceUID"] == info["plan"]
    assert plan["ReferencedRTPlanSequence"][0]["RTPlanRelationship"] == "PREDECESSOR"
    angles = [float(b["ControlPointSequence"][0]["GantryAngle"])
              for b in plan["BeamSequence"]]
    assert angles[0] == pytest.approx((beams[0].gantry_deg) % 360)
    edited_dose = orthanc.instance(edited_dose_uid)
    assert edited_dose["ReferencedRTPlanSequence"][0]["ReferencedSOPInstanceUID"] == plan_uid
    modalities = sorted(i["Modality"] for i in orthanc.instances_of_study(info["study"]))
    assert modalities.count("RTDOSE") >= 3 and modalities.count("RTPLAN") >= 2
    assert modalities.count("CT") == 128  # nothing else of the study changed


def test_unreachable_host_and_port_are_named(orthanc, capsys, tmp_path):
    settings = ["--settings", str(tmp_path / "none.json")]
    code = main(["pacs", "echo", "--host", "127.0.0.1", "--port", str(free_port()),
                 "--called-aet", "ORTHANC", *settings])
    err = capsys.readouterr().err
    assert code == 2 and "nothing listens on 127.0.0.1 port" in err and "connection refused" in err
    with pytest.raises(PacsUnreachable, match="unknown host 'no-such-host.invalid'"):
        echo(RemoteNode("ORTHANC", "no-such-host.invalid", 104), Client())


def test_wrong_called_ae_title_is_rejected_with_the_reason(orthanc):
    wrong = dataclasses.replace(node_of(orthanc), aet="NOT_ORTHANC")
    seen = set()
    for _ in range(3):  # Orthanc's reject races its close: now and then only the close arrives
        with pytest.raises((AssociationRejected, AssociationAborted)) as info:
            echo(wrong, Client())
        seen.add(type(info.value))
        if isinstance(info.value, AssociationRejected):
            assert "Called AE title not recognised" in str(info.value)
            assert "check the called AE title" in str(info.value)
        else:  # either way the message names the AE title to check
            assert "answers to AE title 'NOT_ORTHANC'" in str(info.value)
    assert AssociationRejected in seen
    assert echo(node_of(orthanc), Client()).seconds > 0  # the right one works


def test_a_calling_ae_title_the_pacs_does_not_know_is_refused(orthanc):
    """Orthanc accepts the association from an unknown AE but aborts its query."""
    with pytest.raises(AssociationAborted, match="may not allow this request from AE title "
                                                 "'STRANGER'"):
        find(node_of(orthanc), Client("STRANGER"), FindQuery())


def test_a_node_that_does_not_answer_times_out():
    """A port that accepts the connection but never speaks DICOM."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        node = RemoteNode("SILENT", "127.0.0.1", server.getsockname()[1])
        t0 = time.monotonic()
        with pytest.raises(PacsTimeout, match="did not answer the association request within 1 s"):
            echo(node, Client(timeouts=Timeouts(connect=1, acse=1, dimse=1)))
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        server.close()


def test_a_query_that_gets_no_answer_times_out():
    """A real Query/Retrieve SCP that takes longer than the DIMSE timeout to answer."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
    )

    release = threading.Event()

    def slow_find(event):
        release.wait(10)
        yield 0x0000, None

    scp = AE("SLOWPACS")
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    scp.add_supported_context(PatientRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_FIND, slow_find)])
    try:
        with pytest.raises(PacsTimeout, match="did not answer the study-level C-FIND within 1 s"):
            find(RemoteNode("SLOWPACS", "127.0.0.1", port),
                 Client(timeouts=Timeouts(connect=2, acse=5, dimse=1)), FindQuery())
    finally:
        release.set()
        server.shutdown()


def test_a_retrieve_cut_half_way_leaves_nothing_that_could_be_opened(tmp_path, capsys):
    """Orthanc dies (SIGKILL) while it sends the study: the retrieve says how far it got, and
    the store holds nothing of the study: no folder, no file a loader would read."""
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        server.upload(demo_files())
        store = StudyStore(tmp_path / "store")
        seen = []

        def progress(p):
            seen.append(p.received)
            if p.received == 40:
                server.kill()

        with pytest.raises(RetrieveIncomplete) as info:
            retrieve(node_of(server), Client(timeouts=Timeouts(2, 5, 5)), store, "pt_201",
                     method="get", progress=progress)
        message = str(info.value)
        assert "incomplete" in message and "of 131 objects received" in message
        assert "Nothing of it was added" in message
        assert 40 <= info.value.received < 131 and info.value.completed == []
        assert max(seen) >= 40
        assert [p.name for p in store.root.iterdir() if not p.name.startswith(".lock")] == []
        assert scan_folder(store.root).objects == ()
        with pytest.raises(DicomImportError):
            load_dicom_case(store.root)
    finally:
        server.stop()


def test_a_cancelled_retrieve_adds_nothing(orthanc, tmp_path):
    store = StudyStore(tmp_path / "store")
    cancel = threading.Event()

    def progress(p):
        if p.received >= 20:
            cancel.set()

    with pytest.raises(RetrieveIncomplete, match="cancelled"):
        retrieve(node_of(orthanc), Client(), store, "pt_201", method="move",
                 move_port=orthanc.move_port, progress=progress, cancel=cancel)
    assert not (store.root / "pt_201").exists()
    assert scan_folder(store.root).objects == ()


def test_retrieve_needs_an_exact_patient_that_exists(orthanc, tmp_path):
    store = StudyStore(tmp_path)
    with pytest.raises(UserError, match="no study of patient 'nobody'"):
        retrieve(node_of(orthanc), Client(), store, "nobody", method="get")
    with pytest.raises(UserError, match="one exact Patient ID"):
        retrieve(node_of(orthanc), Client(), store, "pt_*", method="get")
