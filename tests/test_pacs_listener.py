"""``dosepilot listen``: a real node process taking the demo patient from a standard SCU
(pynetdicom's ``storescu``) and returning the predicted RTDOSE and the DVH report to a real
Storage SCP; senders not allowed are rejected and logged; malformed and unsupported objects are
refused with failure statuses while the node keeps working. In process: studies grouped by the
quiet period, and TLS."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc_server import free_port
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from engine.pacs.association import Client, echo
from engine.pacs.errors import AssociationAborted, AssociationRejected
from engine.pacs.listener import NodeConfig, StorageNode
from engine.pacs.nodes import AllowedSender, RemoteNode, Timeouts, TlsFiles
from engine.pacs.send import collect_files, send_files
from engine.pacs.store import StudyStore
from tests.conftest import DEMO, REPO, demo_files

pytestmark = pytest.mark.timeout(420)
NODE_AET = "DOSEPILOT"
RETURN_AET = "RETURN"


class ReturnScp:
    """A Storage SCP (pynetdicom) standing for the TPS the results go back to."""

    def __init__(self, folder: Path) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.folder = folder
        self.received: queue.Queue[Path] = queue.Queue()
        self.port = free_port()
        ae = AE(RETURN_AET)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.received.put(path)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


class NodeProcess:
    """``dosepilot listen`` as a subprocess; its JSON events are read as they come."""

    def __init__(self, args: list[str], log: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.log = log
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "listen", *args, "--json", "--log", str(log)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_for(self, predicate, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise AssertionError(f"no such event within {timeout} s; got {self.events}"
                                         f"; log: {self.log.read_text()[-3000:]}")
                self._cond.wait(min(left, 0.5))

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_dose_bundle):
    """A running ``dosepilot listen --predict --preview`` that accepts TPS from 127.0.0.1 and
    returns its results to a :class:`ReturnScp`."""
    tmp = tmp_path_factory.mktemp("node")
    (tmp / "returned").mkdir()
    scp = ReturnScp(tmp / "returned")
    port = free_port()
    proc = NodeProcess(["--port", str(port), "--aet", NODE_AET, "--store", str(tmp / "store"),
                        "--allow", "TPS@127.0.0.1", "--predict", "--preview", "--model",
                        str(tiny_dose_bundle), "--threads", "1", "--return-to",
                        f"{RETURN_AET}@127.0.0.1:{scp.port}", "--quiet-seconds", "1.5",
                        "--settings", str(tmp / "none.json")], tmp / "node.log")
    try:
        proc.wait_for(lambda e: e["event"] == "listening", 120)
        proc.port, proc.store, proc.scp = port, tmp / "store", scp
        yield proc
    finally:
        code = proc.stop()
        scp.stop()
        assert code == 0, f"the node ended with {code}"


def node_remote(node) -> RemoteNode:
    return RemoteNode(NODE_AET, "127.0.0.1", node.port)


def test_senders_that_are_not_allowed_are_rejected_and_logged(node):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    with pytest.raises(AssociationRejected, match="Calling AE title not recognised"):
        echo(node_remote(node), Client("INTRUDER"))
    # the allowed AE title, from another address than the allowed one
    ae = AE("TPS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET,
                         bind_address=("127.0.0.2", 0))
    assert assoc.is_rejected and not assoc.is_established
    assert echo(node_remote(node), Client("TPS")).seconds > 0  # the allowed sender
    node.wait_for(lambda e: e["event"] == "association_rejected"
                  and e["calling_aet"] == "INTRUDER", 10)
    node.wait_for(lambda e: e["event"] == "association_rejected"
                  and e["address"] == "127.0.0.2", 10)
    log = node.log.read_text()
    assert "rejected association from INTRUDER at 127.0.0.1" in log
    assert "rejected association from TPS at 127.0.0.2" in log
    assert "not allowed from 127.0.0.2" in log


def _file_bytes(ds: Dataset, sop_class: str | None = None, sop_instance: str | None = None
                ) -> bytes:
    """``ds`` as a DICOM file; the file meta may name another class/instance than the data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class or ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = sop_instance or ds.get("SOPInstanceUID", generate_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=False)  # keeps the file meta as given
    return buf.getvalue()


