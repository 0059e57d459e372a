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


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run a module's tiny networks on one torch thread (pool overhead dominates otherwise,
    badly so on a loaded 2-core machine); restores the previous count afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
