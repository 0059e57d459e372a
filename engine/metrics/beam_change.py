"""Does a predicted dose change where physics says it should when a beam moves?

Compares two dose *changes* on one grid (Gy): the model's (after - before) and the physics
engine's (after - before) for the same beam edit. Pure numpy; the driver that makes the four
doses is ``benchmarks/beam_sensitivity.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BeamChangeAgreement:
    """Agreement of a model's dose change with the physics dose change over a region.

    Attributes:
        correlation: Pearson correlation of the two changes over the region's voxels.
        changed_fraction: fraction of the region where physics changes by more than the
            threshold ("where physics says the dose should change").
        sign_agreement: within those voxels, the fraction where the model changes the same way.
        physics_mean_abs_gy: mean |physics change| within those voxels.
        model_mean_abs_gy: mean |model change| within those voxels.
        model_mean_abs_elsewhere_gy: mean |model change| in the rest of the region (physics
            changes less than the threshold there); small is good.
        threshold_gy: the threshold used.
    """

    correlation: float
    changed_fraction: float
    sign_agreement: float
    physics_mean_abs_gy: float
    model_mean_abs_gy: float
    model_mean_abs_elsewhere_gy: float
    threshold_gy: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def beam_change_agreement(model_before: np.ndarray, model_after: np.ndarray,
                          physics_before: np.ndarray, physics_after: np.ndarray,
                          region: np.ndarray, threshold_gy: float) -> BeamChangeAgreement:
    """:class:`BeamChangeAgreement` of ``model_after - model_before`` with
    ``physics_after - physics_before`` over the boolean ``region`` (e.g. the body)."""
    arrays = (model_before, model_after, physics_before, physics_after, region)
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"all doses and the region need one shape, got "
                         f"{[a.shape for a in arrays]}")
    if threshold_gy <= 0:
        raise ValueError(f"threshold_gy must be > 0, got {threshold_gy}")
    region = region.astype(bool)
    if not region.any():
        raise ValueError("the region is empty")
    model = (model_after.astype(np.float64) - model_before)[region]
    physics = (physics_after.astype(np.float64) - physics_before)[region]
    changed = np.abs(physics) > threshold_gy
    nan = float("nan")
    if model.std() > 0 and physics.std() > 0:
        correlation = float(np.corrcoef(model, physics)[0, 1])
    else:
        correlation = nan
    return BeamChangeAgreement(
        correlation=correlation,
        changed_fraction=float(changed.mean()),
        sign_agreement=float((np.sign(model[changed]) == np.sign(physics[changed])).mean())
        if changed.any() else nan,
        physics_mean_abs_gy=float(np.abs(physics[changed]).mean()) if changed.any() else nan,
        model_mean_abs_gy=float(np.abs(model[changed]).mean()) if changed.any() else nan,
        model_mean_abs_elsewhere_gy=float(np.abs(model[~changed]).mean())
        if (~changed).any() else nan,
        threshold_gy=float(threshold_gy))
