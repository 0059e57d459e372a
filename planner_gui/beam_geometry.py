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


def handle_point(iso_xy: np.ndarray, direction_xy: np.ndarray,
                 visible: tuple[float, float, float, float]) -> np.ndarray | None:
    """Where a beam's drag handle goes in an axial view: on the ray from the isocentre
    ``iso_xy`` along ``direction_xy`` (the source direction projected on the axial plane, mm),
    as far out as the ``visible`` rectangle ``(x0, y0, x1, y1)`` allows, so that the handle is
    on screen at any zoom.

    A non-coplanar beam's projection is shorter than 1; its handle sits that much further in
    (not below 0.2 of the way), as a cue. None when the ray misses the rectangle: the
    isocentre is panned out of view and the beam points away from what is shown.
    """
    iso = np.asarray(iso_xy, dtype=float)
    norm = float(np.hypot(*direction_xy))
    unit = np.asarray(direction_xy, dtype=float) / norm if norm > 1e-9 else np.array([0.0, -1.0])
    t_in, t_out = -math.inf, math.inf   # where the ray enters and leaves the rectangle
    for axis in range(2):
        lo, hi = visible[axis], visible[axis + 2]
        if abs(unit[axis]) < 1e-12:
            if not lo <= iso[axis] <= hi:
                return None
            continue
        t1, t2 = sorted(((lo - iso[axis]) / unit[axis], (hi - iso[axis]) / unit[axis]))
        t_in, t_out = max(t_in, t1), min(t_out, t2)
    if t_out < max(t_in, 0.0):
        return None
    return iso + unit * max(t_out * min(max(norm, 0.2), 1.0), t_in, 0.0)
