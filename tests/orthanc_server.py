"""A real Orthanc DICOM server for the PACS tests: its own process on free localhost ports, a
temporary configuration and storage, stopped (and its files removed) afterwards.

Only the REST API (``urllib``) and DICOM talk to it. Tests that need it skip with a clear
message when the ``Orthanc`` binary is absent (``apt-get install orthanc``; ``make system``
installs it).
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC_AET = "ORTHANC"
CLIENT_AET = "DOSEPILOT"


def orthanc_binary() -> str | None:
    """The Orthanc executable, or None."""
    return shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """One Orthanc process; ``move_port`` is where it sends C-MOVEs for AE ``DOSEPILOT``."""

    def __init__(self, folder: Path, move_port: int | None = None) -> None:
        self.folder = Path(folder)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.move_port = move_port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = self.folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        storage = self.folder / "storage"
        return {
            "Name": "DosePilotTest",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomModalities": {
                "dosepilot": {"AET": CLIENT_AET, "Host": "127.0.0.1", "Port": self.move_port},
            },
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAssociationCloseDelay": 0,
            "DicomScuTimeout": 10,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "UnknownSopClassAccepted": False,
        }

    def start(self, timeout: float = 60.0) -> OrthancServer:
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=1))
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([binary, str(config)], stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: "
                                   + self.log_path.read_text(errors="replace")[-2000:])
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout} s")

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled cable would end it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    # ---- REST ---------------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def upload(self, files: list[Path]) -> int:
        """Store files through the REST API (one HTTP connection); returns how many."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        try:
            for f in files:
                conn.request("POST", "/instances", body=Path(f).read_bytes(),
                             headers={"Content-Type": "application/dicom"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"Orthanc refused {f}: HTTP {response.status}")
        finally:
            conn.close()
        return len(files)

    def instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """The simplified tags of the instance with that SOP Instance UID, or None."""
        ids = self.post("/tools/find", {"Level": "Instance",
                                        "Query": {"SOPInstanceUID": sop_instance_uid}})
        if not ids:
            return None
        return self.get(f"/instances/{ids[0]}/simplified-tags")

    def delete_instance(self, sop_instance_uid: str) -> bool:
        """Remove the instance with that SOP Instance UID (True when there was one)."""
        ids = self.post("/tools/find", {"Level": "Instance",
                                        "Query": {"SOPInstanceUID": sop_instance_uid}})
        for orthanc_id in ids:
            req = urllib.request.Request(f"{self.url}/instances/{orthanc_id}", method="DELETE")
            urllib.request.urlopen(req, timeout=30).close()
        return bool(ids)

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Simplified tags of every instance of a study."""
        ids = self.post("/tools/find", {"Level": "Study",
                                        "Query": {"StudyInstanceUID": study_uid}})
        out = []
        for study in ids:
            for inst in self.get(f"/studies/{study}/instances"):
                out.append(self.get(f"/instances/{inst['ID']}/simplified-tags"))
        return out
