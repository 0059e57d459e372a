"""Running a PACS operation off the UI thread and following it from the UI thread.

The engine's PACS functions block (network) and report progress from their own threads; a
:class:`BackgroundJob` runs one in a small pool of its own and keeps its latest progress in a
plain attribute that a :class:`QtCore.QTimer` reads on the UI thread, so no Qt object is touched
from a worker thread. The pool is not the event loop's default executor: a search or retrieve
mostly waits on the network and must not queue behind the dose computations, loads and beam
searches that the rest of the window runs there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PySide6 import QtCore

POLL_MS = 100
_NETWORK = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pacs")


class BackgroundJob(QtCore.QObject):
    """One blocking call in the PACS jobs' pool; ``progress`` is polled, ``done`` fires on the UI
    thread with ``(result, error)`` (exactly one of them not None)."""

    done = QtCore.Signal(object, object)
    progressed = QtCore.Signal(object)

    def __init__(self, parent: QtCore.QObject | None = None) -> None:
        super().__init__(parent)
        self.cancel = threading.Event()
        self.future: asyncio.Future | None = None
        self._progress: Any = None
        self._shown: Any = None
        self._timer = QtCore.QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)

    @property
    def running(self) -> bool:
        """Whether the job is still running."""
        return self.future is not None and not self.future.done()

    def report(self, value: Any) -> None:
        """Called from the worker thread: remember the latest progress."""
        self._progress = value

    def start(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run ``fn()`` in the PACS jobs' pool (``fn`` may call :meth:`report` and watch
        :attr:`cancel`)."""
        self.cancel.clear()
        self._progress = self._shown = None
        self.future = asyncio.get_event_loop().run_in_executor(_NETWORK, fn)
        self.future.add_done_callback(self._finished)
        self._timer.start()
        return self.future

    def _poll(self) -> None:
        value = self._progress
        if value is not None and value is not self._shown:
            self._shown = value
            self.progressed.emit(value)

    def _finished(self, future: asyncio.Future) -> None:
        self._timer.stop()
        self._poll()
        if future.cancelled():
            self.done.emit(None, RuntimeError("cancelled"))
            return
        exc = future.exception()
        self.done.emit(None if exc else future.result(), exc)
