"""Scorecard templates (shipped and malformed), scoring arithmetic and name resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.case import Case, Geometry, Structure, Volume
from engine.metrics.dvh import compute_dvhs, prepare
from engine.metrics.scorecard import (
    BoundScorecard,
    ScorecardError,
    builtin_template,
    evaluate,
    load_template,
    parse_template,
    resolve_structure,
    score,
)

GOOD = """\
[scorecard]
name = "Test card"
site = "head_neck"
sources = ["made up for a test"]

[[objective]]
structure = "SpinalCord"
metric = "D0.03cc"
comparator = "<="
goal = 45.0
score = [[40.0, 1.0], [50.0, 0.0]]
weight = 1

[[objective]]
structure = "PTV_High"
metric = "D95"
comparator = ">="
goal = 95.0
relative_to_prescription = true
score = [[90.0, 0.0], [100.0, 1.0]]
weight = 3

[[objective]]
structure = ["Parotid_L", "Parotid Left"]
metric = "Dmean"
comparator = "<"
goal = 26.0
score = [[20.0, 1.0], [30.0, 0.0]]
weight = 2
"""

GEOM = Geometry((20, 20, 20), (0.0, 0.0, 0.0), (3.0, 3.0, 3.0))


def block(z0: int) -> np.ndarray:
    m = np.zeros(GEOM.shape, bool)
    m[z0:z0 + 4, 5:15, 5:15] = True
    return m


def case_structures() -> list[Structure]:
    return [Structure("PTV70", "target", block(2), prescription_gy=70.0),
            Structure("PTV56", "target", block(8), prescription_gy=56.0),
            Structure("Cord", "oar", block(14))]


def uniform_dose(ptv70: float, ptv56: float, cord: float) -> np.ndarray:
    dose = np.zeros(GEOM.shape, np.float32)
    dose[block(2)], dose[block(8)], dose[block(14)] = ptv70, ptv56, cord
    return dose


@pytest.mark.parametrize("site", ["head_neck", "lung", "prostate"])
def test_shipped_templates_load(site: str) -> None:
    t = builtin_template(site)
    assert t.site == site
    assert t.sources and all(len(s) > 20 for s in t.sources)
    assert len(t.objectives) >= 8
    assert all(o.source for o in t.objectives)
    assert any(o.structures == ("PTV_High",) for o in t.objectives)


def test_unknown_site_is_a_clear_error() -> None:
    with pytest.raises(ScorecardError, match="no shipped scorecard for site 'brain'"):
        builtin_template("brain")


def test_score_function_is_piecewise_linear_and_flat_outside() -> None:
    t = parse_template(GOOD)
    cord = t.objectives[0]
    assert cord.score_of(30.0) == 1.0
    assert cord.score_of(45.0) == pytest.approx(0.5)
    assert cord.score_of(47.5) == pytest.approx(0.25)
    assert cord.score_of(80.0) == 0.0
    assert cord.label == "SpinalCord D0.03cc <= 45 Gy"
    assert t.objectives[1].label == "PTV_High D95 >= 95 % Rx"


def test_total_is_the_weighted_mean_and_pass_fail_follows_the_goal() -> None:
    t = parse_template(GOOD)
    # cord 48 Gy -> score 0.2, fails; PTV70 D95 = 70 Gy = 100% -> 1.0, passes; no parotid
    result = score(uniform_dose(70.0, 56.0, 48.0), case_structures(), t, GEOM)
    by_label = {r.objective.label: r for r in result.results}
    cord = by_label["SpinalCord D0.03cc <= 45 Gy"]
    assert cord.structure == "Cord" and cord.value == pytest.approx(48.0, abs=0.01)
    assert cord.score == pytest.approx(0.2, abs=1e-3) and cord.passed is False
    ptv = by_label["PTV_High D95 >= 95 % Rx"]
    assert ptv.structure == "PTV70" and ptv.value == pytest.approx(100.0, abs=0.05)
    assert ptv.passed is True
    parotid = by_label["Parotid_L Dmean < 26 Gy"]
    assert not parotid.evaluated and "not in case" in parotid.note
    assert result.total == pytest.approx((1 * 0.2 + 3 * 1.0) / 4, abs=1e-3)
    assert (result.passed, result.failed, result.evaluated) == (1, 1, 2)
    worse = score(uniform_dose(63.0, 56.0, 48.0), case_structures(), t, GEOM)
    assert worse.total < result.total  # PTV70 at 90% Rx scores 0


def test_bound_scorecard_matches_one_shot_and_evaluate() -> None:
    t = parse_template(GOOD)
    structures = case_structures()
    bound = BoundScorecard(t, structures, GEOM)
    for cord in (30.0, 45.0, 52.0):
        dose = uniform_dose(68.0, 55.0, cord)
        a, b = bound.score(dose), score(dose, structures, t, GEOM)
        assert a.total == pytest.approx(b.total)
        case = Case("c", Volume(np.zeros(GEOM.shape, np.float32), GEOM), tuple(structures))
        assert score(dose, case, t).total == pytest.approx(a.total)
        dvhs = dict(zip([s.name for s in structures],
                        compute_dvhs(dose, prepare(structures, GEOM))))
        c = evaluate(t, dvhs, {"PTV70": 70.0, "PTV56": 56.0})
        assert c.total == pytest.approx(a.total)
        assert 0.0 <= a.total <= 1.0


def test_relative_volume_metric_reads_the_dose_level_in_percent_of_rx() -> None:
    text = GOOD.split("[[objective]]")[0] + """
