"""Turning a path the user picked into a :class:`Case`, with errors a planner can read.

An OpenKBP dataset case (a folder holding ``ct.csv``, or a ``.npz`` file) is read by
``engine.io.openkbp``; anything else is read as DICOM (CT, RTSTRUCT, RTPLAN, RTDOSE). Runs on a
worker thread: no Qt here.
"""

from __future__ import annotations

from pathlib import Path

from engine.case import Case
from engine.resources import resource_path


class CaseLoadError(Exception):
    """A patient could not be opened; the message says what is wrong and where."""


def is_openkbp_case(path: Path) -> bool:
    return (path.is_dir() and (path / "ct.csv").is_file()) or (
        path.is_file() and path.suffix == ".npz")


def load_case(path: str | Path) -> Case:
    """Load the patient at ``path`` (a DICOM folder or file, or an OpenKBP case folder)."""
    path = Path(path)
    if not path.exists():
        raise CaseLoadError(f"{path} does not exist.")
    if is_openkbp_case(path):
        from engine.io.openkbp import OpenKBPFormatError, load_openkbp  # noqa: PLC0415

        try:
            return load_openkbp(path)
        except OpenKBPFormatError as exc:
            raise CaseLoadError(f"Not a readable OpenKBP case: {exc}") from exc
    try:
        from engine.io.dicom import DicomImportError, load_dicom_case  # noqa: PLC0415
    except ImportError as exc:
        raise CaseLoadError(f"DICOM import is not available in this installation ({exc}).") \
            from exc
    try:
        return load_dicom_case(path)
    except DicomImportError as exc:
        raise CaseLoadError(str(exc)) from exc


def demo_path() -> Path:
    """The bundled demo patient's folder (FileNotFoundError naming it when missing)."""
    return resource_path("demo")