def malformed_objects() -> list[tuple[str, bytes]]:
    """Twenty objects a planning node must refuse: broken bytes, missing attributes, wrong
    identifiers, classes DosePilot does not use."""
    files = {f.name: f for f in demo_files()}
    study = generate_uid()

    def load(name: str) -> Dataset:
        ds = pydicom.dcmread(files[name])
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = generate_uid()
        return ds

    def without(name: str, *keywords: str) -> bytes:
        ds = load(name)
        for k in keywords:
            delattr(ds, k)
        return _file_bytes(ds)

    ct = _file_bytes(load("CT_0001.dcm"))
    objects = [
        ("CT cut in half", ct[: len(ct) // 2]),
        ("CT cut after its header", ct[:700]),
        ("garbage after a valid file meta", ct[:300] + bytes(range(256)) * 40),
        ("CT without pixel data", without("CT_0002.dcm", "PixelData")),
        ("CT without position", without("CT_0003.dcm", "ImagePositionPatient")),
        ("CT without study UID", without("CT_0004.dcm", "StudyInstanceUID")),
        ("CT without series UID", without("CT_0005.dcm", "SeriesInstanceUID")),
        ("CT without frame of reference", without("CT_0006.dcm", "FrameOfReferenceUID")),
    ]
    ds = load("CT_0007.dcm")
    ds.ImageOrientationPatient = [1, 0, 0]
    objects.append(("CT with a 3-value orientation", _file_bytes(ds)))
    ds = load("CT_0008.dcm")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    objects.append(("CT with half its pixels", _file_bytes(ds)))
    ds = load("CT_0009.dcm")
    ds.Modality = "MR"
    objects.append(("CT labelled MR", _file_bytes(ds)))
    ds = load("CT_0010.dcm")
    objects.append(("data set UID differs from the request's",
                    _file_bytes(ds, sop_instance=generate_uid())))
    ds = load("CT_0011.dcm")
    ds.SOPInstanceUID = "not.a.uid.x"
    objects.append(("invalid SOP Instance UID", _file_bytes(ds, sop_instance="not.a.uid.x")))
    objects.append(("RTSTRUCT without ROIs", without("RTSTRUCT.dcm", "StructureSetROISequence")))
    objects.append(("RTSTRUCT without contours", without("RTSTRUCT.dcm", "ROIContourSequence")))
    objects.append(("RTPLAN without beams", without("RTPLAN.dcm", "BeamSequence")))
    objects.append(("RTDOSE without scaling", without("RTDOSE.dcm", "DoseGridScaling")))
    objects.append(("RTDOSE without frame offsets", without("RTDOSE.dcm",
                                                           "GridFrameOffsetVector")))
    for name, sop_class in (("MR image (not used by DosePilot)", "1.2.840.10008.5.1.4.1.1.4"),
                            ("secondary capture (not used)", "1.2.840.10008.5.1.4.1.1.7")):
        ds = load("CT_0012.dcm")
        ds.SOPClassUID = sop_class
        objects.append((name, _file_bytes(ds)))
    return objects


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # one object has a bad UID on purpose
def test_twenty_malformed_objects_are_refused_and_the_node_keeps_running(node, tmp_path,
                                                                        monkeypatch):
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import Verification

    objects = malformed_objects()
    assert len(objects) == 20
    paths = []
    for i, (_, data) in enumerate(objects):
        paths.append(tmp_path / f"bad_{i:02d}.dcm")
        paths[-1].write_bytes(data)
    # send the files' bytes as they are (a real sender's broken files), not re-encoded
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE("TPS")
    ae.add_requested_context(Verification)
    for uid in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.481.3",
                "1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.481.2",
                "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7"):
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    statuses = {}
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        for (what, _), path in zip(objects, paths):
            status = assoc.send_c_store(path)
            assert "Status" in status, f"{what}: no answer (the node stopped?)"
            statuses[what] = int(status.Status)
        assert int(assoc.send_c_echo().Status) == 0  # the same association still works
    finally:
        assoc.release()
    accepted = {w: f"0x{s:04X}" for w, s in statuses.items() if s == 0 or 0xB000 <= s < 0xC000}
    assert accepted == {}, f"accepted malformed objects: {accepted}"
    assert statuses["MR image (not used by DosePilot)"] == 0x0122
    assert statuses["RTPLAN without beams"] == 0xA900
    refused = node.wait_for(lambda e: e["event"] == "object_refused"
                            and "brachytherapy" in e["reason"], 10)
    assert refused["status"] == "0xA900"
    assert echo(node_remote(node), Client("TPS")).seconds > 0  # still up, new association
    assert node.process.poll() is None
    assert node.log.read_text().count("refused object") >= 20


def test_the_demo_patient_from_a_standard_scu_comes_back_as_a_valid_rtdose(node, tmp_path):
    """pynetdicom's storescu sends the demo folder; the node predicts (1-step preview) and
    returns an RTDOSE that references the patient's plan, study and frame of reference, and the
    DVH report as an Encapsulated PDF."""
    plan = pydicom.dcmread(DEMO / "RTPLAN.dcm", stop_before_pixels=True)
    ct = pydicom.dcmread(DEMO / "CT" / "CT_0001.dcm", stop_before_pixels=True)
    t0 = time.monotonic()
    sent = subprocess.run(
        [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(node.port),
         str(DEMO), "-r", "-aet", "TPS", "-aec", NODE_AET],
        capture_output=True, text=True, timeout=300)
    t_sent = time.monotonic()
    assert sent.returncode == 0, sent.stderr[-2000:]
    # storescu sends the 1.4 MB RTSTRUCT last and may take longer than the quiet period to
    # encode it: the node then commits the study without it ("skipped") and predicts when the
    # RTSTRUCT arrives, which is the outcome to check
    done = node.wait_for(lambda e: e["event"] == "prediction" and e["status"] != "skipped"
                         and e["study_instance_uid"] == str(plan.StudyInstanceUID), 240)
    assert done["status"] == "sent", done["message"]
    returned = {}
    while len(returned) < 2:
        path = node.scp.received.get(timeout=30)
        returned[pydicom.dcmread(path, stop_before_pixels=True).Modality] = path
    t_back = time.monotonic()
    print(f"\nstorescu sent the demo patient in {t_sent - t0:.1f} s; RTDOSE back "
          f"{t_back - t_sent:.1f} s later (node timings {done['timings_s']})")
    dose = pydicom.dcmread(returned["RTDOSE"])
    assert dose.PatientID == plan.PatientID == "pt_201"
    assert dose.StudyInstanceUID == plan.StudyInstanceUID
    assert dose.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert (dose.Rows, dose.Columns, int(dose.NumberOfFrames)) == (128, 128, 128)
    gy = dose.pixel_array * float(dose.DoseGridScaling)
    assert np.isfinite(gy).all() and gy.max() > 0
    report = pydicom.dcmread(returned["DOC"])
    assert report.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert bytes(report.EncapsulatedDocument)[:5] == b"%PDF-"
    assert report.SourceInstanceSequence[0].ReferencedSOPInstanceUID == dose.SOPInstanceUID
    assert report.StudyInstanceUID == plan.StudyInstanceUID
    study = node.store / "pt_201" / str(plan.StudyInstanceUID)
    assert len(list(study.glob("*.dcm"))) == 131
    if shutil.which("dciodvfy"):
        for path in returned.values():
            out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            problems = [line for line in (out.stdout + out.stderr).splitlines()
                        if line.startswith(("Error", "Warning"))]
            assert problems == [], f"{path.name}: {problems}"


def test_the_node_groups_objects_into_studies_after_a_quiet_period(tmp_path):
    files = demo_files()
    studies, events = [], []
    config = NodeConfig(aet="NODE", port=free_port(), allowed=(AllowedSender("TPS"),),
                        quiet_seconds=0.6)
    node = StorageNode(config, StudyStore(tmp_path / "store"),
                       on_study=lambda s, sender: studies.append((s, sender)),
                       on_event=events.append)
    node.start()
    try:
        other = tmp_path / "other"
        other.mkdir()
        other_study = generate_uid()
        for f in files[:2]:  # two CT images of another patient and study
            ds = pydicom.dcmread(f)
            ds.PatientID, ds.StudyInstanceUID = "pt_999", other_study
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(other / f.name, enforce_file_format=True)
        remote = RemoteNode("NODE", "127.0.0.1", config.port)
        client = Client("TPS", Timeouts(2, 5, 10))
        items, _ = collect_files([*files[:3], other])
        assert not send_files(remote, client, items).failed
        deadline = time.monotonic() + 15
        while len(studies) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted((s.patient_id, s.total) for s, _ in studies) == [("pt_201", 3),
                                                                       ("pt_999", 2)]
        assert {sender for _, sender in studies} == {"TPS"}
        # a late object of the first study: a second, smaller commit into the same folder
        items, _ = collect_files(files[3:4])
        send_files(remote, client, items)
        while len(studies) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        late = studies[2][0]
        assert (late.patient_id, late.total, len(late.added)) == ("pt_201", 4, 1)
        assert late.folder == next(s.folder for s, _ in studies if s.patient_id == "pt_201")
    finally:
        node.stop()
    assert node.stats.studies == 3 and node.stats.stored == 6
    assert [e["event"] for e in events].count("study_received") == 3


def test_a_study_without_its_structure_set_waits_for_it(tmp_path):
    """A study committed before its RTSTRUCT arrived is not predicted (and not an error); the
    next commit that brings the RTSTRUCT is."""
    from engine.pacs.auto_predict import PredictionWorker

    files = [f for f in demo_files() if f.name != "RTSTRUCT.dcm"]
    head = pydicom.dcmread(files[0], stop_before_pixels=True)
    staging = StudyStore(tmp_path).begin(str(head.PatientID), str(head.StudyInstanceUID))
    for f in files:
        staging.add_file(f)
    study = staging.commit()
    worker = PredictionWorker(engine=None, results_root=tmp_path / "results")
    try:
        outcome = worker.handle(study)
    finally:
        worker.stop(5)
    assert outcome.status == "skipped" and "no RTSTRUCT yet" in outcome.message
    assert not (tmp_path / "results").exists()


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA and a node certificate for 127.0.0.1 it signed (openssl)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=DosePilot test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr",
        "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "node.pem", "-days", "2", "-extfile", "ext.cnf")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out",
        "other.pem", "-days", "2", "-subj", "/CN=Another CA")
    return {k: folder / v for k, v in (("ca", "ca.pem"), ("cert", "node.pem"),
                                       ("key", "node.key"), ("other_ca", "other.pem"))}


