"""Fault injection on real ``dosepilot`` subprocesses: freeze or kill them while they write, and
check what they leave on disk.

A process frozen with SIGSTOP leaves on disk exactly what a SIGKILL at that instant would leave
(neither runs the process's buffers or cleanup), so :func:`stop_and_inspect` checks many kill
points of one process: freeze, inspect every visible file, resume, and so on until it ends or is
killed. Used by the fault tests and by ``benchmarks/fault_injection.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.durable import is_temporary

REPO = Path(__file__).resolve().parents[1]


def dosepilot(*args: object) -> list[str]:
    """The command line of ``dosepilot ARGS`` with this interpreter (run from the repository)."""
    return [sys.executable, "-m", "engine.cli", *(str(a) for a in args)]


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of ``pid`` is stopped (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue
        if states and all(s in ("T", "t", "Z", "X") for s in states):
            return
        time.sleep(0.0005)
    raise TimeoutError(f"process {pid} did not stop")


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool],
              timeout_s: float = 120.0) -> bool:
    """SIGKILL ``proc`` at a moment when ``condition()`` holds: polled while it runs, then
    checked again with the process frozen (so it still held when the kill landed). False if
    the process ended first."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("the condition never held")
        if not condition():
            time.sleep(0.001)
            continue
        try:
            os.kill(proc.pid, signal.SIGSTOP)
            wait_stopped(proc.pid)
        except ProcessLookupError:
            break
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return True
        os.kill(proc.pid, signal.SIGCONT)
    proc.wait(timeout=60)
    return False


def checkpoint_files(run_dir: Path) -> tuple[list[int], list[str]]:
    """The steps of a training run's complete checkpoints, and what is wrong with any other
    file there: every manifest must verify (size and SHA-256 of its tensors) and every tensor
    file must load; only temporaries (never read) may be partial."""
    from safetensors.torch import load_file

    from trainer import checkpointing

    steps, problems = [], []
    folder = checkpointing.checkpoint_dir(run_dir)
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if is_temporary(path.name):
            continue
        if path.suffix == ".json":
            problem, found = checkpointing._verify(path)
            if found is None:
                problems.append(f"{path.name}: {problem}")
            else:
                steps.append(found.step)
        elif path.suffix == ".safetensors":
            try:
                load_file(str(path))
            except Exception as exc:  # noqa: BLE001 - any failure to load is a broken file
                problems.append(f"{path.name}: {exc}")
        else:
            problems.append(f"{path.name}: not a checkpoint file")
    return steps, problems


def dicom_signature(path: Path) -> tuple:
    """What a complete DICOM file of this writer holds, independent of UIDs and times: every
    element's tag (nested ones too) and the pixel data length. Raises on an unreadable file."""
    import pydicom

    ds = pydicom.dcmread(path)
    tags = tuple(int(e.tag) for e in ds.iterall())
    pixels = len(ds.PixelData) if "PixelData" in ds else 0
    if pixels:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = ds.Rows * ds.Columns * frames * ds.BitsAllocated // 8
        if pixels != expected:
            raise ValueError(f"{path.name}: {pixels} pixel bytes, {expected} expected")
    return tags, pixels


def check_complete(path: Path, reference: dict[str, object]) -> None:
    """Raise unless ``path`` is a complete file: DICOM files and CSV tables are compared with
    ``reference`` (file name -> :func:`dicom_signature` or line count of the same file written
    by an uninterrupted run), the others must parse whole."""
    suffix = path.suffix.lower()
    if suffix == ".dcm":
        if dicom_signature(path) != reference[path.name]:
            raise ValueError("its elements differ from the complete file's (truncated?)")
    elif suffix == ".npy":
        np.load(path)  # raises on a short file: the header states the shape
    elif suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    elif suffix == ".csv":
        text = path.read_text(encoding="utf-8")
        if not text.endswith("\n") or len(text.splitlines()) != reference[path.name]:
            raise ValueError(f"{len(text.splitlines())} lines, the complete file has "
                             f"{reference[path.name]}")
    elif suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            im.load()
    else:
        raise ValueError("a file this writer does not write")


def reference_of(root: Path) -> dict[str, object]:
    """:func:`check_complete`'s reference from the files of an uninterrupted run."""
    ref: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() == ".dcm":
            ref[p.name] = dicom_signature(p)
        elif p.is_file() and p.suffix.lower() == ".csv":
            ref[p.name] = len(p.read_text(encoding="utf-8").splitlines())
    return ref


