"""Latest-wins scheduling of slow jobs on one worker thread, with an asyncio face.

While a planner drags a beam, requests arrive faster than they can be computed. Only the
newest one matters: :class:`LatestWinsRunner` runs at most one job at a time on a single worker
thread, lets a newer request supersede any queued one (it is dropped without being computed)
and asks the running one to stop through its ``threading.Event`` (an N-step sampler checks it
between steps). A superseded job's result is never delivered. Errors come back as an outcome,
never as an exception escaping into the caller's event loop, and the runner keeps serving.

Cancelling an asyncio task that awaits ``run_in_executor`` does not stop the thread, hence
the cooperative event.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside a job that noticed its cancel event."""


class Status(str, enum.Enum):
    OK = "ok"
    ERROR = "error"
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What a submitted job came to: its value, its error message, or superseded."""

    status: Status
    request_id: int
    value: T | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


class LatestWinsRunner:
    """Run jobs ``fn(cancel_event) -> value`` one at a time; the newest request wins."""

    def __init__(self, name: str = "dosepilot-worker") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._latest = 0
        self._running_cancel: threading.Event | None = None
        self._lock: asyncio.Lock | None = None
        self.started = 0  # jobs that began computing (for tests and diagnostics)

    async def submit(self, fn: Callable[[threading.Event], T]) -> Outcome[T]:
        """Queue ``fn``; supersede older requests; await this request's outcome."""
        self._latest += 1
        request_id = self._latest
        if self._running_cancel is not None:
            self._running_cancel.set()
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if request_id != self._latest:
                return Outcome(Status.SUPERSEDED, request_id)
            cancel = threading.Event()
            self._running_cancel = cancel
            self.started += 1
            loop = asyncio.get_running_loop()
            try:
                value = await loop.run_in_executor(self._executor, fn, cancel)
            except Cancelled:
                return Outcome(Status.SUPERSEDED, request_id)
            except Exception as exc:  # the job's failure is the caller's result, not a crash
                log.exception("job %d failed", request_id)
                return Outcome(Status.ERROR, request_id, error=f"{type(exc).__name__}: {exc}")
            finally:
                self._running_cancel = None
            if request_id != self._latest:
                return Outcome(Status.SUPERSEDED, request_id)
            return Outcome(Status.OK, request_id, value=value)

    def shutdown(self) -> None:
        """Ask a running job to stop and release the worker thread."""
        if self._running_cancel is not None:
            self._running_cancel.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
