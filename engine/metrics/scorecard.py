"""Clinical plan-quality scorecards: per-structure DVH objectives with piecewise-linear scores.

A template (TOML, see ``resources/scorecards/``) lists objectives such as "SpinalCord D0.03cc
<= 45 Gy". Each objective has a metric (:func:`engine.metrics.dvh.parse_metric`), a comparator
and goal that decide pass/fail, a piecewise-linear score function (points ``[value, score]``,
score in [0, 1], flat beyond the end points) and a weight. With
``relative_to_prescription = true`` doses are in percent of the prescription (the matched
target's, or the case's highest for other structures): a D or mean/max metric's goal and score
points are then % Rx, and a V metric's dose level is % Rx ("V95Gy" reads V at 95% Rx) while its
goal stays in % volume.

**Total**: the weighted mean of the scores of the objectives that could be evaluated, a float
in **[0, 1]** (1 = every objective at full score). Objectives whose structure the case lacks are
reported and left out of the total. ScardNFT uses the total as its reward, through
:class:`BoundScorecard` (names resolved and voxels prepared once, then one cheap call per dose).

Structure names resolve case-insensitively through the clinical alias table; ``PTV_High``,
``PTV_Mid`` and ``PTV_Low`` select targets by prescription rank.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomllib

from engine.case import Case, Geometry, Role, Structure
from engine.metrics.dvh import (
    DVH,
    Metric,
    StructureSet,
    compute_dvhs,
    metric_value,
    parse_metric,
    structure_samples,
)
from engine.structure_names import canonical_name

COMPARATORS = {"<=": lambda v, g: v <= g, "<": lambda v, g: v < g,
               ">=": lambda v, g: v >= g, ">": lambda v, g: v > g}
TARGET_SELECTORS = ("PTV_High", "PTV_Mid", "PTV_Low")
_OBJECTIVE_KEYS = {"structure", "metric", "comparator", "goal", "score", "weight",
                   "relative_to_prescription", "source"}
_HEADER_KEYS = {"name", "site", "description", "sources"}


class ScorecardError(ValueError):
    """A malformed scorecard template; the message names the file and line."""


@dataclass(frozen=True)
class Objective:
    """One scorecard line. ``structures``: names to look for, first match wins."""

    structures: tuple[str, ...]
    metric: Metric
    comparator: str
    goal: float
    points: tuple[tuple[float, float], ...]
    weight: float = 1.0
    relative_to_prescription: bool = False
    source: str = ""

    @property
    def label(self) -> str:
        unit = self.metric.unit
        if self.relative_to_prescription and unit == "Gy":
            unit = "% Rx"
        return f"{self.structures[0]} {self.metric.spec} {self.comparator} {self.goal:g} {unit}"

    def score_of(self, value: float) -> float:
        """Piecewise-linear score of a metric value (flat beyond the first and last points)."""
        xs, ys = zip(*self.points)
        return float(np.interp(value, xs, ys))


@dataclass(frozen=True)
class ScorecardTemplate:
    name: str
    site: str
    sources: tuple[str, ...]
    objectives: tuple[Objective, ...]
    description: str = ""
    path: str = ""


@dataclass(frozen=True)
class ObjectiveResult:
    """How one objective fared. ``value`` is in the objective's units (% Rx when relative)."""

    objective: Objective
    structure: str | None
    value: float | None
    score: float | None
    passed: bool | None
    note: str = ""

    @property
    def evaluated(self) -> bool:
        return self.score is not None


@dataclass(frozen=True)
class ScorecardResult:
    """The scorecard of one dose.

    Attributes:
        total: weighted mean score of the evaluated objectives, in [0, 1] (0 if none).
        passed, failed: counts of evaluated objectives meeting / missing their goal.
        results: one :class:`ObjectiveResult` per template objective, in template order.
    """

    template: str
    total: float
    passed: int
    failed: int
    results: tuple[ObjectiveResult, ...]

    @property
    def evaluated(self) -> int:
        return self.passed + self.failed


# --- names -------------------------------------------------------------------------------

def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical(name: str) -> str:
    """The alias-table spelling of a structure name (normalised text when not in the table)."""
    return canonical_name(name) or _normalise(name)


