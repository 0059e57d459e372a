"""Running the dose engine off the UI thread, latest request wins.

While a planner drags a beam, every new plan asks for a 1-step preview; only the newest request
runs to completion: waiting requests are dropped, a running prediction is asked to stop through
its ``threading.Event`` and its late result is discarded (a generation counter). Work runs on a
single worker thread; results and progress come back on the event loop's thread (the Qt thread
under qasync), so handlers may touch widgets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from planner_gui.engine_api import DoseEngineLike
from planner_gui.session import Session
from planner_gui.signals import Signal

log = logging.getLogger(__name__)


WORKER_NICENESS = 5


def _lower_thread_priority() -> None:
    """Let the UI thread win the CPU over the inference thread (Linux: per-thread nice)."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
        except OSError:
            log.debug("could not lower the inference thread's priority")


class LatestWinsRunner:
    """Run ``fn(*args, cancel_event)`` on one worker thread; a newer submit supersedes older ones.

    ``submit`` returns an asyncio task that resolves to the result, or is cancelled when a newer
    request superseded it. ``debounce_s`` lets bursts of requests (mouse moves) collapse.
    """

    def __init__(self, debounce_s: float = 0.03) -> None:
        self.debounce_s = debounce_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dose-engine",
                                            initializer=_lower_thread_priority)
        self._generation = 0
        self._task: asyncio.Task | None = None
        self._cancel: threading.Event | None = None
        self.started = 0
        self.completed = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Task:
        self._generation += 1
        self.cancel_pending()
        self._cancel = threading.Event()
        loop = asyncio.get_event_loop()
        self._task = loop.create_task(self._run(self._generation, self._cancel, fn, args))
        return self._task

    def cancel_pending(self) -> None:
        """Drop the waiting request and ask the running one to stop."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._cancel is not None:
            self._cancel.set()

    async def _run(self, generation: int, cancel: threading.Event,
                   fn: Callable[..., Any], args: tuple) -> Any:
        await asyncio.sleep(self.debounce_s)
        if generation != self._generation:
            raise asyncio.CancelledError("superseded before it started")
        self.started += 1
        loop = asyncio.get_event_loop()
        result = await loop.run_in_executor(self._executor, fn, *args, cancel)
        if generation != self._generation or cancel.is_set():
            raise asyncio.CancelledError("superseded while running; result dropped")
        self.completed += 1
        return result

    def shutdown(self) -> None:
        self.cancel_pending()
        self._executor.shutdown(wait=False, cancel_futures=True)


class DoseController:
    """Connects a :class:`Session` to a dose engine: transient plans get previews, committed
    plans a full prediction with progress.

    Signals (all emitted on the event loop's thread):
        busy_changed(kind): "preview" or "predict" while running, "" when idle.
        progress(done, total): steps of the running full prediction.
        failed(message): the engine raised; the message is for the user.
    """

    def __init__(self, session: Session, engine: DoseEngineLike | None,
                 steps: int = 10, seeds: tuple[int, ...] = (0,)) -> None:
        self.session = session
        self.engine = engine
        self.steps = steps
        self.seeds = seeds
        self.runner = LatestWinsRunner()
        self.busy_changed = Signal()
        self.progress = Signal()
        self.failed = Signal()
        self.previews_done = 0
        self.predictions_done = 0
        self.busy = ""
        self.busy_changed.connect(lambda kind: setattr(self, "busy", kind))
        session.plan_changed.connect(self._on_plan_changed)

    @property
    def available(self) -> bool:
        return self.engine is not None

    def set_engine(self, engine: DoseEngineLike | None) -> None:
        self.runner.cancel_pending()
        self.engine = engine

    def _on_plan_changed(self, plan: Any, final: bool) -> None:
        if self.engine is None or self.session.case is None:
            return
        if final:
            self.request_prediction()
        else:
            self.request_preview()

    def request_preview(self) -> asyncio.Task | None:
        if self.engine is None or self.session.case is None:
            return None
        case, plan, engine = self.session.case, self.session.plan, self.engine

        def job(cancel: threading.Event) -> Any:
            return engine.preview(case, plan)

        return self._launch("preview", job)

    def request_prediction(self) -> asyncio.Task | None:
        if self.engine is None or self.session.case is None:
            return None
        case, plan, engine = self.session.case, self.session.plan, self.engine
        steps, seeds = self.steps, self.seeds
        loop = asyncio.get_event_loop()

        def job(cancel: threading.Event) -> Any:
            def on_progress(done: int, total: int, *_: Any) -> None:
                if not cancel.is_set():
                    loop.call_soon_threadsafe(self.progress.emit, int(done), int(total))

            return engine.predict(case, plan, steps=steps, seeds=seeds, progress=on_progress,
                                  cancel=cancel)

        return self._launch("predict", job)

    def _launch(self, kind: str, job: Callable[[threading.Event], Any]) -> asyncio.Task:
        task = self.runner.submit(job)
        self.busy_changed.emit(kind)
        task.add_done_callback(lambda t: self._finished(kind, t))
        return task

    def _finished(self, kind: str, task: asyncio.Task) -> None:
        if task.cancelled():
            return  # a newer request owns the busy state
        exc = task.exception()
        if exc is not None:
            log.error("dose %s failed", kind, exc_info=exc)
            self.failed.emit(f"Dose {kind} failed: {exc}")
        else:
            if kind == "preview":
                self.previews_done += 1
            else:
                self.predictions_done += 1
            self.session.set_result(task.result())
        self.busy_changed.emit("")

    def shutdown(self) -> None:
        self.session.plan_changed.disconnect(self._on_plan_changed)
        self.runner.shutdown()
