"""The window's beam suggestion without Qt (planner_gui/beam_suggestion.py): sector text, which
case is searched, the plans a result becomes, and a search that waits while the planner's own
dose work runs (on a plain asyncio loop with a real worker thread)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
from gui_helpers import PhysicsDoseEngine, make_case

from engine.beam_search import Candidate, SearchResult
from planner_gui.beam_suggestion import (
    SuggestionRun,
    SuggestRequest,
    add_to_session,
    parse_sectors,
    search_case,
    suggested_plans,
)
from planner_gui.session import Session


@pytest.fixture(scope="module")
def case():
    return make_case(with_dose=False)


def test_sector_text():
    assert parse_sectors("") == () and parse_sectors(" , ") == ()
    assert parse_sectors("300-60, 150 - 210; 10-20") == ((300.0, 60.0), (150.0, 210.0),
                                                           (10.0, 20.0))
    with pytest.raises(ValueError, match="two angles 'A-B'"):
        parse_sectors("300-60, 90")


def test_the_searched_case_carries_the_active_plans_isocentre(case):
    assert search_case(case, case.plan) is case
    assert search_case(case, case.plan.with_gantry(0, 33.0)) is case  # angles do not matter
    beam = case.plan.beams[0]
    moved = case.plan.with_beams([dataclasses.replace(b, isocenter_mm=(0.0, 0.0, 0.0))
                                  for b in case.plan.beams])
    assert beam.isocenter_mm != (0.0, 0.0, 0.0)
    searched = search_case(case, moved)
    assert searched is not case and searched.plan == moved


def test_a_result_becomes_named_plans_in_the_session(case):
    session = Session()
    session.open_case(case)
    result = SearchResult(best=(Candidate((10.0, 130.0, 250.0), 1.0),
                                Candidate((15.0, 135.0, 255.0), 1.5)),
                          equispaced=Candidate((0.0, 120.0, 240.0), 2.0), evaluated=9,
                          seconds=1.0, objective="x")
    plans = suggested_plans(session.plan, result)
    assert [p.name for p in plans] == ["Suggested 1 (3 fields)", "Suggested 2 (3 fields)",
                                       "Equispaced 3"]
    assert [p.reference for p in plans] == [False, False, True]
    entries = add_to_session(session, plans)
    entries_again = add_to_session(session, plans)  # a second search: names stay unique
    assert [e.plan.name for e in entries_again][0] == "Suggested 1 (3 fields) 2"
    assert entries[0] is session.plans[1] and session.active_plan == 0
    assert [b.gantry_deg for b in entries[0].plan.beams] == [10.0, 130.0, 250.0]
    assert entries[0].plan.prescription_gy == session.plan.prescription_gy


def test_the_search_waits_while_the_planner_is_busy(case):
    engine = PhysicsDoseEngine()
    busy = threading.Event()
    busy.set()
    run = SuggestionRun()
    outcome = []
    run.finished.connect(lambda result, *_: outcome.append(result))

    async def scenario():
        future = run.start(engine, case, case.plan, SuggestRequest(n_beams=3, budget_s=1.5),
                           busy=busy.is_set)
        await asyncio.sleep(0.5)
        assert engine.physics.calls == 0 and run.running  # the planner's work goes first
        busy.clear()
        await future
        await asyncio.sleep(0)  # the done callback

    t0 = time.perf_counter()
    asyncio.run(scenario())
    assert engine.physics.calls >= 2 and outcome and outcome[0].evaluated >= 2
    assert run.waited_s >= 0.4 and time.perf_counter() - t0 < 1.5 + 3.0
