"""Running the dose engine off the UI thread, latest request wins.

While a planner drags a beam, every new plan asks for a 1-step preview; only the newest request
runs to completion (``engine.latest_wins``): waiting requests are dropped, a running prediction
is cancelled between steps and a late result is discarded. Work runs on one worker thread (the
engine uses all cores but one for torch, see ``engine_api.inference_threads``); results and
progress come back on the event loop's thread (the Qt thread under qasync), so handlers may
touch widgets.

The worker keeps its normal priority: a lower one made things worse on a busy machine, because
a descheduled worker that holds the GIL stalls the UI thread until it runs again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from engine.latest_wins import LatestWinsRunner, Outcome, Status
from planner_gui.engine_api import DoseEngineLike
from planner_gui.session import Session
from planner_gui.signals import Signal

log = logging.getLogger(__name__)
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
        self.runner = LatestWinsRunner("dose-engine")
        self.busy_changed = Signal()
        self.progress = Signal()
        self.failed = Signal()
        self.previews_done = 0
        self.predictions_done = 0
        self.busy = ""
        self._request = 0
        session.plan_changed.connect(self._on_plan_changed)
        session.active_plan_changed.connect(self._on_active_plan_changed)

    @property
    def available(self) -> bool:
        return self.engine is not None

    def set_engine(self, engine: DoseEngineLike | None) -> None:
        self.engine = engine

    def _on_active_plan_changed(self, _index: int) -> None:
        """Results still running belong to the plan left behind: drop them when they come."""
        self._request += 1
        self._set_busy("")

    def _on_plan_changed(self, plan: Any, final: bool) -> None:
        if not final:
            self.request_preview()
        elif not self._has_prediction_for(plan):
            self.request_prediction()

    def _has_prediction_for(self, plan: Any) -> bool:
        """The session already holds this plan's full prediction (e.g. after switching back to
        a plan): predicting again would give the same dose."""
        result = self.session.result
        return (result is not None and getattr(result, "kind", "") == "predict"
                and self.session.result_plan == plan)

    def request_preview(self) -> asyncio.Task | None:
        if self.engine is None or self.session.case is None:
            return None
        case, plan, engine = self.session.case, self.session.plan, self.engine

        def job(cancel: threading.Event) -> Any:
            return engine.preview(case, plan, cancel)

        return self._launch("preview", job, plan)

    def request_prediction(self) -> asyncio.Task | None:
        if self.engine is None or self.session.case is None:
            return None
        case, plan, engine = self.session.case, self.session.plan, self.engine
        steps, seeds = self.steps, self.seeds
        loop = asyncio.get_event_loop()

        def job(cancel: threading.Event) -> Any:

            def on_progress(done: int, total: int) -> None:
                if not cancel.is_set():
                    loop.call_soon_threadsafe(self.progress.emit, int(done), int(total))

            return engine.predict(case, plan, steps=steps, seeds=seeds, progress=on_progress,
                                  cancel=cancel)

        return self._launch("predict", job, plan)

    def _launch(self, kind: str, job: Callable[[threading.Event], Any], plan: Any
                ) -> asyncio.Task:
        self._request += 1
        request = self._request
        self._set_busy(kind)

        async def run() -> Outcome:
            outcome = await self.runner.submit(job)
            self._finished(kind, request, outcome, plan)
            return outcome

        return asyncio.get_event_loop().create_task(run())

    def _finished(self, kind: str, request: int, outcome: Outcome, plan: Any) -> None:
        if outcome.status is Status.SUPERSEDED:
            return  # a newer request owns the busy state
        if outcome.status is Status.ERROR:
            self.failed.emit(f"Dose {kind} failed: {outcome.error}")
        elif request == self._request:
            if kind == "preview":
                self.previews_done += 1
            else:
                self.predictions_done += 1
            self.session.set_result(outcome.value, plan)
        if request == self._request:
            self._set_busy("")

    def _set_busy(self, kind: str) -> None:
        self.busy = kind
        self.busy_changed.emit(kind)

    def shutdown(self) -> None:
        self.session.plan_changed.disconnect(self._on_plan_changed)
        self.session.active_plan_changed.disconnect(self._on_active_plan_changed)
        self.runner.shutdown()