def visible_files(root: Path) -> list[Path]:
    """The files under ``root`` a user (or DosePilot's folder scanner) sees: not temporaries,
    nor inside a temporary folder."""
    if not root.exists():
        return []
    return [p for p in sorted(root.rglob("*")) if p.is_file()
            and not any(is_temporary(part) for part in p.relative_to(root).parts)]


@dataclass
class Inspection:
    """What :func:`stop_and_inspect` saw."""

    stops: int = 0
    killed: bool = False
    returncode: int | None = None
    partial: list[str] = field(default_factory=list)     # "stop N: file: why"
    temporaries_seen: int = 0
    complete_files: int = 0


def inspect_folder(root: Path, reference: dict[str, object], seen: dict[Path, tuple],
                   report: Inspection, label: str) -> None:
    """Check every visible file under ``root`` once per (size, mtime)."""
    if root.exists():
        report.temporaries_seen += sum(is_temporary(p.name) for p in root.rglob("*"))
    for p in visible_files(root):
        st = p.stat()
        key = (st.st_size, st.st_mtime_ns)
        if seen.get(p) == key:
            continue
        try:
            check_complete(p, reference)
        except Exception as exc:  # noqa: BLE001 - any failure to read is a partial file
            report.partial.append(f"{label}: {p.relative_to(root)}: {type(exc).__name__}: {exc}")
            continue
        seen[p] = key


def stop_and_inspect(proc: subprocess.Popen, root: Path, reference: dict[str, object],
                     started: Callable[[], bool], rng: random.Random,
                     interval_s: tuple[float, float] = (0.0, 0.01),
                     kill_if: Callable[[Inspection], bool] | None = None,
                     timeout_s: float = 300.0) -> Inspection:
    """Freeze ``proc`` at random intervals once ``started()`` is true; at each stop check every
    file under ``root``, then SIGKILL it if ``kill_if(report)`` says so, else let it run on.

    Between two stops the process runs at most ``interval_s[1]`` seconds, so a phase of it
    that lasts longer (writing a file) cannot pass unseen.
    """
    report = Inspection()
    seen: dict[Path, tuple] = {}
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and not started():
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("the process never started writing")
        time.sleep(0.001)
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(rng.uniform(*interval_s))
        try:
            os.kill(proc.pid, signal.SIGSTOP)
            wait_stopped(proc.pid)
        except (ProcessLookupError, TimeoutError):
            break
        report.stops += 1
        inspect_folder(root, reference, seen, report, f"stop {report.stops}")
        if kill_if is not None and kill_if(report):
            os.kill(proc.pid, signal.SIGKILL)
            report.killed = True
            break
        os.kill(proc.pid, signal.SIGCONT)
    if proc.poll() is None and not report.killed:
        proc.kill()
        raise TimeoutError("the process did not finish")
    report.returncode = proc.wait(timeout=60)
    inspect_folder(root, reference, {}, report, "after the end")
    report.complete_files = len(visible_files(root))
    return report


class SmallDevice:
    """A small tmpfs mounted at ``path`` (needs root), to be filled up: the real "no space left
    on device" of a full disk, not a simulation. Use as a context manager; it unmounts."""

    def __init__(self, path: Path, size_mib: int = 64) -> None:
        self.path = Path(path)
        self.size_mib = size_mib
        self.filler = self.path / "filler.bin"

    @staticmethod
    def unavailable() -> str:
        """Why no tmpfs can be mounted here ("" when it can)."""
        if os.geteuid() != 0:
            return "mounting a small tmpfs to fill up needs root"
        return ""

    def __enter__(self) -> SmallDevice:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mib}m", "tmpfs",
                               str(self.path)], capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"cannot mount a tmpfs at {self.path}: {done.stderr.strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)

    def fill(self, leave_bytes: int = 0) -> None:
        """Write a filler file until only ``leave_bytes`` (rounded to pages) are free."""
        st = os.statvfs(self.path)
        todo = st.f_bavail * st.f_frsize - leave_bytes
        chunk = b"\0" * (1 << 20)
        with open(self.filler, "ab", buffering=0) as f:
            try:
                while todo > 0:
                    todo -= f.write(chunk[:min(len(chunk), todo)])
            except OSError:  # full: what leave_bytes == 0 asks for
                pass

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def empty(self) -> None:
        """Make room again (remove the filler)."""
        self.filler.unlink(missing_ok=True)
