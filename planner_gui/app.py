"""Starting the desktop application: Qt application, asyncio loop (qasync), main window, and
the dose engine loaded in the background so the window is interactive at once."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_API", "pyside6")
log = logging.getLogger(__name__)
READY_MESSAGE = "window ready"


def run(path: str | Path | None = None, demo: bool = False, checkpoint: str | None = None,
        screenshot: str | None = None) -> int:
    """Open the main window (on ``path`` or the demo patient) and run until it is closed.

    ``screenshot``: save the window to this PNG and quit once the patient is shown with its
    first full prediction (or, without a dose engine, once the patient is shown); for
    documentation and smoke tests.
    """
    import qasync
    from PySide6 import QtCore, QtWidgets

    from planner_gui.engine_api import load_dose_engine
    from planner_gui.main_window import MainWindow

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    app.setApplicationName("DosePilot")
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    started = time.perf_counter()
    window = MainWindow()
    window.show()

    def announce_ready(*_: object) -> None:
        # after the next paint: the patient is on screen and the loop is taking input
        QtCore.QTimer.singleShot(0, lambda: log.info(
            "%s after %.2f s in run()", READY_MESSAGE, time.perf_counter() - started))

    if demo or path:
        window.case_loaded.connect(announce_ready)
        window.error_shown.connect(announce_ready)
    else:
        announce_ready()
    closed = asyncio.Event()
    app.aboutToQuit.connect(closed.set)

    async def load_engine() -> None:
        window.statusBar().showMessage("Loading the dose model …")
        engine, message = await loop.run_in_executor(None, load_dose_engine, checkpoint)
        window.set_engine(engine, message)
        window.statusBar().showMessage("Dose model loaded" if engine is not None else message)

    if screenshot:
        def save_and_quit() -> None:
            window.grab().save(screenshot)
            window.close()

        def on_result(result: object) -> None:
            if result is not None and result.kind == "predict":
                QtCore.QTimer.singleShot(500, save_and_quit)

        async def without_engine() -> None:
            await engine_task
            if not window.controller.available:
                while window.session.case is None and window.last_error == "":
                    await asyncio.sleep(0.1)
                if window.dvh_panel.reference_task is not None:
                    await window.dvh_panel.reference_task
                QtCore.QTimer.singleShot(500, save_and_quit)

        window.session.result_changed.connect(on_result)
    if demo:
        window.open_demo()
    elif path:
        window.open_path(path)
    engine_task = loop.create_task(load_engine())
    if screenshot:
        loop.create_task(without_engine())
    with loop:
        loop.run_until_complete(closed.wait())
    return 0
