"""Agreement of a model's dose change with the physics dose change when a beam moves."""

from __future__ import annotations

import numpy as np
import pytest

from engine.metrics.beam_change import beam_change_agreement


def _doses():
    rng = np.random.default_rng(0)
    before = rng.uniform(0, 60, (6, 8, 10))
    change = np.zeros_like(before)
    change[:, :4] = 8.0       # the moved beam now passes here ...
    change[:, 4:6] = -6.0     # ... and no longer here
    return before, before + change, np.ones(before.shape, bool)


def test_a_model_that_follows_physics_agrees():
    before, after, body = _doses()
    got = beam_change_agreement(before + 1.0, after + 1.5, before, after, body, threshold_gy=3.0)
    assert got.correlation == pytest.approx(1.0)
    assert got.sign_agreement == 1.0
    assert got.changed_fraction == pytest.approx(6 / 8)
    assert got.physics_mean_abs_gy == pytest.approx((4 * 8 + 2 * 6) / 6)
    assert got.model_mean_abs_gy == pytest.approx(got.physics_mean_abs_gy, abs=0.5)
    assert got.model_mean_abs_elsewhere_gy == pytest.approx(0.5)


def test_a_model_that_ignores_or_inverts_the_beam_is_caught():
    before, after, body = _doses()
    blind = beam_change_agreement(before, before, before, after, body, 3.0)
    assert np.isnan(blind.correlation) and blind.sign_agreement == 0.0
    assert blind.model_mean_abs_gy == 0.0
    inverted = beam_change_agreement(after, before, before, after, body, 3.0)
    assert inverted.correlation == pytest.approx(-1.0) and inverted.sign_agreement == 0.0


def test_region_restricts_the_comparison_and_bad_input_is_refused():
    before, after, body = _doses()
    body[:, 4:] = False                       # only the voxels that gained dose
    got = beam_change_agreement(before, after, before, after, body, 3.0)
    assert got.changed_fraction == 1.0 and got.physics_mean_abs_gy == pytest.approx(8.0)
    with pytest.raises(ValueError, match="one shape"):
        beam_change_agreement(before, after[:-1], before, after, body, 3.0)
    with pytest.raises(ValueError, match="threshold_gy must be > 0"):
        beam_change_agreement(before, after, before, after, body, 0.0)
    with pytest.raises(ValueError, match="region is empty"):
        beam_change_agreement(before, after, before, after, np.zeros_like(body), 3.0)
