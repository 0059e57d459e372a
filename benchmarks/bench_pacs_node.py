"""DosePilot as a DICOM node: studies per minute received, and predicted and sent back (issue 18).

Starts ``dosepilot listen`` as a subprocess (its ``--json`` events timestamped as they arrive)
twice, each time fed the same way: ``--studies`` copies of the demo patient (131 objects, 10 MB;
each copy with new patient, study, series, instance and frame-of-reference UIDs, references
rewritten to match, so they are different studies) sent one after the other by a C-STORE client
(``engine.pacs.send``, one association per study, as a TPS exports):

1. **receive**: the node only stores. A study counts once the node reports it complete (the
   quiet period ``--quiet`` after its last object). Studies per minute received =
   studies / (first object sent -> last study complete).
2. **predict**: ``--predict`` with the shipped model (``--steps``, or ``--preview``) and
   ``--return-to`` a Storage SCP in this process. Studies per minute predicted =
   studies / (first object sent -> last RTDOSE back), and per study the latency from its last
   object sent to its RTDOSE back.

The machine: single-thread fp32 GEMM rate (``engine.commands.bench_cmd.gemm_gflops``, the
``gemm_gflops`` of ``dosepilot bench --json``), CPU model, cores and load average.

    python -m benchmarks.bench_pacs_node [--studies 5] [--quiet 3] [--steps 10 | --preview]
                                          [--threads 1] [--storescu] [--skip-receive] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "resources" / "demo"
INSTANCE_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                         "FrameOfReferenceUID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_demo(out: Path, index: int) -> Path:
    """The demo patient with new UIDs (all references follow) and patient ID ``bench_<i>``."""
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted(DEMO.rglob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    mapping: dict[str, str] = {}
    for ds in datasets:
        for kw in INSTANCE_UID_KEYWORDS:
            if kw in ds:
                mapping.setdefault(str(ds.data_element(kw).value), generate_uid())

    def rewrite(ds) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    rewrite(item)
            elif elem.VR == "UI" and str(elem.value) in mapping:
                elem.value = mapping[str(elem.value)]

    folder = out / f"study_{index}"
    folder.mkdir(parents=True)
    for f, ds in zip(files, datasets):
        rewrite(ds)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = f"bench_{index}"
        ds.PatientName = f"BENCH^{index}"
        ds.save_as(folder / f.name, enforce_file_format=True)
    return folder


class ReturnScp:
    """Receives the node's results; remembers when each RTDOSE arrived, by study."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port = free_port()
        self.doses: queue.Queue[tuple[str, float]] = queue.Queue()
        ae = AE("RETURN")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        ds = event.dataset
        if ds.Modality == "RTDOSE":
            self.doses.put((str(ds.StudyInstanceUID), time.monotonic()))
        return 0x0000


