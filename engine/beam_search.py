"""Beam-angle suggestion: search coplanar static arrangements with the AI preview as objective.

An IMRT beam-angle optimiser in a TPS spends minutes of fluence optimisation per candidate; the
engine's 1-step preview (:meth:`engine.runtime.DoseEngine.preview`) costs well under a second,
so hundreds of arrangements fit in a planner's coffee break. The search is deliberately simple
and readable:

1. **Equispaced scan**: the ``n``-field class solution turned in 5 deg steps over one period
   (360/n deg); a beam in a forbidden sector is moved just past the sector's nearer edge;
2. **Coordinate descent** from the best few: each beam in turn moves by +-20, then +-10, then
   +-5 deg while that lowers the objective (a move into a forbidden sector, or closer than
   :data:`MIN_SEPARATION_DEG` to another beam, is not tried);

until the time budget is spent or nothing improves. Every evaluated arrangement is cached by its
angles. Angles are IEC 61217 gantry degrees in [0, 360), couch 0, all beams about the plan's
isocentre.

The objective (:class:`SearchObjective`, lower is better, shown to the user) combines the
scorecard total (the clinical goals of the case's site, 0..1), the target coverage deficit (Gy
below 95 % of each target's prescription at D95) and the mean dose of the parotids and the
maxima of the spinal cord and brainstem. It judges the **model's** dose: a suggestion is only
as good as the model's beam sensitivity, so every suggestion should be verified with physics
(``dosepilot physics dose``, or "Verify with physics" in the window).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.case import Beam, Case, Plan, Role, Technique
from engine.structure_names import canonical_name

MIN_SEPARATION_DEG = 10.0
SCAN_STEP_DEG = 5.0
DESCENT_STEPS_DEG = (20.0, 10.0, 5.0)

#: canonical organ name -> the DVH figure the default objective uses
DEFAULT_OARS: dict[str, str] = {"Parotid_L": "mean", "Parotid_R": "mean",
                                "SpinalCord": "max", "Brainstem": "max"}


@dataclass(frozen=True)
class SearchObjective:
    """What the search minimises (all weights per unit of their term; see :func:`score`).

    ``scorecard_weight`` x (1 - scorecard total) + ``coverage_weight`` x (Gy of D95 deficit
    below 95 % of each target's prescription, summed) + ``oar_weight`` x (Gy of the listed organ
    figures, summed)."""

    scorecard_weight: float = 20.0
    coverage_weight: float = 1.0
    oar_weight: float = 0.1
    oars: tuple[tuple[str, str], ...] = tuple(DEFAULT_OARS.items())

    def describe(self) -> str:
        oars = ", ".join(f"{name} {figure}" for name, figure in self.oars)
        return (f"{self.scorecard_weight:g} x (1 - scorecard) + {self.coverage_weight:g} x "
                f"target D95 deficit (Gy) + {self.oar_weight:g} x ({oars}) (Gy)")


@dataclass(frozen=True)
class Candidate:
    """One evaluated arrangement: gantry angles (sorted, degrees), objective value, its terms."""

    gantry_deg: tuple[float, ...]
    value: float
    terms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchResult:
    """The best distinct candidates (best first), the equispaced arrangement from 0 deg as the
    reference, how many arrangements were evaluated, the seconds spent and the slowest single
    evaluation's seconds (no new one starts once the budget is spent, so ``seconds`` exceeds
    the budget by less than about that, unless the budget ran out before any allowed
    arrangement was evaluated: the equispaced scan goes on until it finds one)."""

    best: tuple[Candidate, ...]
    equispaced: Candidate
    evaluated: int
    seconds: float
    objective: str
    slowest_s: float = 0.0


def parse_sector(text: str) -> tuple[float, float]:
    """``"A-B"`` (degrees, clockwise from A to B, e.g. ``"300-60"`` through 0) -> (A, B)."""
    parts = text.split("-")
    try:
        a, b = (float(v) % 360.0 for v in parts)
    except ValueError:
        message = f"a forbidden sector is two angles 'A-B' in degrees, got {text!r}"
        raise ValueError(message) from None
    return a, b


def in_sector(angle: float, sector: tuple[float, float]) -> bool:
    """Whether ``angle`` lies in the clockwise sector from ``sector[0]`` to ``sector[1]``."""
    a, b = sector
    return (angle - a) % 360.0 <= (b - a) % 360.0


def allowed(angles: Sequence[float], forbid: Sequence[tuple[float, float]],
            min_separation_deg: float = MIN_SEPARATION_DEG) -> bool:
    """No beam in a forbidden sector and every two beams at least ``min_separation_deg``
    apart."""
    if any(in_sector(a, s) for a in angles for s in forbid):
        return False
    ordered = sorted(a % 360.0 for a in angles)
    gaps = [b - a for a, b in zip(ordered, ordered[1:])] + [ordered[0] + 360.0 - ordered[-1]]
    return len(ordered) < 2 or min(gaps) >= min_separation_deg - 1e-9


def equispaced(n: int, start: float) -> tuple[float, ...]:
    return tuple(sorted(round((start + k * 360.0 / n) % 360.0, 1) for k in range(n)))


def nudge_out(angles: Sequence[float], forbid: Sequence[tuple[float, float]]
              ) -> tuple[float, ...]:
    """``angles`` with every beam inside a forbidden sector moved just past its nearer edge
    (by :data:`SCAN_STEP_DEG`)."""
    out = []
    for angle in angles:
        for _ in range(len(forbid) + 1):  # an edge may fall into a neighbouring sector
            hit = next((s for s in forbid if in_sector(angle, s)), None)
            if hit is None:
                break
            start, end = hit
            angle = ((start - SCAN_STEP_DEG) if (angle - start) % 360.0 < (end - angle) % 360.0
                     else (end + SCAN_STEP_DEG)) % 360.0
        out.append(round(angle, 1))
    return tuple(sorted(out))


def _figure(result: object, name: str, figure: str) -> float | None:
    metrics = result.metrics.get(name)
    if metrics is None:
        return None
    return float(metrics.mean_gy if figure == "mean" else metrics.max_gy)


def score(result: object, case: Case, objective: SearchObjective) -> tuple[float, dict]:
    """The objective value of one dose result (a :class:`engine.runtime.DoseResult`) and its
    terms, by structure names resolved to their canonical spelling."""
    by_canonical = {canonical_name(s.name): s.name for s in case.structures}
    deficit = 0.0
    for s in case.structures:
        if s.role is Role.TARGET and s.prescription_gy and s.name in result.metrics:
            deficit += max(0.0, 0.95 * s.prescription_gy - result.metrics[s.name].d95_gy)
    oar_sum, terms = 0.0, {}
    for canonical, figure in objective.oars:
        name = by_canonical.get(canonical)
        value = _figure(result, name, figure) if name is not None else None
        if value is not None:
            terms[f"{canonical} {figure} (Gy)"] = round(value, 2)
            oar_sum += value
    card = result.scorecard.total if result.scorecard is not None else 0.0
    terms.update({"scorecard": round(card, 4), "target D95 deficit (Gy)": round(deficit, 2)})
    value = (objective.scorecard_weight * (1.0 - card) + objective.coverage_weight * deficit
             + objective.oar_weight * oar_sum)
    return value, terms


def plan_with_angles(plan: Plan, angles: Sequence[float]) -> Plan:
    """``plan`` with its beams replaced by static coplanar beams at ``angles`` (its isocentre,
    energy and SAD kept; named B1.. in angle order)."""
    first = plan.beams[0]
    beams = [Beam(f"B{i + 1}", float(a), first.isocenter_mm, couch_deg=0.0,
                  technique=Technique.STATIC, sad_mm=first.sad_mm, energy_mv=first.energy_mv,
                  number=i + 1)
             for i, a in enumerate(sorted(a % 360.0 for a in angles))]
    return dataclasses.replace(plan, beams=tuple(beams))


class SearchCancelled(Exception):
    """The caller cancelled the search."""


def suggest_beams(engine: object, case: Case, n_beams: int,
                  forbid: Sequence[tuple[float, float]] = (), budget_s: float = 60.0,
                  keep: int = 3, objective: SearchObjective = SearchObjective(),
                  progress: Callable[[int, float], None] | None = None,
                  cancel: threading.Event | None = None,
                  min_separation_deg: float = MIN_SEPARATION_DEG) -> SearchResult:
    """Search ``n_beams``-field coplanar arrangements for ``case`` (its plan's isocentre) with
    ``engine.preview``; ``progress(evaluated, best_value)`` after each evaluation. No two beams
    come closer than ``min_separation_deg`` (at most 360 / ``n_beams``, the equispaced gap)."""
    if case.plan is None or not case.plan.beams:
        raise ValueError(f"case {case.name!r} has no plan (isocentre) to search beams for")
    if not 1 <= n_beams <= 36:
        raise ValueError(f"the number of beams must be 1..36, got {n_beams}")
    if not 0.0 <= min_separation_deg <= 360.0 / n_beams:
        raise ValueError(f"the minimum beam separation must be 0..{360.0 / n_beams:g} deg for "
                         f"{n_beams} beams, got {min_separation_deg:g}")

    def ok(angles: Sequence[float]) -> bool:
        return allowed(angles, forbid, min_separation_deg)

    t0 = time.perf_counter()
    cache: dict[tuple[float, ...], Candidate] = {}
    slowest = 0.0

    def evaluate(angles: Sequence[float]) -> Candidate:
        nonlocal slowest
        key = tuple(sorted(round(a % 360.0, 1) for a in angles))
        if key not in cache:
            if cancel is not None and cancel.is_set():
                raise SearchCancelled("beam search cancelled")
            started = time.perf_counter()
            result = engine.preview(case, plan_with_angles(case.plan, key))
            value, terms = score(result, case, objective)
            cache[key] = Candidate(key, value, terms)
            slowest = max(slowest, time.perf_counter() - started)
            if progress is not None:
                progress(len(cache), min(c.value for c in cache.values()))
        return cache[key]

    def out_of_time() -> bool:
        return time.perf_counter() - t0 >= budget_s

    reference = evaluate(equispaced(n_beams, 0.0))
    period = 360.0 / n_beams
    starts = [k * SCAN_STEP_DEG for k in range(max(1, math.ceil(period / SCAN_STEP_DEG)))]
    for start in starts:
        # a spent budget (the first preview also prepares the patient, which on a loaded
        # machine can take it all) still lets the scan find one allowed arrangement
        if out_of_time() and any(ok(c.gantry_deg) for c in cache.values()):
            break
        angles = equispaced(n_beams, start)
        if not ok(angles):
            angles = nudge_out(angles, forbid)
        if ok(angles):
            evaluate(angles)
    seeds = sorted((c for c in cache.values() if ok(c.gantry_deg)),
                   key=lambda c: c.value)[:keep]
    for seed in seeds:
        current = seed
        for step in DESCENT_STEPS_DEG:
            improved = True
            while improved and not out_of_time():
                improved = False
                for i in range(n_beams):
                    for delta in (step, -step):
                        angles = list(current.gantry_deg)
                        angles[i] = (angles[i] + delta) % 360.0
                        if out_of_time() or not ok(angles):
                            continue
                        candidate = evaluate(angles)
                        if candidate.value < current.value - 1e-9:
                            current, improved = candidate, True
    ranked = sorted((c for c in cache.values() if ok(c.gantry_deg)),
                    key=lambda c: c.value)
    return SearchResult(tuple(ranked[:keep]), reference, len(cache),
                        time.perf_counter() - t0, objective.describe(), slowest)
