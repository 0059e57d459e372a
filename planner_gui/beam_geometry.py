"""Where a beam's source is, in patient coordinates (DESIGN §2: IEC 61217, LPS mm).

For a head-first-supine patient at couch 0, gantry θ puts the source at
``iso + SAD * (sin θ, -cos θ, 0)``. The other patient positions are the same machine geometry
seen from a patient turned on the couch: prone turns the patient 180° about the longitudinal
axis (x and y flip), feet-first turns them 180° about the vertical axis (x and z flip). A couch
angle φ turns the machine frame about the vertical axis (IEC: positive is counter-clockwise seen
from above).
"""

from __future__ import annotations

import math

import numpy as np

from engine.case import Beam, PatientPosition

# Sign of (x, y, z) when the patient-position transform is applied to the HFS direction.
_POSITION_SIGNS = {
    PatientPosition.HFS: (1.0, 1.0, 1.0),
    PatientPosition.HFP: (-1.0, -1.0, 1.0),
    PatientPosition.FFS: (-1.0, 1.0, -1.0),
    PatientPosition.FFP: (1.0, -1.0, -1.0),
}


def _signs(position: PatientPosition) -> np.ndarray:
    try:
        return np.asarray(_POSITION_SIGNS[PatientPosition(position)])
    except KeyError:
        raise ValueError(f"patient position {position} (decubitus) is not supported "
                         "for beam display") from None


def source_direction(gantry_deg: float, couch_deg: float = 0.0,
                     position: PatientPosition = PatientPosition.HFS) -> np.ndarray:
    """Unit LPS vector from the isocentre towards the source."""
    g, c = math.radians(gantry_deg), math.radians(couch_deg)
    d = np.array([math.sin(g) * math.cos(c), -math.cos(g), -math.sin(g) * math.sin(c)])
    return d * _signs(position)


def source_position(beam: Beam, position: PatientPosition = PatientPosition.HFS,
                    gantry_deg: float | None = None) -> np.ndarray:
    """LPS position (mm) of the source of ``beam`` (at ``gantry_deg`` when given)."""
    angle = beam.gantry_deg if gantry_deg is None else gantry_deg
    return (np.asarray(beam.isocenter_mm)
            + beam.sad_mm * source_direction(angle, beam.couch_deg, position))


def gantry_from_axial_direction(dx: float, dy: float,
                                position: PatientPosition = PatientPosition.HFS) -> float:
    """The coplanar gantry angle (degrees, 0..360) whose source lies along LPS ``(dx, dy)`` from
    the isocentre: the inverse of :func:`source_direction` at couch 0."""
    sx, sy, _ = _signs(position)
    return math.degrees(math.atan2(dx * sx, -dy * sy)) % 360.0
