"""Cumulative DVH curves for display (dose in Gy, volume in % of the structure)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.case import Case, Volume


@dataclass(frozen=True)
class DvhCurve:
    """A cumulative DVH: ``volume_pct[i]`` = % of the structure receiving >= ``dose_gy[i]``."""

    dose_gy: np.ndarray
    volume_pct: np.ndarray


def cumulative_dvh(dose: np.ndarray, mask: np.ndarray, bin_gy: float = 0.1) -> DvhCurve:
    """DVH of ``dose`` (Gy) inside boolean ``mask`` (same shape), with ``bin_gy`` resolution."""
    values = np.asarray(dose, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    if values.size == 0:
        return DvhCurve(np.zeros(1), np.zeros(1))
    edges = np.arange(0.0, values.max() + 2 * bin_gy, bin_gy)
    counts, _ = np.histogram(values, bins=edges)
    above = counts[::-1].cumsum()[::-1]
    return DvhCurve(edges[:-1], 100.0 * above / values.size)


def dvh_for_case(case: Case, dose: Volume) -> dict[str, DvhCurve]:
    """A curve per structure of ``case`` for ``dose`` on the CT grid."""
    return {s.name: cumulative_dvh(dose.array, s.mask) for s in case.structures if s.mask.any()}
