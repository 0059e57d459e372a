"""The GUI-free session model: the open case, its plans (each with its own undo/redo history and
latest dose result), the linked cursor and which structures are shown.

Views subscribe to the signals here; the model never calls a view. Plans are immutable
(:class:`engine.case.Plan`), so the undo history is simply a stack of plans. A mouse drag is one
undoable edit: :meth:`Session.begin_edit` remembers the plan, :meth:`Session.preview_plan` shows
transient plans without touching the history, :meth:`Session.commit_edit` records the edit.

A patient can hold several plans (:class:`PlanEntry`: try 7 fields against 9, or an arc):
:meth:`Session.duplicate_plan`, :meth:`Session.add_plan`, :meth:`Session.rename_plan`,
:meth:`Session.delete_plan` and :meth:`Session.switch_plan`. ``Session.plan``, ``Session.result``
and the history always refer to the active plan, so views and the dose controller need not know
there are several.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.case import Beam, Case, Plan, Role, Volume
from planner_gui.signals import Signal

DEFAULT_BEAM_COUNT = 7


def default_plan(case: Case) -> Plan:
    """An equispaced coplanar plan at the targets' centroid (or the body's), for cases with none.

    Gantry angles 0, 360/n, ... degrees; isocentre in LPS mm.
    """
    masks = [s.mask for s in case.targets] or [s.mask for s in case.by_role(Role.EXTERNAL)]
    if masks:
        union = np.logical_or.reduce(masks)
        centre_index = np.argwhere(union).mean(axis=0)
    else:
        centre_index = (np.asarray(case.geometry.shape) - 1) / 2.0
    iso = tuple(float(v) for v in case.geometry.index_to_lps(centre_index))
    beams = tuple(Beam(name=f"B{i + 1}", gantry_deg=360.0 * i / DEFAULT_BEAM_COUNT,
                       isocenter_mm=iso, number=i + 1) for i in range(DEFAULT_BEAM_COUNT))
    rx = max((s.prescription_gy or 0.0 for s in case.targets), default=0.0) or None
    return Plan(beams=beams, prescription_gy=rx, name="Default")


def reference_name(case: Case) -> str:
    """What the case's own reference dose is called on screen: "Reference (RTDOSE)" for a DICOM
    study's dose, "Reference (dataset)" for a dataset case's; "" when the case has none."""
    if case.dose is None:
        return ""
    return "Reference (RTDOSE)" if case.refs.study_instance_uid else "Reference (dataset)"


def _largest_gap_angle(angles: list[float]) -> float:
    """The middle of the widest angular gap between existing gantry angles (degrees)."""
    if not angles:
        return 0.0
    a = sorted(x % 360.0 for x in angles)
    gaps = [((a[(i + 1) % len(a)] - a[i]) % 360.0 or 360.0, a[i]) for i in range(len(a))]
    width, start = max(gaps)
    return (start + width / 2.0) % 360.0


@dataclass
class PlanEntry:
    """One plan of the open patient: the plan (its ``name`` is the plan's name), its own undo
    and redo stacks, its latest dose result and the plan that result was computed for."""

    plan: Plan
    undo: list[Plan] = field(default_factory=list)
    redo: list[Plan] = field(default_factory=list)
    result: Any = None
    result_plan: Plan | None = None


class Session:
    """Everything the planner is looking at, as plain values plus change signals.

    Signals (arguments):
        case_changed(case): a new patient was opened.
        plan_changed(plan, final): the plan changed; ``final`` is False for transient drag
            states (previews) and True for committed edits, undo and redo.
        result_changed(result): a new dose result (preview or full prediction) or None.
        cursor_changed(point): the linked crosshair moved, LPS (x, y, z) in mm.
        visibility_changed(name, visible): a structure was shown or hidden.
        history_changed(can_undo, can_redo)
        selection_changed(beam_index): the beam selected for editing (-1 when none).
        reference_changed(case): the reference dose was replaced (e.g. by a physics dose).
        plans_changed(names, active): plans were added, renamed, removed or switched.
        active_plan_changed(index): another plan became active (before its plan_changed).
    """

    def __init__(self) -> None:
        self.case_changed = Signal()
        self.plan_changed = Signal()
        self.result_changed = Signal()
        self.cursor_changed = Signal()
        self.visibility_changed = Signal()
        self.history_changed = Signal()
        self.selection_changed = Signal()
        self.reference_changed = Signal()
        self.plans_changed = Signal()
        self.active_plan_changed = Signal()
        self.case: Case | None = None
        self.plans: list[PlanEntry] = []
        self.active_plan = -1
        self.reference_source = ""
        self.cursor_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.hidden: set[str] = set()
        self.selected_beam = -1
        self._edit_start: Plan | None = None

    # ---- the active plan --------------------------------------------------------------------
    @property
    def _entry(self) -> PlanEntry | None:
        return self.plans[self.active_plan] if self.plans else None

    @property
    def plan(self) -> Plan | None:
        """The active plan (None before a patient is open)."""
        return self._entry.plan if self._entry is not None else None

    @plan.setter
    def plan(self, plan: Plan) -> None:
        self._entry.plan = plan

    @property
    def result(self) -> Any:
        """The active plan's latest dose result (None when it has none yet)."""
        return self._entry.result if self._entry is not None else None

    @property
    def result_plan(self) -> Plan | None:
        """The plan :attr:`result` was computed for."""
        return self._entry.result_plan if self._entry is not None else None

    @property
    def _undo(self) -> list[Plan]:
        return self._entry.undo

    @property
    def _redo(self) -> list[Plan]:
        return self._entry.redo

    # ---- case -------------------------------------------------------------------------------
    def open_case(self, case: Case) -> None:
        """Make ``case`` current: its plan (or a default one), cursor at the isocentre."""
        self.case = case
        plan = case.plan if case.plan is not None and case.plan.beams else default_plan(case)
        self.plans = [PlanEntry(plan if plan.name else dataclasses.replace(plan, name="Plan 1"))]
        self.active_plan = 0
        self._edit_start = None
        self.reference_source = reference_name(case)
        self.hidden = set()
        self.selected_beam = 0 if self.plan.beams else -1
        self.cursor_mm = self.plan.isocenter_mm
        self.case_changed.emit(case)
        self.plans_changed.emit(self.plan_names(), self.active_plan)
        self.plan_changed.emit(self.plan, True)
        self.result_changed.emit(None)
        self.cursor_changed.emit(self.cursor_mm)
        self._emit_history()

    # ---- several plans ----------------------------------------------------------------------
    def plan_names(self) -> list[str]:
        return [entry.plan.name for entry in self.plans]

    def _unique_name(self, base: str) -> str:
        names, name, n = set(self.plan_names()), base, 2
        while name in names:
            name, n = f"{base} {n}", n + 1
        return name

    def duplicate_plan(self) -> int:
        """Copy the active plan (beams and latest result, a fresh history) as a new plan named
        "<name> copy", make it active and return its index."""
        if self._entry is None:
            raise RuntimeError("no patient is open")
        if self.editing:
            self.commit_edit()
        entry = self._entry
        copy = dataclasses.replace(entry.plan, name=self._unique_name(f"{entry.plan.name} copy"))
        result_plan = copy if entry.result_plan == entry.plan else None
        self.plans.append(PlanEntry(copy, result=entry.result if result_plan else None,
                                    result_plan=result_plan))
        self.switch_plan(len(self.plans) - 1)
        return self.active_plan

    def add_plan(self, plan: Plan, activate: bool = False) -> int:
        """Add ``plan`` as a new plan of the open patient (e.g. a suggested beam arrangement)
        with a fresh history and no result yet; its name is made unique ("<name> 2", ...).
        Returns its index; ``activate`` makes it the active plan."""
        if self.case is None:
            raise RuntimeError("no patient is open")
        name = self._unique_name(plan.name.strip() or "Plan")
        self.plans.append(PlanEntry(dataclasses.replace(plan, name=name)))
        index = len(self.plans) - 1
        if activate:
            self.switch_plan(index)
        else:
            self.plans_changed.emit(self.plan_names(), self.active_plan)
        return index

    def rename_plan(self, index: int, name: str) -> None:
        """Rename plan ``index``; names are unique and not empty. Not an undoable beam edit:
        the name changes in the plan's whole history."""
        name = name.strip()
        if not name:
            raise ValueError("a plan needs a name")
        if name in self.plan_names() and self.plans[index].plan.name != name:
            raise ValueError(f"a plan named {name!r} exists already")
        entry = self.plans[index]

        def renamed(plan: Plan) -> Plan:
            return dataclasses.replace(plan, name=name)

        was_current = entry.result_plan == entry.plan
        entry.plan = renamed(entry.plan)
        entry.undo[:] = [renamed(p) for p in entry.undo]
        entry.redo[:] = [renamed(p) for p in entry.redo]
        entry.result_plan = entry.plan if was_current else None
        if index == self.active_plan and self._edit_start is not None:
            self._edit_start = renamed(self._edit_start)
        self.plans_changed.emit(self.plan_names(), self.active_plan)

    def delete_plan(self, index: int) -> None:
        """Remove plan ``index`` (a patient keeps at least one); the active plan stays active,
        or its neighbour becomes active when it is the one removed."""
        if len(self.plans) <= 1:
            raise ValueError("a patient keeps at least one plan")
        if index == self.active_plan:
            self._edit_start = None
            del self.plans[index]
            self.active_plan = -1  # switch_plan below always switches
            self.switch_plan(min(index, len(self.plans) - 1))
            return
        del self.plans[index]
        if index < self.active_plan:
            self.active_plan -= 1
        self.plans_changed.emit(self.plan_names(), self.active_plan)

    def switch_plan(self, index: int) -> None:
        """Make plan ``index`` active: views show its beams and its latest result; a plan
        without a current result gets a new prediction (the dose controller sees a final
        plan change)."""
        if not 0 <= index < len(self.plans):
            raise IndexError(f"no plan {index}; the patient has {len(self.plans)}")
        if index == self.active_plan:
            return
        if self.editing:
            self.commit_edit()
        self.active_plan = index
        self.selected_beam = min(max(self.selected_beam, 0), len(self.plan.beams) - 1)
        self.active_plan_changed.emit(index)
        self.plans_changed.emit(self.plan_names(), self.active_plan)
        self.plan_changed.emit(self.plan, True)
        self.result_changed.emit(self.result)
        self.selection_changed.emit(self.selected_beam)
        self._emit_history()

    def set_reference_dose(self, dose: Volume, source: str) -> None:
        """Compare against ``dose`` (Gy on the CT grid) from now on; the plan is kept.
        ``source`` names it on screen, e.g. "Physics (pyRadPlan)"."""
        if self.case is None:
            raise RuntimeError("no patient is open")
        if dose.geometry != self.case.geometry:
            raise ValueError("the reference dose must lie on the patient's CT grid")
        self.case = self.case.with_dose(dose)
        self.reference_source = source
        self.reference_changed.emit(self.case)

    # ---- plan edits with undo/redo ----------------------------------------------------------
    def _require_plan(self) -> Plan:
        if self.plan is None:
            raise RuntimeError("no patient is open")
        return self.plan

    def set_plan(self, plan: Plan) -> None:
        """Replace the plan as one undoable edit."""
        current = self._require_plan()
        if plan == current:
            return
        self._undo.append(current)
        self._redo.clear()
        self.plan = plan
        self.plan_changed.emit(plan, True)
        self._emit_history()

    def begin_edit(self) -> None:
        """Start a continuous edit (a drag): later previews are one undo step."""
        self._edit_start = self._require_plan()

    def preview_plan(self, plan: Plan) -> None:
        """Show a transient plan during a continuous edit (no history entry)."""
        if self._edit_start is None:
            self.begin_edit()
        self.plan = plan
        self.plan_changed.emit(plan, False)

    def commit_edit(self) -> None:
        """End a continuous edit: record it for undo and announce the final plan."""
        start, self._edit_start = self._edit_start, None
        plan = self._require_plan()
        if start is not None and start != plan:
            self._undo.append(start)
            self._redo.clear()
        self.plan_changed.emit(plan, True)
        self._emit_history()

    @property
    def editing(self) -> bool:
        return self._edit_start is not None

    def set_gantry(self, index: int, gantry_deg: float, transient: bool = False) -> None:
        """Turn beam ``index`` to ``gantry_deg`` degrees (IEC 61217)."""
        plan = self._require_plan().with_gantry(index, gantry_deg)
        if transient:
            self.preview_plan(plan)
        else:
            self.set_plan(plan)

    def set_couch(self, index: int, couch_deg: float) -> None:
        plan = self._require_plan()
        beam = dataclasses.replace(plan.beams[index], couch_deg=float(couch_deg) % 360.0)
        self.set_plan(plan.with_beams(plan.beams[:index] + (beam,) + plan.beams[index + 1:]))

    def add_beam(self) -> int:
        """Add a static beam in the widest gap between the existing angles; returns its index."""
        plan = self._require_plan()
        iso = plan.isocenter_mm if plan.beams else default_plan(self.case).isocenter_mm
        names = {b.name for b in plan.beams}
        n = len(plan.beams) + 1
        while f"B{n}" in names:
            n += 1
        beam = Beam(name=f"B{n}", gantry_deg=_largest_gap_angle([b.gantry_deg for b in plan.beams]),
                    isocenter_mm=iso, number=max((b.number for b in plan.beams), default=0) + 1)
        self.set_plan(plan.with_beams(plan.beams + (beam,)))
        self.select_beam(len(plan.beams))
        return len(plan.beams)

    def remove_beam(self, index: int) -> None:
        plan = self._require_plan()
        if len(plan.beams) <= 1:
            raise ValueError("a plan needs at least one beam")
        self.set_plan(plan.with_beams(plan.beams[:index] + plan.beams[index + 1:]))
        self.select_beam(min(index, len(self.plan.beams) - 1))

    def undo(self) -> bool:
        if not self._undo:
            return False
        self._redo.append(self._require_plan())
        self.plan = self._undo.pop()
        self._after_history_move()
        return True

    def redo(self) -> bool:
        if not self._redo:
            return False
        self._undo.append(self._require_plan())
        self.plan = self._redo.pop()
        self._after_history_move()
        return True

    def _after_history_move(self) -> None:
        if self.selected_beam >= len(self.plan.beams):
            self.select_beam(len(self.plan.beams) - 1)
        self.plan_changed.emit(self.plan, True)
        self._emit_history()

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def _emit_history(self) -> None:
        self.history_changed.emit(self.can_undo, self.can_redo)

    # ---- view state -------------------------------------------------------------------------
    def select_beam(self, index: int) -> None:
        if index != self.selected_beam:
            self.selected_beam = index
            self.selection_changed.emit(index)

    def set_result(self, result: Any, plan: Plan | None = None) -> None:
        """The active plan's new dose result, computed for ``plan`` (default: the active plan
        as it is now)."""
        self._entry.result = result
        self._entry.result_plan = plan if plan is not None else self.plan
        self.result_changed.emit(result)

    def set_cursor(self, point_mm: tuple[float, float, float]) -> None:
        point = tuple(float(v) for v in point_mm)
        if point != self.cursor_mm:
            self.cursor_mm = point
            self.cursor_changed.emit(point)

    def set_visible(self, name: str, visible: bool) -> None:
        if visible == (name not in self.hidden):
            return
        (self.hidden.discard if visible else self.hidden.add)(name)
        self.visibility_changed.emit(name, visible)

    def is_visible(self, name: str) -> bool:
        return name not in self.hidden