[[objective]]
structure = "PTV_Low"
metric = "V95Gy"
comparator = ">="
goal = 95.0
relative_to_prescription = true
score = [[80.0, 0.0], [95.0, 1.0]]
"""
    t = parse_template(text)
    # PTV56 uniformly at 52 Gy = 92.9% Rx: V95%Rx (53.2 Gy) = 0%
    r = score(uniform_dose(70.0, 52.0, 10.0), case_structures(), t, GEOM).results[0]
    assert r.structure == "PTV56" and r.value == pytest.approx(0.0, abs=0.5)
    r = score(uniform_dose(70.0, 54.0, 10.0), case_structures(), t, GEOM).results[0]
    assert r.value == pytest.approx(100.0, abs=0.5) and r.passed


@pytest.mark.parametrize("wanted, names, expected", [
    (["SpinalCord"], ["Cord", "SpinalCord"], "SpinalCord"),
    (["Parotid_L"], ["RightParotid", "LeftParotid"], "LeftParotid"),
    (["Parotid_R"], ["Parotid Rt", "Parotid Lt"], "Parotid Rt"),
    (["BRAINSTEM"], ["Brainstem"], "Brainstem"),
    (["Larynx"], ["Brainstem"], None),
    (["Lungs", "Total Lung-GTV"], ["Total Lung-GTV"], "Total Lung-GTV"),
])
def test_resolve_structure(wanted: list[str], names: list[str], expected: str | None) -> None:
    assert resolve_structure(wanted, names) == expected


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "card.toml"
    p.write_text(text, encoding="utf-8")
    return p


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    return hits[occurrence - 1]


def test_loads_from_a_file(tmp_path: Path) -> None:
    t = load_template(write(tmp_path, GOOD))
    assert t.name == "Test card" and t.path.endswith("card.toml")


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    bad = GOOD.replace('goal = 26.0', 'goal = = 26.0')
    p = write(tmp_path, bad)
    with pytest.raises(ScorecardError) as err:
        load_template(p)
    msg = str(err.value)
    assert str(p) in msg and f"line {line_of(bad, 'goal = = 26.0')}" in msg


@pytest.mark.parametrize("old, new, needle, occurrence, message", [
    ('comparator = ">="', 'comparator = "=>"', 'comparator = "=>"', 1, "comparator must be"),
    ('metric = "Dmean"', 'metric = "Dmedian"', 'metric = "Dmedian"', 1, "unknown metric"),
    ("weight = 3", "wieght = 3", "wieght", 1, "unknown key 'wieght'"),
    ("score = [[20.0, 1.0], [30.0, 0.0]]", "score = [[30.0, 1.0], [20.0, 0.0]]",
     "score = [[30.0, 1.0], [20.0, 0.0]]", 1, "strictly increasing"),
    ("score = [[40.0, 1.0], [50.0, 0.0]]", "score = [[40.0, 1.0], [50.0, 2.0]]",
     "[50.0, 2.0]", 1, r"in \[0, 1\]"),
    ("weight = 1\n", "weight = -1\n", "weight = -1", 1, "positive"),
    ("goal = 45.0", 'goal = "45"', 'goal = "45"', 1, "goal must be a number"),
    ('relative_to_prescription = true', 'relative_to_prescription = "yes"',
     'relative_to_prescription = "yes"', 1, "true or false"),
])
def test_schema_errors_name_file_and_line(tmp_path: Path, old: str, new: str, needle: str,
                                          occurrence: int, message: str) -> None:
    assert old in GOOD
    bad = GOOD.replace(old, new, 1)
    p = write(tmp_path, bad)
    with pytest.raises(ScorecardError, match=message) as err:
        load_template(p)
    assert f"{p}:{line_of(bad, needle, occurrence)}:" in str(err.value)


def test_missing_key_points_at_its_objective(tmp_path: Path) -> None:
    bad = GOOD.replace('metric = "D95"\n', "")
    p = write(tmp_path, bad)
    with pytest.raises(ScorecardError, match="objective #2: missing key 'metric'") as err:
        load_template(p)
    assert f"{p}:{line_of(bad, '[[objective]]', 2)}:" in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("[[objective]]\nstructure = 'x'\n", "missing the \\[scorecard\\] table"),
    ('[scorecard]\nname = "n"\nsite = "s"\nsources = ["x"]\n', "no \\[\\[objective\\]\\]"),
    ('[scorecard]\nname = "n"\nsite = "s"\n', "'sources' must list"),
    ('[scorecard]\nname = "n"\nsite = "s"\nsources = ["x"]\n[extra]\n', "unknown table 'extra'"),
])
def test_header_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ScorecardError, match=message):
        load_template(write(tmp_path, text))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ScorecardError, match="cannot read"):
        load_template(tmp_path / "missing.toml")


def test_structures_without_a_grid_are_an_error() -> None:
    with pytest.raises(ValueError, match="needs their grid"):
        score(uniform_dose(70.0, 56.0, 10.0), case_structures(), parse_template(GOOD))


def test_target_selectors_use_distinct_prescription_levels() -> None:
    from engine.metrics.scorecard import _select_targets

    chosen = _select_targets([("PTV70", 70.0), ("PTV70_nodes", 70.0), ("PTV56", 56.0),
                              ("PTV63", 63.0)])
    assert chosen == {"PTV_High": ("PTV70", 70.0), "PTV_Mid": ("PTV63", 63.0),
                      "PTV_Low": ("PTV56", 56.0)}
    assert _select_targets([("A", 60.0), ("B", 60.0)]) == {"PTV_High": ("A", 60.0)}
    assert _select_targets([]) == {}
