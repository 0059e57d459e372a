"""Turning a mouse position back into a gantry angle (the inverse of the engine's source
geometry, ``engine.features.beam_geometry``: IEC 61217 angles, LPS mm)."""

from __future__ import annotations

import math

import numpy as np

from engine.case import PatientPosition
from engine.features.beam_geometry import iec_axes_lps


def gantry_from_axial_direction(dx: float, dy: float,
                                position: PatientPosition = PatientPosition.HFS) -> float:
    """The coplanar gantry angle (degrees, 0..360) whose source lies along LPS ``(dx, dy)`` from
    the isocentre, for a patient lying in ``position``.

    The source of gantry θ is at ``sin θ X + cos θ Z`` (X, Z: the IEC fixed axes in LPS), so
    θ = atan2(d·X, d·Z) for a direction d in the axial plane.
    """
    axes = iec_axes_lps(position)
    d = np.array([dx, dy, 0.0])
    return math.degrees(math.atan2(float(d @ axes[0]), float(d @ axes[2]))) % 360.0