def resolve_structure(wanted: Sequence[str], names: Sequence[str]) -> str | None:
    """The first case structure matching any of ``wanted`` (exact text, then alias table)."""
    by_text = {_normalise(n): n for n in names}
    by_alias: dict[str, str] = {}
    for n in names:
        by_alias.setdefault(canonical(n), n)
    for w in wanted:
        hit = by_text.get(_normalise(w)) or by_alias.get(canonical(w))
        if hit is not None:
            return hit
    return None


def _select_targets(targets: Sequence[tuple[str, float]]) -> dict[str, tuple[str, float]]:
    """PTV_High / PTV_Mid / PTV_Low -> (name, prescription) by distinct prescription level.

    High is the highest level, Low the lowest (when there are two or more levels), Mid the
    middle one (three or more); targets sharing a level go by their order in the case.
    """
    levels = sorted({rx for _, rx in targets}, reverse=True)
    first = {}
    for name, rx in targets:
        first.setdefault(rx, (name, rx))
    out: dict[str, tuple[str, float]] = {}
    if levels:
        out["PTV_High"] = first[levels[0]]
    if len(levels) >= 2:
        out["PTV_Low"] = first[levels[-1]]
    if len(levels) >= 3:
        out["PTV_Mid"] = first[levels[len(levels) // 2]]
    return out


# --- evaluation --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Binding:
    structure: str | None
    prescription_gy: float | None
    note: str


def _bind_names(template: ScorecardTemplate, names: Sequence[str],
                targets: Sequence[tuple[str, float]]) -> tuple[_Binding, ...]:
    selected = _select_targets(targets)
    top_rx = max((rx for _, rx in targets), default=None)
    out = []
    for obj in template.objectives:
        chosen = None
        for wanted in obj.structures:
            if wanted in TARGET_SELECTORS:
                chosen = selected.get(wanted)
            else:
                hit = resolve_structure([wanted], names)
                rx = dict(targets).get(hit) if hit else None
                chosen = (hit, rx if rx is not None else top_rx) if hit else None
            if chosen:
                break
        if not chosen:
            out.append(_Binding(None, None, "structure not in case: "
                                             + " / ".join(obj.structures)))
            continue
        name, rx = chosen
        if obj.relative_to_prescription and not rx:
            out.append(_Binding(name, None, "no prescription known for a relative goal"))
            continue
        out.append(_Binding(name, rx, ""))
    return tuple(out)


def _evaluate(template: ScorecardTemplate, bindings: Sequence[_Binding],
              dvhs: Mapping[str, DVH]) -> ScorecardResult:
    results = []
    points = weights = 0.0
    passed = failed = 0
    for obj, b in zip(template.objectives, bindings):
        if b.structure is None or b.note:
            results.append(ObjectiveResult(obj, b.structure, None, None, None, b.note))
            continue
        curve = dvhs[b.structure]
        metric = obj.metric
        if obj.relative_to_prescription and metric.kind in ("volume_pct_at", "volume_cc_at"):
            metric = Metric(metric.spec, metric.kind, metric.value * b.prescription_gy / 100.0,
                            metric.unit)
        value = metric_value(curve, metric)
        if obj.relative_to_prescription and metric.unit == "Gy":
            value = 100.0 * value / b.prescription_gy
        if not math.isfinite(value):
            results.append(ObjectiveResult(obj, b.structure, None, None, None,
                                           "no dose over the structure"))
            continue
        s = obj.score_of(value)
        ok = COMPARATORS[obj.comparator](value, obj.goal)
        passed += ok
        failed += not ok
        points += obj.weight * s
        weights += obj.weight
        results.append(ObjectiveResult(obj, b.structure, value, s, ok, "; ".join(curve.warnings)))
    total = points / weights if weights > 0 else 0.0
    return ScorecardResult(template.name, total, passed, failed, tuple(results))


def evaluate(template: ScorecardTemplate, dvhs: Mapping[str, DVH],
             prescriptions: Mapping[str, float]) -> ScorecardResult:
    """Score DVHs already computed (``{structure name: DVH}``; targets' prescriptions in Gy)."""
    bindings = _bind_names(template, list(dvhs), list(prescriptions.items()))
    return _evaluate(template, bindings, dvhs)


class BoundScorecard:
    """A template bound to one case's structures: resolve once, then score many doses fast."""

    def __init__(self, template: ScorecardTemplate, structures: Case | Sequence[Structure],
                 geometry: Geometry | None = None):
        if isinstance(structures, Case):
            structures, geometry = structures.structures, geometry or structures.geometry
        if geometry is None:
            raise ValueError("scoring structures needs their grid: pass geometry (or a Case)")
        self.template = template
        targets = [(s.name, float(s.prescription_gy)) for s in structures
                   if s.role is Role.TARGET and s.prescription_gy]
        self._bindings = _bind_names(template, [s.name for s in structures], targets)
        needed = {b.structure for b in self._bindings if b.structure and not b.note}
        chosen = [s for s in structures if s.name in needed]
        self._set = StructureSet.of(structure_samples(s, geometry) for s in chosen)

    def score(self, dose: np.ndarray) -> ScorecardResult:
        """Scorecard of a ``[z, y, x]`` dose in Gy on the case's grid."""
        dvhs = {s.name: c for s, c in zip(self._set.samples, compute_dvhs(dose, self._set))}
        return _evaluate(self.template, self._bindings, dvhs)


SCORECARD_SITES = ("head_neck", "lung", "prostate")


def best_scorecard(case: Case, dose: np.ndarray,
                   sites: Sequence[str] = SCORECARD_SITES) -> BoundScorecard | None:
    """The shipped template that fits ``case`` best, bound to it: the one of ``sites`` that
    evaluates the most objectives on ``dose`` (Gy on the case's grid); None when none applies.
    The engine picks a result's scorecard this way, so comparisons use the same template."""
    best, best_n = None, 0
    for site in sites:
        bound = BoundScorecard(builtin_template(site), case.structures, case.geometry)
        n = bound.score(dose).evaluated
        if n > best_n:
            best, best_n = bound, n
    return best


def score(dose: np.ndarray, case_structures: Case | Sequence[Structure],
          template: ScorecardTemplate, geometry: Geometry | None = None) -> ScorecardResult:
    """Scorecard of one dose (Gy, ``[z, y, x]`` on the structures' grid); total in [0, 1].

    ``case_structures`` is a :class:`Case` or its structures with their ``geometry``. For many
    doses of one case (ScardNFT rewards), build a :class:`BoundScorecard` once and call its
    ``score``: names are resolved and voxels prepared once, each call costs one DVH pass over
    the scored structures only.
    """
    return BoundScorecard(template, case_structures, geometry).score(dose)


# --- templates ---------------------------------------------------------------------------

def _line_of(text: str, index: int | None, key: str | None) -> int:
    """1-based line of ``key`` in the ``index``-th ``[[objective]]`` (or the header table)."""
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\[\s*objective\s*\]\]") if index is not None else re.compile(
        r"^\s*\[\s*scorecard\s*\]")
    starts = [i for i, line in enumerate(lines) if header.match(line)]
    if index is not None and index >= len(starts) or not starts:
        return 1
    first = starts[index if index is not None else 0]
    if key is None:
        return first + 1
    key_re = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
    for i in range(first + 1, len(lines)):
        if re.match(r"^\s*\[", lines[i]):
            break
        if key_re.match(lines[i]):
            return i + 1
    return first + 1


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_objective(raw: object, index: int, fail) -> Objective:
    if not isinstance(raw, dict):
        fail(index, None, "each [[objective]] must be a table")
    unknown = set(raw) - _OBJECTIVE_KEYS
    if unknown:
        key = sorted(unknown)[0]
        fail(index, key, f"unknown key {key!r} (allowed: {', '.join(sorted(_OBJECTIVE_KEYS))})")
    for key in ("structure", "metric", "comparator", "goal", "score"):
        if key not in raw:
            fail(index, None, f"missing key {key!r}")
    structure = raw["structure"]
    names = (structure,) if isinstance(structure, str) else structure
    if (not isinstance(names, list | tuple) or not names
            or not all(isinstance(n, str) and n.strip() for n in names)):
        fail(index, "structure", "structure must be a name or a list of names")
    try:
        metric = parse_metric(str(raw["metric"]))
    except ValueError as exc:
        fail(index, "metric", str(exc))
    if metric.kind == "hi":
        fail(index, "metric", "HI is a report, not an objective metric")
    if raw["comparator"] not in COMPARATORS:
        fail(index, "comparator", f"comparator must be one of {', '.join(COMPARATORS)}")
    if not _number(raw["goal"]):
        fail(index, "goal", "goal must be a number")
    pts = raw["score"]
    if (not isinstance(pts, list) or len(pts) < 2
            or not all(isinstance(p, list) and len(p) == 2 and all(map(_number, p))
                       for p in pts)):
        fail(index, "score", "score must be a list of at least two [value, score] pairs")
    xs = [float(p[0]) for p in pts]
    ys = [float(p[1]) for p in pts]
    if any(b <= a for a, b in zip(xs, xs[1:])):
        fail(index, "score", "score points must have strictly increasing values")
    if any(y < 0 or y > 1 for y in ys):
        fail(index, "score", "scores must lie in [0, 1]")
    weight = raw.get("weight", 1.0)
    if not _number(weight) or weight <= 0:
        fail(index, "weight", "weight must be a positive number")
    relative = raw.get("relative_to_prescription", False)
    if not isinstance(relative, bool):
        fail(index, "relative_to_prescription", "relative_to_prescription must be true or false")
    return Objective(structures=tuple(n.strip() for n in names), metric=metric,
                     comparator=raw["comparator"], goal=float(raw["goal"]),
                     points=tuple(zip(xs, ys)), weight=float(weight),
                     relative_to_prescription=relative, source=str(raw.get("source", "")))


