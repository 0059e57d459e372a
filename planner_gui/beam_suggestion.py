"""Beam-angle suggestion in the window, without Qt: what the planner asks for
(:class:`SuggestRequest`, :func:`parse_sectors`), one search of
:func:`engine.beam_search.suggest_beams` off the UI thread (:class:`SuggestionRun`) and the plans
its result becomes (:func:`suggested_plans`, :func:`add_to_session`).

Threads. The search calls the same engine as the :class:`planner_gui.inference.DoseController`,
but on its own worker thread rather than the controller's latest-wins runner (where the next
beam drag would supersede it). That is safe: ``engine.runtime.DoseEngine`` runs one inference
at a time (its ``_lock`` covers the caches and the model), so the two callers take turns and
never share a half-built state. So that the planner never waits behind the search, the search
also yields: before each of its previews it waits while the controller is busy (a drag's
preview, a full prediction), until its time budget is spent. Waiting counts against the budget:
the budget is wall time, as the planner sees it.

Angles are IEC 61217 gantry degrees in [0, 360), couch 0; sectors run clockwise from their
first angle to their second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.beam_search import (
    MIN_SEPARATION_DEG,
    Candidate,
    SearchCancelled,
    SearchObjective,
    SearchResult,
    parse_sector,
    plan_with_angles,
    suggest_beams,
)
from engine.case import Case, Plan
from engine.latest_wins import Cancelled
from planner_gui.session import PlanEntry, Session
from planner_gui.signals import Signal

#: how often a search waiting for the dose controller looks again (seconds)
YIELD_POLL_S = 0.05


@dataclass(frozen=True)
class SuggestRequest:
    """One search: ``n_beams`` coplanar static beams kept out of the ``forbid`` sectors
    (degrees, clockwise), ``budget_s`` seconds of wall time, the best ``keep`` arrangements
    kept, judged by ``objective``."""

    n_beams: int = 7
    forbid: tuple[tuple[float, float], ...] = ()
    budget_s: float = 60.0
    keep: int = 3
    objective: SearchObjective = SearchObjective()


def parse_sectors(text: str) -> tuple[tuple[float, float], ...]:
    """``"300-60, 150-210"`` -> ((300, 60), (150, 210)) degrees; blank -> no sector.

    Raises ValueError with a message for the planner when a part is not ``A-B``."""
    parts = [p.strip() for p in text.replace(";", ",").split(",")]
    return tuple(parse_sector(p.replace(" ", "")) for p in parts if p)


def search_case(case: Case, plan: Plan) -> Case:
    """The case to search for ``plan``'s isocentre, energy and SAD: ``case`` itself when its own
    plan has the same (so the engine's per-case caches are reused), else ``case`` with ``plan``
    (the search takes those from the case's plan)."""
    def basis(p: Plan | None) -> tuple | None:
        if p is None or not p.beams:
            return None
        first = p.beams[0]
        return (first.isocenter_mm, first.sad_mm, first.energy_mv, p.patient_position,
                p.prescription_gy)

    return case if basis(case.plan) == basis(plan) else case.with_plan(plan)


@dataclass(frozen=True)
class SuggestedPlan:
    """A plan made from one searched arrangement: its name in the session, the plan and the
    candidate it came from; ``reference`` for the equispaced class solution."""

    name: str
    plan: Plan
    candidate: Candidate
    reference: bool = False


def suggested_plans(base: Plan, result: SearchResult) -> list[SuggestedPlan]:
    """The result's best arrangements as plans on ``base``'s isocentre ("Suggested 1 (7
    fields)", ... best first), then the equispaced reference ("Equispaced 7")."""
    out = []
    for rank, candidate in enumerate(result.best, start=1):
        n = len(candidate.gantry_deg)
        name = f"Suggested {rank} ({n} fields)"
        out.append(SuggestedPlan(name, _named(plan_with_angles(base, candidate.gantry_deg), name),
                                 candidate))
    reference = result.equispaced
    name = f"Equispaced {len(reference.gantry_deg)}"
    out.append(SuggestedPlan(name, _named(plan_with_angles(base, reference.gantry_deg), name),
                             reference, reference=True))
    return out


def _named(plan: Plan, name: str) -> Plan:
    return dataclasses.replace(plan, name=name)


def add_to_session(session: Session, plans: list[SuggestedPlan]) -> list[PlanEntry]:
    """Add ``plans`` to the session (not activated; names made unique there) and return their
    entries, which stay the same objects while the plans are renamed or others deleted."""
    return [session.plans[session.add_plan(p.plan)] for p in plans]


def no_arrangement_message(request: SuggestRequest) -> str:
    sectors = ", ".join(f"{a:g}-{b:g}" for a, b in request.forbid)
    return (f"No {request.n_beams}-beam arrangement keeps out of the forbidden sectors "
            f"({sectors}) with beams {MIN_SEPARATION_DEG:g} deg apart: forbid less, or ask for "
            f"fewer beams.")


class _YieldingEngine:
    """The engine as the search sees it: each preview first waits while ``busy()`` (the
    planner's own previews and predictions go first) until ``deadline`` (perf_counter seconds),
    and is cancelled with the search."""

    def __init__(self, engine: Any, busy: Callable[[], bool] | None, deadline: float,
                 cancel: threading.Event) -> None:
        self.engine, self.busy, self.deadline, self.cancel = engine, busy, deadline, cancel
        self.waited_s = 0.0

    def preview(self, case: Case, plan: Plan) -> Any:
        t0 = time.perf_counter()
        while (self.busy is not None and self.busy() and not self.cancel.is_set()
               and time.perf_counter() < self.deadline):
            self.cancel.wait(YIELD_POLL_S)
        self.waited_s += time.perf_counter() - t0
        if self.cancel.is_set():
            raise SearchCancelled("beam search cancelled")
        try:
            return self.engine.preview(case, plan, cancel=self.cancel)
        except Cancelled:
            raise SearchCancelled("beam search cancelled") from None


class SuggestionRun:
    """Runs one beam search at a time on its own thread; results come back on the event loop's
    thread (the Qt thread under qasync).

    Signals (emitted on the event loop's thread):
        progress(evaluated, best_value): after each evaluated arrangement.
        finished(result, case, plan): a :class:`engine.beam_search.SearchResult` for ``case``
            (the session's case when the search started) searched on ``plan``'s isocentre.
        failed(message): the search could not run (a message for the planner).
        cancelled(): :meth:`cancel` stopped it; nothing is delivered.
    """

    def __init__(self) -> None:
        self.progress = Signal()
        self.finished = Signal()
        self.failed = Signal()
        self.cancelled = Signal()
        self.request: SuggestRequest | None = None
        self.started_at = 0.0
        self.waited_s = 0.0
        self._cancel: threading.Event | None = None
        self._future: asyncio.Future | None = None

    @property
    def running(self) -> bool:
        return self._future is not None and not self._future.done()

    def elapsed_s(self) -> float:
        """Seconds since the running (or last) search started."""
        return time.perf_counter() - self.started_at if self.started_at else 0.0

    def start(self, engine: Any, case: Case, plan: Plan, request: SuggestRequest,
              busy: Callable[[], bool] | None = None) -> asyncio.Future:
        """Search ``request`` for ``case`` on ``plan``'s isocentre with ``engine.preview``;
        ``busy()`` (called on the worker thread) says the planner's own dose work is running."""
        if self.running:
            raise RuntimeError("a beam search is already running")
        loop = asyncio.get_event_loop()
        cancel = threading.Event()
        self._cancel, self.request = cancel, request
        self.started_at = time.perf_counter()
        searched = search_case(case, plan)
        yielding = _YieldingEngine(engine, busy, self.started_at + request.budget_s, cancel)

        def on_progress(evaluated: int, best: float) -> None:
            if not cancel.is_set():
                try:
                    loop.call_soon_threadsafe(self._progress, cancel, evaluated, best)
                except RuntimeError:  # the loop closed under us (the app is quitting)
                    cancel.set()

        def job() -> SearchResult:
            try:
                return suggest_beams(yielding, searched, request.n_beams, request.forbid,
                                     request.budget_s, request.keep, request.objective,
                                     progress=on_progress, cancel=cancel)
            finally:
                self.waited_s = yielding.waited_s

        future = loop.run_in_executor(None, job)
        future.add_done_callback(lambda f: self._done(f, cancel, case, plan))
        self._future = future
        return future

    def cancel(self) -> None:
        """Ask the running search to stop (it stops before its next preview); ``cancelled`` is
        emitted when it has."""
        if self._cancel is not None:
            self._cancel.set()

    def _progress(self, cancel: threading.Event, evaluated: int, best: float) -> None:
        if not cancel.is_set():
            self.progress.emit(evaluated, best)

    def _done(self, future: asyncio.Future, cancel: threading.Event, case: Case,
              plan: Plan) -> None:
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or cancel.is_set() or isinstance(exc, SearchCancelled):
            self.cancelled.emit()
        elif isinstance(exc, ValueError):
            self.failed.emit(str(exc))
        elif exc is not None:
            self.failed.emit(f"The beam search failed: {type(exc).__name__}: {exc}")
        else:
            self.finished.emit(future.result(), case, plan)