class Node:
    """``dosepilot listen`` with its JSON events timestamped."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.events: queue.Queue[tuple[float, dict]] = queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "listen", *args, "--json"], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.events.put((time.monotonic(), json.loads(line)))
            except ValueError:
                pass

    def wait(self, kind: str, timeout: float) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        while True:
            t, event = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            if event["event"] == kind:
                return t, event

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def run(studies: list[Path], mode: str, args: argparse.Namespace) -> dict:
    import pydicom

    from engine.pacs.association import Client
    from engine.pacs.nodes import RemoteNode, Timeouts
    from engine.pacs.send import collect_files, send_files

    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-node-"))
    node_args = ["--port", str(port), "--aet", "DOSEPILOT", "--store", str(tmp / "store"),
                 "--allow", "TPS", "--quiet-seconds", str(args.quiet),
                 "--settings", str(tmp / "none.json")]
    scp = None
    if mode == "predict":
        scp = ReturnScp()
        node_args += ["--predict", "--threads", str(args.threads), "--return-to",
                      f"RETURN@127.0.0.1:{scp.port}"]
        node_args += ["--preview"] if args.preview else ["--steps", str(args.steps)]
    t_launch = time.monotonic()
    node = Node(node_args)
    try:
        t_ready, _ = node.wait("listening", 300)
        remote = RemoteNode("DOSEPILOT", "127.0.0.1", port)
        client = Client("TPS", Timeouts(5, 30, 120))
        sent_at: dict[str, float] = {}
        t0 = time.monotonic()
        for folder in studies:
            items, _ = collect_files([folder])
            if args.storescu:  # pynetdicom's stock C-STORE client, as another system would send
                subprocess.run([sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1",
                                str(port), str(folder), "-r", "-aet", "TPS", "-aec", "DOSEPILOT"],
                               check=True, capture_output=True, timeout=600)
            else:
                report = send_files(remote, client, items)
                assert not report.failed, report.failed
            uid = str(pydicom.dcmread(items[0].path, stop_before_pixels=True).StudyInstanceUID)
            sent_at[uid] = time.monotonic()
        t_sent = time.monotonic()
        done: dict[str, float] = {}
        outcomes = []
        while len(done) < len(studies):
            if mode == "receive":
                t, event = node.wait("study_received", 600)
                done[event["study_instance_uid"]] = t
            else:
                t, event = node.wait("prediction", 1800)
                outcomes.append(event)
                if event["status"] != "sent":  # e.g. a study split by a pause in the sending
                    print(f"  {event['status']}: {event['message']}", file=sys.stderr)
                    continue
                uid, t_back = scp.doses.get(timeout=60)
                done[uid] = t_back
        t_end = max(done.values())
    finally:
        node.stop()
        if scp is not None:
            scp.server.shutdown()
    n = len(studies)
    result = {
        "mode": mode, "studies": n, "objects_per_study": 131,
        "node_start_s": t_ready - t_launch,
        "send_s": t_sent - t0,
        "first_object_to_last_done_s": t_end - t0,
        "studies_per_minute": 60.0 * n / (t_end - t0),
        "latency_last_object_to_done_s": sorted(done[u] - sent_at[u] for u in done),
    }
    if outcomes:
        result["node_timings_s"] = [o["timings_s"] for o in outcomes if o["status"] == "sent"]
        result["not_sent"] = [f"{o['status']}: {o['message']}" for o in outcomes
                              if o["status"] != "sent"]
    return result


def machine() -> dict:
    from engine.commands.bench_cmd import gemm_gflops

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "gemm_gflops": gemm_gflops(),
            "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--quiet", type=float, default=3.0, help="node quiet period (s)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--preview", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-receive", action="store_true")
    parser.add_argument("--storescu", action="store_true",
                        help="send with pynetdicom's storescu (a process per study) instead of "
                             "engine.pacs.send")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "sender": "storescu" if args.storescu else "engine.pacs.send",
              "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-studies-") as tmp:
        studies = [copy_demo(Path(tmp), i) for i in range(args.studies)]
        if not args.skip_receive:
            report["runs"].append(run(studies, "receive", args))
        report["runs"].append(run([copy_demo(Path(tmp) / "p", i) for i in
                                   range(args.studies)], "predict", args))
    report["machine"]["load_average_end"] = os.getloadavg()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, single-thread fp32 GEMM "
          f"{m['gemm_gflops']:.0f} GFLOP/s, load {m['load_average'][0]:.2f} -> "
          f"{m['load_average_end'][0]:.2f}")
    for r in report["runs"]:
        lat = r["latency_last_object_to_done_s"]
        print(f"{r['mode']}: {r['studies']} studies in {r['first_object_to_last_done_s']:.1f} s "
              f"= {r['studies_per_minute']:.1f} studies/min (sending took {r['send_s']:.1f} s); "
              f"last object -> done: median {lat[len(lat) // 2]:.1f} s, "
              f"min {lat[0]:.1f}, max {lat[-1]:.1f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