def parse_template(text: str, path: str = "<scorecard>") -> ScorecardTemplate:
    """Parse and validate a template; ScorecardError names ``path`` and the offending line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScorecardError(f"{path}: TOML syntax error: {exc}") from exc

    def fail(index: int | None, key: str | None, message: str) -> None:
        where = "[scorecard]" if index is None else f"objective #{index + 1}"
        raise ScorecardError(f"{path}:{_line_of(text, index, key)}: {where}: {message}")

    header = data.get("scorecard")
    if not isinstance(header, dict):
        raise ScorecardError(f"{path}:1: missing the [scorecard] table (name, site, sources)")
    unknown = set(header) - _HEADER_KEYS
    if unknown:
        key = sorted(unknown)[0]
        fail(None, key, f"unknown key {key!r} (allowed: {', '.join(sorted(_HEADER_KEYS))})")
    for key in ("name", "site"):
        if not isinstance(header.get(key), str) or not header[key].strip():
            fail(None, key if key in header else None, f"{key!r} must be a non-empty string")
    sources = header.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str)
                                                               for s in sources):
        fail(None, "sources" if "sources" in header else None,
             "'sources' must list the published guidance the values come from")
    extra = set(data) - {"scorecard", "objective"}
    if extra:
        key = sorted(extra)[0]
        line = next((i + 1 for i, ln in enumerate(text.splitlines())
                     if re.match(rf"^\s*\[*\s*{re.escape(key)}\b", ln)), 1)
        raise ScorecardError(f"{path}:{line}: unknown table {key!r} (use [scorecard] and "
                             f"[[objective]])")
    raw = data.get("objective")
    if not isinstance(raw, list) or not raw:
        raise ScorecardError(f"{path}:1: no [[objective]] entries")
    objectives = tuple(_parse_objective(r, i, fail) for i, r in enumerate(raw))
    return ScorecardTemplate(name=header["name"].strip(), site=header["site"].strip(),
                             sources=tuple(sources), objectives=objectives,
                             description=str(header.get("description", "")), path=path)


def load_template(path: str | Path) -> ScorecardTemplate:
    """Read a scorecard template file (TOML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScorecardError(f"{path}: cannot read ({exc})") from exc
    return parse_template(text, str(path))


def builtin_template(site: str) -> ScorecardTemplate:
    """A shipped template: "head_neck", "lung" or "prostate"."""
    from engine.resources import resource_path

    try:
        return load_template(resource_path("scorecards", f"{site}.toml"))
    except FileNotFoundError as exc:
        raise ScorecardError(f"no shipped scorecard for site {site!r} ({exc})") from exc
