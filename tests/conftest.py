"""Shared fixtures. GUI tests run under Xvfb (see Makefile); pyvista renders off screen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_API", "pyside6")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def openkbp_dir() -> Path:
    """The shared OpenKBP cases; tests that need them skip with a clear message when absent."""
    path = SHARED_DATA / "openkbp"
    if not (path / "train").is_dir():
        pytest.skip(f"shared OpenKBP data not found at {path}")
    return path


@pytest.fixture(scope="session")
def phantom_dicom(tmp_path_factory):
    """A small phantom patient written as DICOM (CT, RTSTRUCT, RTPLAN, RTDOSE), read-only.

    ``.case`` is the ground truth, the other attributes the written paths. Tests that alter
    files work on a copy (``shutil.copytree``).
    """
    from engine.phantom import PhantomSpec, write_phantom

    return write_phantom(tmp_path_factory.mktemp("phantom"), PhantomSpec(with_dose=True))


@pytest.fixture(scope="session")
def physics_env() -> Path:
    """The isolated pyRadPlan interpreter; tests that need it skip, saying how to install it."""
    from engine.physics import PhysicsUnavailableError, physics_python

    try:
        return physics_python()
    except PhysicsUnavailableError as exc:
        pytest.skip(str(exc))
