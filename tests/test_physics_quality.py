"""Plan quality figures and the acceptance rule of generated physics plans."""

from __future__ import annotations

import numpy as np
import pytest

from engine.io.openkbp import load_openkbp_npz
from engine.physics.quality import plan_quality, rejection_reasons
from tests.test_physics_dataset import make_openkbp_case


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "pt_1.npz"
    make_openkbp_case(path)
    return load_openkbp_npz(path)


def _plan_like(case) -> np.ndarray:
    """A dose a planner accepts: 70 Gy in PTV70, 57 in the rest of PTV56, 30 elsewhere in the
    body, 20 in the cord and brainstem."""
    s = {x.name: x.mask for x in case.structures}
    dose = np.where(s["Body"], 30.0, 0.0)
    dose[s["PTV56"]] = 57.0
    dose[s["PTV70"]] = 70.0
    dose[s["SpinalCord"] | s["Brainstem"]] = 20.0
    return dose.astype(np.float32)


def test_figures_of_a_known_dose(case):
    dose = _plan_like(case)
    ptv70 = case.structure("PTV70").mask
    hot = tuple(np.argwhere(ptv70)[0])
    dose[hot] = 77.0  # one voxel: the maximum, not the D2 of a ~1000-voxel target
    q = plan_quality(case, dose)
    assert q["rx_gy"] == 70.0 and list(q["targets"]) == ["PTV70", "PTV56"]
    assert q["targets"]["PTV70"] == {"rx_gy": 70.0, "d95_gy": 70.0, "d2_gy": 70.0,
                                     "d95_rel": 1.0, "d2_rel": 1.0}
    assert q["targets"]["PTV56"]["d95_rel"] == pytest.approx(57 / 56, abs=1e-3)
    assert q["body_dmax_gy"] == 77.0 and q["body_dmax_rel"] == pytest.approx(1.1)
    assert q["oars"]["SpinalCord"] == {"mean_gy": 20.0, "max_gy": 20.0}
    assert q["oars"]["LeftParotid"]["mean_gy"] == pytest.approx(
        dose[case.structure("LeftParotid").mask].mean(), abs=1e-3)
    assert rejection_reasons(q) == []


def test_each_limit_of_the_rule_rejects(case):
    s = {x.name: x.mask for x in case.structures}
    cold = _plan_like(case)
    cold[s["PTV56"] & ~s["PTV70"]] = 0.9 * 56.0
    assert rejection_reasons(plan_quality(case, cold)) == ["PTV56 D95 90.0% < 93%"]
    hot_target = _plan_like(case)
    hot_target[s["PTV70"]] = np.linspace(70.0, 80.0, s["PTV70"].sum())
    reasons = rejection_reasons(plan_quality(case, hot_target))
    assert len(reasons) == 1 and reasons[0].startswith("PTV70 D2 11")
    hot_spot = _plan_like(case)
    outside = tuple(np.argwhere(s["Body"] & ~s["PTV56"])[0])
    hot_spot[outside] = 1.25 * 70.0
    assert rejection_reasons(plan_quality(case, hot_spot)) == ["body Dmax 125.0% > 120%"]
    cord = _plan_like(case)
    cord[tuple(np.argwhere(s["SpinalCord"])[0])] = 52.0
    cord[tuple(np.argwhere(s["Brainstem"])[0])] = 61.0
    assert rejection_reasons(plan_quality(case, cord)) == [
        "Brainstem max 61.0 Gy > 60.0 Gy", "SpinalCord max 52.0 Gy > 50.0 Gy"]


def test_a_dose_on_another_grid_is_refused(case):
    with pytest.raises(ValueError, match="case grid"):
        plan_quality(case, np.zeros((3, 3, 3), np.float32))
