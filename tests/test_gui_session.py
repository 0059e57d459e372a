"""The GUI's Qt-free parts: session model (undo/redo), which dose the views show, beam geometry
and handle placement, loading errors and the dose controller (latest wins, on a plain asyncio
loop with a real worker thread)."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from gui_helpers import PhysicsDoseEngine, make_case

from engine.case import PatientPosition
from engine.features.beam_geometry import source_direction_lps
from planner_gui.beam_geometry import gantry_from_axial_direction, handle_point
from planner_gui.dose_display import DIFFERENCE, PREDICTED, REFERENCE, UNCERTAINTY, DoseDisplay
from planner_gui.inference import DoseController
from planner_gui.loading import CaseLoadError, load_case
from planner_gui.session import Session, _largest_gap_angle, default_plan


@pytest.fixture(scope="module")
def case():
    return make_case(with_dose=False)


def recorder(signal):
    calls = []
    signal.connect(lambda *a: calls.append(a))
    return calls


def test_open_case_sets_plan_cursor_and_clears_history(case):
    s = Session()
    plans = recorder(s.plan_changed)
    s.open_case(case)
    assert s.plan == case.plan and plans == [(case.plan, True)]
    assert s.cursor_mm == case.plan.isocenter_mm
    assert not s.can_undo and not s.can_redo


def test_drag_is_one_undo_step_and_redo_restores_it(case):
    s = Session()
    s.open_case(case)
    finals = []
    s.plan_changed.connect(lambda plan, final: finals.append(final))
    s.begin_edit()
    for angle in (5.0, 10.0, 15.0):
        s.set_gantry(0, angle, transient=True)
    s.commit_edit()
    assert finals == [False, False, False, True]
    assert s.plan.beams[0].gantry_deg == 15.0
    assert s.undo() and s.plan.beams[0].gantry_deg == 0.0
    assert not s.undo()
    assert s.redo() and s.plan.beams[0].gantry_deg == 15.0
    assert not s.can_redo


def test_new_edit_clears_redo_and_beams_can_be_added_and_removed(case):
    s = Session()
    s.open_case(case)
    s.set_gantry(1, 90.0)
    s.undo()
    s.set_couch(1, 10.0)
    assert not s.can_redo and s.plan.beams[1].couch_deg == 10.0
    n = len(s.plan.beams)
    index = s.add_beam()
    assert len(s.plan.beams) == n + 1 and s.selected_beam == index
    assert s.plan.beams[index].name not in {b.name for b in s.plan.beams[:index]}
    s.remove_beam(0)
    assert len(s.plan.beams) == n and s.plan.beams[0].name == "B02"
    s.undo()
    s.undo()
    assert len(s.plan.beams) == n and s.plan.beams[0].name == "B01"


def test_last_beam_cannot_be_removed(case):
    s = Session()
    s.open_case(case.with_plan(case.plan.with_beams(case.plan.beams[:1])))
    with pytest.raises(ValueError, match="at least one beam"):
        s.remove_beam(0)


def test_default_plan_is_centred_on_the_target(case):
    plan = default_plan(case.with_plan(None))
    targets = case.structure("PTV70").mask | case.structure("PTV56").mask
    centre = case.geometry.index_to_lps(np.argwhere(targets).mean(axis=0))
    assert np.allclose(plan.isocenter_mm, centre)
    assert len(plan.beams) == 7 and plan.prescription_gy == 70.0


def test_largest_gap_angle():
    assert _largest_gap_angle([0.0, 90.0, 180.0]) == 270.0
    assert _largest_gap_angle([350.0, 10.0]) == 180.0
    assert _largest_gap_angle([]) == 0.0


def test_visibility_signal_only_on_change():
    s = Session()
    calls = recorder(s.visibility_changed)
    s.set_visible("PTV", False)
    s.set_visible("PTV", False)
    s.set_visible("PTV", True)
    assert calls == [("PTV", False), ("PTV", True)]


@pytest.mark.parametrize("position", ["HFS", "HFP", "FFS", "FFP", "HFDL", "FFDR"])
@pytest.mark.parametrize("angle", [0.0, 37.5, 90.0, 181.0, 300.0])
def test_gantry_round_trips_through_the_axial_direction(position, angle):
    d = source_direction_lps(angle, 0.0, PatientPosition(position))
    assert np.isclose(np.linalg.norm(d), 1.0)
    assert np.isclose(gantry_from_axial_direction(d[0], d[1], PatientPosition(position)), angle)


def test_dragging_towards_the_patients_left_is_gantry_90_for_hfs():
    assert gantry_from_axial_direction(0.0, -1.0) == 0.0     # source anterior
    assert gantry_from_axial_direction(1.0, 0.0) == 90.0     # source at the patient's left
    assert gantry_from_axial_direction(0.0, 1.0) == 180.0    # posterior


def test_handles_sit_at_the_edge_of_the_visible_area_in_every_direction():
    visible = (-50.0, -30.0, 150.0, 70.0)      # x0, y0, x1, y1 (mm), isocentre inside
    iso = np.array([0.0, 0.0])
    for angle in range(0, 360, 15):
        a = np.radians(angle)
        direction = np.array([np.sin(a), -np.cos(a)])
        point = handle_point(iso, direction, visible)
        on_edge = np.isclose(point, visible[:2]) | np.isclose(point, visible[2:])
        assert on_edge.any(), f"{angle} deg: {point} is not on the edge"
        assert np.allclose((point - iso) / np.linalg.norm(point - iso), direction)
    # a non-coplanar beam's shorter projection puts its handle further in
    half = handle_point(iso, np.array([0.0, -0.5]), visible)
    assert np.allclose(half, [0.0, -15.0])


def test_handles_of_rays_that_miss_the_view_are_left_out():
    visible = (100.0, 100.0, 200.0, 180.0)
    iso = np.array([0.0, 0.0])                   # off screen, up and left of the view
    crossing = handle_point(iso, np.array([1.0, 1.0]), visible)
    assert np.allclose(crossing, [180.0, 180.0])  # where the ray leaves the view
    for direction in ([-1.0, 0.0], [0.0, -1.0], [1.0, -0.2], [1.0, 0.0]):
        assert handle_point(iso, np.array(direction), visible) is None


def test_the_dose_display_follows_the_ai_until_the_planner_picks():
    session = Session()
    display = DoseDisplay(session)
    modes = recorder(display.changed)
    with_dose = make_case(with_dose=True)
    session.open_case(with_dose)
    assert display.mode == REFERENCE, "before the first AI result: what there is"
    assert display.describe() == "Reference (dataset)"
    engine = PhysicsDoseEngine()
    preview = engine.preview(with_dose, session.plan)
    session.set_result(preview)
    assert display.mode == PREDICTED and display.describe() == "AI preview"
    display.set_engine(True, "default model")
    session.set_result(engine.predict(with_dose, session.plan, steps=10))
    assert display.describe() == "AI 10-step · default model"
    assert [m for (m,) in modes] == [REFERENCE, PREDICTED, PREDICTED]
    display.choose(DIFFERENCE)
    assert display.describe() == "AI 10-step − Reference (dataset)"
    session.set_reference_dose(with_dose.dose, "Physics (pyRadPlan)")
    display.suggest(REFERENCE)
    session.set_result(preview)
    assert display.mode == DIFFERENCE, "a picked mode stays whatever arrives"
    assert display.describe() == "AI preview − Physics (pyRadPlan)"
    display.choose(UNCERTAINTY)
    assert "2 or more seeds" in display.describe()
    with pytest.raises(ValueError):
        display.choose("Dose of the day")


def test_the_dose_display_says_what_is_missing(case):
    session = Session()
    display = DoseDisplay(session)
    session.open_case(case)                      # no reference dose, no engine
    assert display.mode == PREDICTED
    assert display.describe() == "AI dose: no dose engine"
    display.set_engine(True)
    assert display.describe() == "AI dose: computing …"
    display.choose(REFERENCE)
    assert display.describe() == "Reference dose: none for this patient"


def test_missing_path_is_a_clear_load_error(tmp_path):
    with pytest.raises(CaseLoadError, match="does not exist"):
        load_case(tmp_path / "nope")


def test_controller_previews_transient_plans_and_predicts_committed_ones(case):
    engine = PhysicsDoseEngine()
    session = Session()
    controller = DoseController(session, engine, steps=5)
    progress = recorder(controller.progress)
    results = recorder(session.result_changed)

    async def scenario():
        session.open_case(case)            # committed plan -> full prediction
        await asyncio.sleep(0.5)
        session.begin_edit()
        session.set_gantry(0, 40.0, transient=True)
        await asyncio.sleep(0.5)
        session.commit_edit()
        await asyncio.sleep(0.5)

    asyncio.run(scenario())
    kinds = [r[0].kind for r in results if r[0] is not None]
    assert kinds == ["predict", "preview", "predict"]
    assert progress[-1] == (5, 5)
    final = session.result
    assert final.dose.geometry == case.geometry
    initial = results[1][0]  # gantry 0 vs the final 40 degrees
    assert initial.metrics["Parotid_L"].mean_gy != final.metrics["Parotid_L"].mean_gy
    assert final.scorecard.evaluated > 0
    controller.shutdown()


def test_controller_reports_engine_failures(case):
    class Broken(PhysicsDoseEngine):
        def predict(self, *args, **kwargs):
            raise RuntimeError("model weights are corrupt")

    session = Session()
    controller = DoseController(session, Broken())
    failures = recorder(controller.failed)

    async def scenario():
        session.open_case(case)
        await asyncio.sleep(0.3)

    asyncio.run(scenario())
    assert failures and "model weights are corrupt" in failures[0][0]
    assert session.result is None
    controller.shutdown()


def test_a_missing_engine_or_model_is_reported_not_raised(tmp_path):
    from planner_gui.engine_api import NO_ENGINE, load_dose_engine

    engine, message = load_dose_engine(str(tmp_path / "no-such-checkpoint"))
    assert engine is None and message.startswith(NO_ENGINE)


def test_plans_keep_their_own_beams_history_and_result(case):
    session = Session()
    plans = recorder(session.plans_changed)
    session.open_case(case)
    first = session.plan
    assert session.plan_names() == [first.name or "Plan 1"] and plans[-1][1] == 0
    session.set_gantry(0, 30.0)
    session.set_result("dose of plan 1")
    index = session.duplicate_plan()
    assert index == 1 and session.active_plan == 1
    assert session.plan_names()[1] == f"{session.plan_names()[0]} copy"
    assert session.plan.beams == session.plans[0].plan.beams
    assert session.result == "dose of plan 1" and session.result_plan == session.plan
    assert not session.can_undo  # a copy starts a fresh history
    session.set_gantry(0, 90.0)
    assert session.result_plan != session.plan  # the copied dose is no longer this plan's
    session.switch_plan(0)
    assert session.plan.beams[0].gantry_deg == 30.0 and session.can_undo
    assert session.result == "dose of plan 1"
    session.undo()
    assert session.plan.beams[0].gantry_deg == first.beams[0].gantry_deg
    session.switch_plan(1)
    assert session.plan.beams[0].gantry_deg == 90.0


def test_plan_names_are_unique_and_the_last_plan_stays(case):
    session = Session()
    session.open_case(case)
    session.duplicate_plan()
    with pytest.raises(ValueError, match="exists already"):
        session.rename_plan(1, session.plan_names()[0])
    with pytest.raises(ValueError, match="needs a name"):
        session.rename_plan(1, "   ")
    session.set_gantry(0, 45.0)
    session.rename_plan(1, "7 fields")
    assert session.plan.name == "7 fields" and session.plan_names()[1] == "7 fields"
    session.undo()  # the rename is not undone with the beam edit
    assert session.plan.name == "7 fields"
    session.delete_plan(1)
    assert session.active_plan == 0 and len(session.plans) == 1
    with pytest.raises(ValueError, match="at least one plan"):
        session.delete_plan(0)
    with pytest.raises(IndexError):
        session.switch_plan(3)


def test_added_plans_get_unique_names_and_a_fresh_history(case):
    session = Session()
    with pytest.raises(RuntimeError, match="no patient"):
        session.add_plan(default_plan(case))
    session.open_case(case)
    session.set_gantry(0, 30.0)
    session.set_result("dose of plan 1")
    plans = recorder(session.plans_changed)
    switched = recorder(session.active_plan_changed)
    suggested = session.plan.with_gantry(0, 100.0)
    index = session.add_plan(dataclasses.replace(suggested, name="Suggested 1"))
    assert index == 1 and session.active_plan == 0 and not switched  # not activated
    assert plans[-1] == ([session.plans[0].plan.name, "Suggested 1"], 0)
    assert session.plan.beams[0].gantry_deg == 30.0 and session.can_undo
    again = session.add_plan(dataclasses.replace(suggested, name="Suggested 1"), activate=True)
    assert again == 2 and session.active_plan == 2 and switched == [(2,)]
    assert session.plan.name == "Suggested 1 2" and session.plan.beams == suggested.beams
    assert not session.can_undo and not session.can_redo  # a fresh history
    assert session.result is None and session.result_plan is None  # no dose yet
    assert plans[-1] == (session.plan_names(), 2)


def test_switching_back_to_a_predicted_plan_does_not_predict_again(case):
    engine = PhysicsDoseEngine()
    session = Session()
    controller = DoseController(session, engine, steps=3)

    async def scenario():
        session.open_case(case)  # plan 1 is predicted
        await asyncio.sleep(0.5)
        done = controller.predictions_done
        session.duplicate_plan()  # the copy carries plan 1's prediction: nothing to compute
        await asyncio.sleep(0.3)
        assert controller.predictions_done == done
        session.set_gantry(0, 120.0)  # the copy changes: predicted
        await asyncio.sleep(0.5)
        assert controller.predictions_done == done + 1
        session.switch_plan(0)
        await asyncio.sleep(0.3)
        assert controller.predictions_done == done + 1 and session.result.kind == "predict"
        assert session.result_plan == session.plan

    asyncio.run(scenario())
    controller.shutdown()


def test_a_result_still_running_when_the_plan_is_switched_is_dropped(case):
    engine = PhysicsDoseEngine(delay_s=0.1)
    session = Session()
    controller = DoseController(session, engine, steps=3)

    async def scenario():
        session.open_case(case)
        await asyncio.sleep(1.5)  # plan 1 predicted
        session.duplicate_plan()
        session.set_gantry(0, 200.0)  # the copy's prediction starts ...
        await asyncio.sleep(0.05)
        session.switch_plan(0)  # ... and plan 1 becomes active while it runs
        assert controller.busy == ""
        await asyncio.sleep(1.5)

    asyncio.run(scenario())
    assert session.active_plan == 0 and session.result_plan == session.plan
    assert session.plans[1].result_plan != session.plans[1].plan  # not given to the wrong plan
    controller.shutdown()
