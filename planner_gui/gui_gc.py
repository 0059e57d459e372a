"""Python's cyclic garbage collector on the GUI thread only, while a window is open.

CPython starts an automatic collection in whichever thread allocates when a generation's
threshold is crossed. In the planner that is often a worker thread: the qasync executor
computing reference DVHs (``engine.metrics.occupancy`` allocates thousands of small containers)
or the dose engine's thread. That collection finalises all cyclic garbage present at the time,
including Qt widgets and VTK objects of closed views (pyvista's interactor style is such a cycle
in every closed 3D view); their C++ destructors then run off the GUI thread while the GUI thread
paints, which corrupts Qt's and the allocator's state and ends in a segfault or a glibc abort
("Fatal Python error: Aborted" in a worker thread). ``benchmarks/gc_thread_stress.py`` shows it.

While at least one hold is taken (:func:`hold`, one per main window), automatic collection is
off and a timer on the GUI thread collects with the interpreter's own generation thresholds,
like pyqtgraph's ``GarbageCollector``. The last :func:`release` collects the remaining garbage
on the GUI thread and restores automatic collection.
"""

from __future__ import annotations

import gc

from PySide6 import QtCore

INTERVAL_MS = 200


class GuiThreadCollector(QtCore.QObject):
    """Runs ``gc.collect`` for the generations whose thresholds were crossed, on a timer of the
    thread that creates it (the GUI thread)."""

    def __init__(self, interval_ms: int = INTERVAL_MS) -> None:
        super().__init__()
        self.thresholds = gc.get_threshold()
        self.collections = [0, 0, 0]  # per generation, for diagnostics and tests
        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.check)

    def check(self) -> None:
        """Collect as the automatic collector would have since the last tick."""
        counts = gc.get_count()
        generation = -1
        for g in range(3):
            if counts[g] <= self.thresholds[g]:
                break
            generation = g
        if generation >= 0:
            gc.collect(generation)
            self.collections[generation] += 1


_holders = 0
_was_enabled = True
_collector: GuiThreadCollector | None = None


def _require_gui_thread(what: str) -> None:
    app = QtCore.QCoreApplication.instance()
    if app is None or QtCore.QThread.currentThread() is not app.thread():
        raise RuntimeError(f"gui_gc.{what}() must be called on the GUI thread")


def hold() -> GuiThreadCollector:
    """Collect garbage on the GUI thread only until the matching :func:`release`."""
    global _holders, _was_enabled, _collector
    _require_gui_thread("hold")
    if _holders == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
        _collector = GuiThreadCollector()
        _collector.timer.start()
    _holders += 1
    return _collector


def release() -> None:
    """Drop one hold; the last one collects here and restores automatic collection."""
    global _holders, _collector
    _require_gui_thread("release")
    if _holders == 0:
        raise RuntimeError("gui_gc.release() without a matching hold()")
    _holders -= 1
    if _holders == 0:
        _collector.timer.stop()
        _collector.deleteLater()
        _collector = None
        gc.collect()
        if _was_enabled:
            gc.enable()


def held() -> bool:
    """True while garbage is collected on the GUI thread only."""
    return _holders > 0
