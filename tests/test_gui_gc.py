"""Cyclic garbage is collected on the GUI thread only while a window is open (planner_gui.gui_gc).

Worker threads allocate a lot (reference DVHs on the qasync executor, the dose engine's thread);
with CPython's automatic collection they would also collect, and finalise Qt and VTK objects
there. ``benchmarks/gc_thread_stress.py`` shows the crashes that causes.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref

import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
]

from gui_helpers import PhysicsDoseEngine, make_case  # noqa: E402

from planner_gui import gui_gc  # noqa: E402
from planner_gui.main_window import MainWindow  # noqa: E402


class Cycle:
    """A reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def _allocate_containers(n: int) -> int:
    """What a worker does in a Python loop: many small container objects, kept for a while."""
    kept = [[i] for i in range(n)]
    return len(kept)


@pytest.fixture
def collections_by_thread():
    """Names of the threads that ran each garbage collection while the test ran."""
    threads: list[str] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            threads.append(threading.current_thread().name)

    gc.callbacks.append(record)
    yield threads
    gc.callbacks.remove(record)


def test_worker_allocations_are_collected_on_the_gui_thread(qtbot, aloop, gui_settings,
                                                            collections_by_thread):
    window = MainWindow(PhysicsDoseEngine(), settings=gui_settings)
    qtbot.addWidget(window)
    window.show()
    assert gui_gc.held() and not gc.isenabled()
    window.open_case(make_case())  # reference DVHs on the executor, a prediction on the engine's
    qtbot.waitUntil(lambda: window.controller.predictions_done == 1
                    and window.dvh_panel.reference_task.done(), timeout=20_000)
    # far more than the first generation's threshold, allocated off the GUI thread
    n = 50 * gc.get_threshold()[0]
    job = aloop.run_in_executor(None, _allocate_containers, n)
    qtbot.waitUntil(job.done, timeout=20_000)
    assert job.result() == n
    assert set(collections_by_thread) <= {threading.main_thread().name}, \
        f"collections ran in {sorted(set(collections_by_thread))}"
    # garbage past the first generation's threshold: the GUI thread's timer collects it
    garbage = [weakref.ref(Cycle()) for _ in range(2 * gc.get_threshold()[0])]
    qtbot.waitUntil(lambda: all(ref() is None for ref in garbage), timeout=5_000)
    assert set(collections_by_thread) == {threading.main_thread().name}
    window.close()
    assert not gui_gc.held() and gc.isenabled(), "closing the window restores automatic gc"


def test_the_last_release_collects_on_the_gui_thread(qtbot, collections_by_thread):
    gui_gc.hold()
    gui_gc.hold()
    garbage = weakref.ref(Cycle())
    gui_gc.release()
    assert gui_gc.held() and garbage() is not None
    gui_gc.release()
    assert garbage() is None and gc.isenabled()
    assert set(collections_by_thread) == {threading.main_thread().name}


def test_hold_and_release_are_checked(qtbot):
    with pytest.raises(RuntimeError, match="without a matching hold"):
        gui_gc.release()
    errors: list[Exception] = []

    def from_a_worker() -> None:
        try:
            gui_gc.hold()
        except RuntimeError as exc:
            errors.append(exc)

    worker = threading.Thread(target=from_a_worker)
    worker.start()
    worker.join()
    assert len(errors) == 1 and "GUI thread" in str(errors[0])
    assert not gui_gc.held() and gc.isenabled()
