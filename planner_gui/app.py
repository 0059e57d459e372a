"""Starting the desktop application: Qt application, asyncio loop (qasync), main window, and
the dose engine loaded in the background so the window is interactive at once."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_API", "pyside6")


def run(path: str | Path | None = None, demo: bool = False, checkpoint: str | None = None,
        screenshot: str | None = None) -> int:
    """Open the main window (on ``path`` or the demo patient) and run until it is closed.

    ``screenshot``: save the window to this PNG once the first full prediction is shown and
    quit (for documentation and smoke tests).
    """
    import qasync
    from PySide6 import QtCore, QtWidgets

    from planner_gui.engine_api import load_dose_engine
    from planner_gui.main_window import MainWindow

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    app.setApplicationName("DosePilot")
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    window = MainWindow()
    window.show()
    closed = asyncio.Event()
    app.aboutToQuit.connect(closed.set)

    async def load_engine() -> None:
        window.statusBar().showMessage("Loading the dose model …")
        engine, message = await loop.run_in_executor(None, load_dose_engine, checkpoint)
        window.set_engine(engine, message)

    if screenshot:
        def on_result(result: object) -> None:
            if result is not None and result.kind == "predict":
                QtCore.QTimer.singleShot(300, lambda: (window.grab().save(screenshot),
                                                       window.close()))
        window.session.result_changed.connect(on_result)
    if demo:
        window.open_demo()
    elif path:
        window.open_path(path)
    loop.create_task(load_engine())
    with loop:
        loop.run_until_complete(closed.wait())
    return 0