def test_tls_node_talks_tls_only(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    certs = _certificates(tmp_path)
    config = NodeConfig(aet="NODE", port=free_port(), allowed=(AllowedSender("TPS"),),
                        quiet_seconds=0.5, tls=TlsFiles(cert=certs["cert"], key=certs["key"]))
    studies = []
    node = StorageNode(config, StudyStore(tmp_path / "store"),
                       on_study=lambda s, _: studies.append(s))
    node.start()
    try:
        tls_node = RemoteNode("NODE", "127.0.0.1", config.port, tls=True)
        trusted = Client("TPS", Timeouts(2, 3, 5), TlsFiles(ca=certs["ca"]))
        assert echo(tls_node, trusted).seconds > 0
        items, _ = collect_files(demo_files()[:1])
        assert not send_files(tls_node, trusted, items).failed
        deadline = time.monotonic() + 10
        while not studies and time.monotonic() < deadline:
            time.sleep(0.05)
        assert studies and studies[0].total == 1
        with pytest.raises(AssociationAborted, match="TLS handshake"):
            echo(tls_node, Client("TPS", Timeouts(2, 3, 5), TlsFiles(ca=certs["other_ca"])))
        with pytest.raises(AssociationAborted, match="expects TLS"):
            echo(RemoteNode("NODE", "127.0.0.1", config.port), Client("TPS", Timeouts(2, 3, 5)))
    finally:
        node.stop()
