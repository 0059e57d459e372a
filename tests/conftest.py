"""Shared fixtures. GUI tests run under Xvfb (see Makefile); pyvista renders off screen."""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_API", "pyside6")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

_crash_log = None


def pytest_configure(config):
    """With ``DOSEPILOT_CRASH_LOG`` set (``make test`` sets it), a native crash of the test
    process (segfault, abort) leaves in that file the test that was running and every thread's
    stack. CI keeps only the tail of the output, where faulthandler's report on stderr names no
    test: the Makefile prints this file's end instead. Under pytest-xdist each worker keeps its
    own file, ``<path>.<worker>`` (``gw0``, ``gw1``, ...)."""
    global _crash_log
    path = os.environ.get("DOSEPILOT_CRASH_LOG")
    # config.workerinput, not the environment: a pytest a test starts inherits PYTEST_XDIST_WORKER
    worker = getattr(config, "workerinput", {}).get("workerid")
    if path and worker:
        path = f"{path}.{worker}"
    elif path and getattr(config.option, "numprocesses", None):
        return  # the xdist controller runs no test
    if path and _crash_log is None:
        _crash_log = open(path, "w", encoding="utf-8")  # noqa: SIM115 - open until exit
        faulthandler.enable(_crash_log, all_threads=True)


def pytest_runtest_logstart(nodeid, location):
    if _crash_log is not None:
        _crash_log.write(f"running {nodeid}\n")
        _crash_log.flush()


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


# ---- GUI (planner_gui) --------------------------------------------------------------------
# One qasync loop for the whole session, marked running only while a test that asks for it
# runs, so asyncio tasks advance whenever qtbot spins Qt and other tests can still use
# asyncio.run(). Never stop() it: that calls QApplication.exit() and later loops' timers never
# fire (notes/qt-vtk-headless.md §3.3).
@pytest.fixture(scope="session")
def _qasync_loop(qapp):
    import asyncio

    import pyvista as pv
    import qasync

    pv.OFF_SCREEN = True
    pv.global_theme.multi_samples = 0
    loop = qasync.QEventLoop(qapp, already_running=True)
    loop._QEventLoop__is_running = False
    asyncio.events._set_running_loop(None)
    yield loop
    loop.close()


@pytest.fixture
def aloop(_qasync_loop):
    import asyncio

    from PySide6.QtWidgets import QApplication

    loop = _qasync_loop
    loop._QEventLoop__is_running = True
    asyncio.events._set_running_loop(loop)
    asyncio.set_event_loop(loop)
    yield loop
    for task in [t for t in asyncio.all_tasks(loop) if not t.done()]:
        task.cancel()
    for _ in range(3):
        QApplication.processEvents()
    loop._QEventLoop__is_running = False
    asyncio.events._set_running_loop(None)
    asyncio.set_event_loop(None)


@pytest.fixture
def gui_settings(tmp_path):
    """Window settings (recent patients) in a temporary INI file, not the user's."""
    from PySide6 import QtCore

    return QtCore.QSettings(str(tmp_path / "dosepilot.ini"), QtCore.QSettings.Format.IniFormat)


@pytest.fixture(scope="session")
def tiny_dose_bundle(tmp_path_factory) -> Path:
    """A small real DiffKT3D dose-model bundle (DiT + VAE + tiny codec) with random weights.

    The networks are tiny but of the real architectures, so the engine runs its real path at the
    full 97 x 128 x 160 model grid in about a second per step on a 2-core CPU.
    """
    import torch

    from engine.dose_model import save_dose_model
    from engine.features import Normalization
    from engine.models.dit import DiffKT3D, DiTConfig
    from engine.models.tiny_codec import TinyCodec, TinyCodecConfig
    from engine.models.vae import VAEConfig, WanVAE

    torch.manual_seed(0)
    dit = DiffKT3D(DiTConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=64))
    with torch.no_grad():  # make the untrained DiT's output depend on its inputs
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae = WanVAE(VAEConfig(name="test", base_dim=4, num_res_blocks=1))
    codec = TinyCodec(TinyCodecConfig(name="test", hidden=8, mid=4, encoder_blocks=1,
                                      decoder_blocks=1))
    path = tmp_path_factory.mktemp("dose_model") / "bundle"
    return save_dose_model(path, dit, vae, codec, normalisation=Normalization().to_dict(),
                           provenance={"note": "random weights, for tests"})


@pytest.fixture(scope="session")
def physics_env() -> Path:
    """The isolated pyRadPlan interpreter; tests that need it skip, saying how to install it."""
    from engine.physics.dose_calc import PhysicsUnavailableError, physics_python

    try:
        return physics_python()
    except PhysicsUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run a module's tiny networks on one torch thread (pool overhead dominates otherwise,
    badly so on a loaded 2-core machine); restores the previous count afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- PACS: a real Orthanc server ----------------------------------------------------------------
DEMO = REPO / "resources" / "demo"


def demo_files() -> list[Path]:
    """The demo patient's DICOM files (128 CT, RTSTRUCT, RTPLAN, RTDOSE)."""
    return sorted(DEMO.rglob("*.dcm"))


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc on free localhost ports (temporary configuration and storage) holding the
    demo patient; stopped after the session. Skips when Orthanc is not installed."""
    from orthanc_server import OrthancServer, orthanc_binary

    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc, or make system): the "
                    "PACS tests run against a real DICOM server")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    try:
        server.upload(demo_files())
        yield server
    finally:
        server.stop()


@pytest.fixture
def sent_to_orthanc(orthanc):
    """SOP Instance UIDs a test stores into the shared Orthanc; removed afterwards, so every
    test finds the demo patient as it was (131 objects)."""
    uids: list[str] = []
    yield uids
    for uid in uids:
        orthanc.delete_instance(uid)
    assert orthanc.get("/statistics")["CountInstances"] == 131
