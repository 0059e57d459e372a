"""Two doses of one patient side by side: plan A against plan B, or a plan against the patient's
reference dose (no Qt; the GUI's compare window and ``dosepilot compare`` both build on it).

:func:`compare_doses` takes two doses in Gy on the case's CT grid and returns a
:class:`PlanComparison`:

* ``difference``: the voxel-wise **A − B** in Gy (positive where A gives more dose);
* the DVHs and standard metrics of both (:func:`engine.metrics.dvh.all_metrics`);
* both scorecards with one template (the shipped template that fits the case, chosen as the
  engine chooses it: :func:`engine.metrics.scorecard.best_scorecard`), and per objective a
  row with both values and **delta = A − B** in the objective's units (Gy, % Rx, % or cc);
* per structure the mean and maximum dose of both and their A − B;
* summary figures inside the body (external structure, the whole grid without one): mean and
  maximum |A − B|, the most positive and most negative A − B, in Gy.

Every difference here is A − B, the same sign as the difference map.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.case import Case, Plan, Role, Volume
from engine.metrics.dvh import DVH, DoseMetrics, all_metrics, prepare
from engine.metrics.scorecard import (
    BoundScorecard,
    Objective,
    ScorecardResult,
    ScorecardTemplate,
    best_scorecard,
)
from engine.reports import _clean


@dataclass(frozen=True)
class ComparedDose:
    """One side of a comparison.

    Attributes:
        name: what the user calls it ("Plan 1", "Reference (RTDOSE)").
        dose: Gy on the case's CT grid.
        dvhs, metrics: per structure, as in :class:`engine.runtime.DoseResult`.
        scorecard: the comparison's template scored on this dose (None when none applies).
        plan: the plan the dose belongs to, when known (its beams go into the report).
        source: how the dose was obtained ("AI prediction, 10 steps, model …", "RTDOSE …").
    """

    name: str
    dose: Volume
    dvhs: dict[str, DVH]
    metrics: dict[str, DoseMetrics]
    scorecard: ScorecardResult | None
    plan: Plan | None = None
    source: str = ""


@dataclass(frozen=True)
class ObjectiveDelta:
    """One scorecard objective for both doses. Values are in the objective's units (``unit``;
    % Rx for relative dose goals); ``delta`` is A − B (None unless both were evaluated)."""

    label: str
    structure: str | None
    unit: str
    value_a: float | None
    value_b: float | None
    delta: float | None
    passed_a: bool | None
    passed_b: bool | None
    score_a: float | None
    score_b: float | None


@dataclass(frozen=True)
class StructureDelta:
    """Mean and maximum dose (Gy) of one structure under both doses; deltas are A − B."""

    name: str
    mean_a_gy: float
    mean_b_gy: float
    max_a_gy: float
    max_b_gy: float

    @property
    def mean_delta_gy(self) -> float:
        return self.mean_a_gy - self.mean_b_gy

    @property
    def max_delta_gy(self) -> float:
        return self.max_a_gy - self.max_b_gy


@dataclass(frozen=True)
class PlanComparison:
    """Dose A against dose B on one patient (see the module docstring; every delta is A − B).

    Attributes:
        a, b: the two sides.
        difference: A − B in Gy on the CT grid.
        template: the scorecard template's name ("" when none applies).
        objectives: one row per template objective, in template order.
        structures: per-structure mean/max dose, for the structures both doses cover.
        mean_abs_diff_gy, max_abs_diff_gy: mean and maximum |A − B| inside the body.
        max_diff_gy, min_diff_gy: the largest and smallest A − B inside the body.
    """

    a: ComparedDose
    b: ComparedDose
    difference: Volume
    template: str
    objectives: tuple[ObjectiveDelta, ...]
    structures: tuple[StructureDelta, ...]
    mean_abs_diff_gy: float
    max_abs_diff_gy: float
    max_diff_gy: float
    min_diff_gy: float
    notes: tuple[str, ...] = field(default=())

    @property
    def total_delta(self) -> float | None:
        """Scorecard total A − B (totals are in [0, 1]); None without a scorecard."""
        if self.a.scorecard is None or self.b.scorecard is None:
            return None
        return self.a.scorecard.total - self.b.scorecard.total

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary (NaN and infinities become None)."""

        def card(side: ComparedDose) -> dict[str, Any] | None:
            c = side.scorecard
            return None if c is None else {"total": c.total, "passed": c.passed,
                                           "failed": c.failed}

        def side(s: ComparedDose) -> dict[str, Any]:
            plan = None
            if s.plan is not None:
                plan = {"name": s.plan.name,
                        "gantry_deg": [b.gantry_deg for b in s.plan.beams]}
            return {"name": s.name, "source": s.source, "plan": plan,
                    "max_gy": float(s.dose.array.max()), "scorecard": card(s)}

        doc = {
            "difference": "A - B",
            "a": side(self.a), "b": side(self.b),
            "scorecard_template": self.template or None,
            "scorecard_total_delta": self.total_delta,
            "diff_gy": {"mean_abs_in_body": self.mean_abs_diff_gy,
                        "max_abs_in_body": self.max_abs_diff_gy,
                        "max": self.max_diff_gy, "min": self.min_diff_gy},
            "objectives": [{"objective": r.label, "structure": r.structure, "unit": r.unit,
                            "a": r.value_a, "b": r.value_b, "delta": r.delta,
                            "passed_a": r.passed_a, "passed_b": r.passed_b}
                           for r in self.objectives],
            "structures": {s.name: {"mean_a_gy": s.mean_a_gy, "mean_b_gy": s.mean_b_gy,
                                    "mean_delta_gy": s.mean_delta_gy, "max_a_gy": s.max_a_gy,
                                    "max_b_gy": s.max_b_gy, "max_delta_gy": s.max_delta_gy}
                           for s in self.structures},
            "notes": list(self.notes),
        }
        return _clean(doc)


