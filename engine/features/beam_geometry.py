"""Where the radiation source is, in patient (LPS) coordinates, for an IEC 61217 beam.

The IEC fixed system has X to the right of an observer facing the gantry, Y towards the gantry
and Z up. The source of a gantry angle ``theta`` (couch 0) sits at ``SAD * (sin theta, 0,
cos theta)`` in that system. How those axes lie in the patient depends on the patient position:

======== ========================= =====================
position Y (towards gantry)        Z (up)
======== ========================= =====================
HFS      superior  (0, 0, +1)      anterior  (0, -1, 0)
HFP      superior  (0, 0, +1)      posterior (0, +1, 0)
FFS      inferior  (0, 0, -1)      anterior  (0, -1, 0)
FFP      inferior  (0, 0, -1)      posterior (0, +1, 0)
HFDL     superior                  patient right (-1, 0, 0)
HFDR     superior                  patient left  (+1, 0, 0)
FFDL     inferior                  patient right
FFDR     inferior                  patient left
======== ========================= =====================

and X = Y x Z. For HFS this gives DESIGN §2: ``iso + SAD * (sin theta, -cos theta, 0)``. A couch
(patient support) rotation ``phi``, counter-clockwise seen from above, turns the patient with
the couch, so the source seen from the patient turns by ``-phi`` about Z.
"""

from __future__ import annotations

import math

import numpy as np

from engine.case import PatientPosition

_AXES: dict[PatientPosition, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    PatientPosition.HFS: ((0, 0, 1), (0, -1, 0)),
    PatientPosition.HFP: ((0, 0, 1), (0, 1, 0)),
    PatientPosition.FFS: ((0, 0, -1), (0, -1, 0)),
    PatientPosition.FFP: ((0, 0, -1), (0, 1, 0)),
    PatientPosition.HFDL: ((0, 0, 1), (-1, 0, 0)),
    PatientPosition.HFDR: ((0, 0, 1), (1, 0, 0)),
    PatientPosition.FFDL: ((0, 0, -1), (-1, 0, 0)),
    PatientPosition.FFDR: ((0, 0, -1), (1, 0, 0)),
}


def iec_axes_lps(position: PatientPosition | str) -> np.ndarray:
    """Rows X, Y, Z of the IEC fixed system as LPS unit vectors for a patient position."""
    y, z = (np.asarray(v, dtype=np.float64) for v in _AXES[PatientPosition(position)])
    return np.stack([np.cross(y, z), y, z])


def source_direction_lps(gantry_deg: float, couch_deg: float = 0.0,
                         position: PatientPosition | str = PatientPosition.HFS) -> np.ndarray:
    """Unit LPS vector from the isocentre towards the source.

    Computed, like the GDP-HMM toolkit, from ``theta = gantry - 90``: (sin g, cos g) =
    (cos theta, -sin theta), so source voxels truncate to the same integers as the reference.
    """
    theta, c = np.pi / 180 * float(gantry_deg - 90.0), math.radians(couch_deg)
    fixed = np.array([np.cos(theta), 0.0, -np.sin(theta)])
    cc, sc = math.cos(-c), math.sin(-c)
    support = np.array([cc * fixed[0] - sc * fixed[1], sc * fixed[0] + cc * fixed[1], fixed[2]])
    return support @ iec_axes_lps(position)
