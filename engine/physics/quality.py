"""Is a generated physics plan one a planner would accept? Quality figures and the rule.

Figures (doses in Gy on the case grid, the plan normalised like a clinical plan: D95 of the
primary, highest-prescription target = its prescription, see :mod:`engine.physics.dose_calc`):

* per target: D95 (dose covering 95 % of it) and D2 (hottest 2 %), also as a fraction of the
  target's own prescription;
* the body maximum (the hottest voxel: an OpenKBP voxel is about 0.04 cm3, close to the clinical
  D0.03cc) as a fraction of the highest prescription;
* per organ at risk: mean and maximum dose.

The acceptance rule (:data:`ACCEPTANCE`) is a head-and-neck plan review in numbers: coverage of
every target (D95 >= 93 % of its prescription), homogeneity of the primary target (D2 <= 110 %),
no hot spot (body maximum <= 120 % of the highest prescription), and the serial organs' hard
limits (spinal cord max <= 50 Gy, brainstem max <= 60 Gy at a 70 Gy prescription, i.e. the
usual 45 / 54 Gy plus the tolerance a planning-organ-at-risk margin gives). Parotid, larynx,
oesophagus and mandible doses are recorded but do not reject a plan: they are traded against
target coverage case by case in clinics too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.case import Case
from engine.physics.dose_calc import body_mask, target_prescriptions


@dataclass(frozen=True)
class AcceptanceRule:
    """Limits a plan must meet (fractions of a prescription; see the module docstring)."""

    min_target_d95: float = 0.93
    max_primary_d2: float = 1.10
    max_body_dmax: float = 1.20
    #: organ keyword -> maximum dose as a fraction of the highest prescription
    oar_max: tuple[tuple[str, float], ...] = (("cord", 50.0 / 70.0), ("brainstem", 60.0 / 70.0))


ACCEPTANCE = AcceptanceRule()


def _round(x: float) -> float:
    return round(float(x), 3)


def plan_quality(case: Case, dose: np.ndarray) -> dict:
    """The quality figures of ``dose`` (Gy, ``[z, y, x]`` on ``case``'s grid) for ``case``.

    Returns a JSON-ready dict: ``rx_gy`` (highest prescription), ``targets`` (name -> rx_gy,
    d95_gy, d2_gy, d95_rel, d2_rel), ``body_dmax_gy``, ``body_dmax_rel`` and ``oars`` (name ->
    mean_gy, max_gy)."""
    if dose.shape != case.geometry.shape:
        raise ValueError(f"dose shape {dose.shape} is not the case grid {case.geometry.shape}")
    targets = target_prescriptions(case, case.plan)
    rx = targets[0][1]
    out: dict = {"rx_gy": rx, "targets": {}, "oars": {}}
    for t, t_rx in targets:
        values = dose[t.mask]
        d95, d2 = np.percentile(values, [5.0, 98.0])
        out["targets"][t.name] = {"rx_gy": t_rx, "d95_gy": _round(d95), "d2_gy": _round(d2),
                                  "d95_rel": _round(d95 / t_rx), "d2_rel": _round(d2 / t_rx)}
    dmax = float(dose[body_mask(case)].max())
    out["body_dmax_gy"] = _round(dmax)
    out["body_dmax_rel"] = _round(dmax / rx)
    for s in case.oars:
        if s.mask.any():
            values = dose[s.mask]
            out["oars"][s.name] = {"mean_gy": _round(values.mean()),
                                   "max_gy": _round(values.max())}
    return out


def rejection_reasons(quality: dict, rule: AcceptanceRule = ACCEPTANCE) -> list[str]:
    """Why a plan with these :func:`plan_quality` figures fails ``rule`` (empty: accepted)."""
    reasons = []
    for name, t in quality["targets"].items():
        if t["d95_rel"] < rule.min_target_d95:
            reasons.append(f"{name} D95 {100 * t['d95_rel']:.1f}% < "
                           f"{100 * rule.min_target_d95:.0f}%")
    primary_name, primary = next(iter(quality["targets"].items()))
    if primary["d2_rel"] > rule.max_primary_d2:
        reasons.append(f"{primary_name} D2 {100 * primary['d2_rel']:.1f}% > "
                       f"{100 * rule.max_primary_d2:.0f}%")
    if quality["body_dmax_rel"] > rule.max_body_dmax:
        reasons.append(f"body Dmax {100 * quality['body_dmax_rel']:.1f}% > "
                       f"{100 * rule.max_body_dmax:.0f}%")
    for name, oar in quality["oars"].items():
        for keyword, frac in rule.oar_max:
            limit = frac * quality["rx_gy"]
            if keyword in name.lower() and oar["max_gy"] > limit:
                reasons.append(f"{name} max {oar['max_gy']:.1f} Gy > {limit:.1f} Gy")
    return reasons