def objective_unit(objective: Objective) -> str:
    """The unit of an objective's value: the metric's ("Gy", "%", "cc"), "% Rx" for a dose
    metric relative to the prescription."""
    unit = objective.metric.unit
    return "% Rx" if objective.relative_to_prescription and unit == "Gy" else unit


def objective_deltas(card_a: ScorecardResult | None,
                     card_b: ScorecardResult | None) -> tuple[ObjectiveDelta, ...]:
    """Pair the objectives of two scorecards of one template; delta = A − B."""
    if card_a is None or card_b is None:
        return ()
    if card_a.template != card_b.template or len(card_a.results) != len(card_b.results):
        raise ValueError("the two scorecards come from different templates")
    rows = []
    for ra, rb in zip(card_a.results, card_b.results):
        delta = (ra.value - rb.value if ra.value is not None and rb.value is not None
                 else None)
        label = ra.objective.label
        rows.append(ObjectiveDelta(label=label, structure=ra.structure or rb.structure,
                                   unit=objective_unit(ra.objective), value_a=ra.value,
                                   value_b=rb.value, delta=delta, passed_a=ra.passed,
                                   passed_b=rb.passed, score_a=ra.score, score_b=rb.score))
    return tuple(rows)


def structure_deltas(dvhs_a: Mapping[str, DVH],
                     dvhs_b: Mapping[str, DVH]) -> tuple[StructureDelta, ...]:
    """Mean/max dose of the structures both DVH sets cover (non-empty), in A's order."""
    out = []
    for name, a in dvhs_a.items():
        b = dvhs_b.get(name)
        if b is None or a.volume_cc <= 0 or b.volume_cc <= 0:
            continue
        out.append(StructureDelta(name, a.mean_gy, b.mean_gy, a.max_gy, b.max_gy))
    return tuple(out)


def _on_grid(case: Case, dose: Volume, name: str) -> Volume:
    if dose.geometry != case.geometry:
        raise ValueError(f"{name}: the dose is not on the patient's CT grid "
                         f"({dose.geometry.shape} vs {case.geometry.shape})")
    return dose


def compare_doses(case: Case, dose_a: Volume, dose_b: Volume, name_a: str = "A",
                  name_b: str = "B", template: ScorecardTemplate | None = None,
                  plan_a: Plan | None = None, plan_b: Plan | None = None,
                  source_a: str = "", source_b: str = "") -> PlanComparison:
    """Compare two doses (Gy, both on ``case``'s CT grid); see the module docstring.

    ``template``: the scorecard to score both with; by default the shipped template that
    evaluates the most objectives on dose A (None applies when the case has no matching
    structures: no scorecard rows then).
    """
    a = np.asarray(_on_grid(case, dose_a, name_a).array, dtype=np.float32)
    b = np.asarray(_on_grid(case, dose_b, name_b).array, dtype=np.float32)
    structures = prepare(case.structures, case.geometry)
    if template is not None:
        bound: BoundScorecard | None = BoundScorecard(template, case.structures, case.geometry)
    else:
        bound = best_scorecard(case, a)

    def side(name: str, dose: Volume, array: np.ndarray, plan: Plan | None,
             source: str) -> ComparedDose:
        curves, metrics = all_metrics(array, structures, case.geometry)
        return ComparedDose(name=name, dose=dose, dvhs={c.name: c for c in curves},
                            metrics={m.name: m for m in metrics},
                            scorecard=bound.score(array) if bound is not None else None,
                            plan=plan, source=source)

    side_a = side(name_a, dose_a, a, plan_a, source_a)
    side_b = side(name_b, dose_b, b, plan_b, source_b)
    diff = a - b
    body = next((s.mask for s in case.structures if s.role is Role.EXTERNAL and s.mask.any()),
                None)
    notes = [] if body is not None else ["no body structure: difference figures over the grid"]
    inside = diff[body] if body is not None else diff.reshape(-1)
    return PlanComparison(
        a=side_a, b=side_b, difference=Volume(diff, case.geometry),
        template=bound.template.name if bound is not None else "",
        objectives=objective_deltas(side_a.scorecard, side_b.scorecard),
        structures=structure_deltas(side_a.dvhs, side_b.dvhs),
        mean_abs_diff_gy=float(np.abs(inside).mean()) if inside.size else 0.0,
        max_abs_diff_gy=float(np.abs(inside).max()) if inside.size else 0.0,
        max_diff_gy=float(inside.max()) if inside.size else 0.0,
        min_diff_gy=float(inside.min()) if inside.size else 0.0,
        notes=tuple(notes))
