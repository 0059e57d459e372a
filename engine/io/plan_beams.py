"""The beams of a generated physics plan file (:mod:`engine.physics.dataset`), both ways.

A plan file is an OpenKBP case file (:mod:`engine.io.openkbp`) plus its own beams, stored as

* ``gantry_deg`` (float32): every delivery angle, IEC 61217 for the HFS patient: a static beam's
  angle, or an arc's control points in delivery order;
* ``beam_index`` (int16): for each ``gantry_deg`` entry, the beam it belongs to (0..);
* ``beam_technique`` (str): per beam ``static`` or ``arc``;
* ``isocenter_vox`` (float32): the isocentre as a fractional voxel index in OpenKBP's axis order
  (row, column, slice; slice 0 is the most superior, the case grid's last axial index).

Both the OpenKBP reader and the plan generator need this, so it lives here, below both: it
depends on the data model only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.case import Beam, Case, Plan, Technique


@dataclass(frozen=True)
class Arrangement:
    """A coplanar beam arrangement: per beam its technique and its gantry angles (one for a
    static beam, the control points in delivery order for an arc), IEC degrees."""

    techniques: tuple[Technique, ...]
    gantry_deg: tuple[tuple[float, ...], ...]

    def beams(self, isocenter_mm: Sequence[float]) -> tuple[Beam, ...]:
        """The arrangement as plan beams about ``isocenter_mm`` (LPS mm), numbered from 1."""
        out = []
        for i, (tech, angles) in enumerate(zip(self.techniques, self.gantry_deg)):
            out.append(Beam(f"{'Arc' if tech is Technique.ARC else 'B'}{i + 1}", angles[0],
                            tuple(isocenter_mm), technique=tech, number=i + 1,
                            control_point_gantry_deg=angles if tech is Technique.ARC else ()))
        return tuple(out)


def beam_arrays(arrangement: Arrangement, case: Case, isocenter_mm: Sequence[float]
                ) -> dict[str, np.ndarray]:
    """The beam keys of a plan file for ``arrangement`` about ``isocenter_mm`` (LPS mm) on the
    grid of ``case`` (read from the plan's OpenKBP source)."""
    gantry = [a for angles in arrangement.gantry_deg for a in angles]
    index = [i for i, angles in enumerate(arrangement.gantry_deg) for _ in angles]
    k, j, i = case.geometry.lps_to_index(isocenter_mm)
    return {"gantry_deg": np.asarray(gantry, dtype=np.float32),
            "beam_index": np.asarray(index, dtype=np.int16),
            "beam_technique": np.asarray([t.value for t in arrangement.techniques]),
            "isocenter_vox": np.asarray([j, i, case.geometry.shape[0] - 1 - k],
                                        dtype=np.float32)}


def read_plan_beams(arrays: dict[str, np.ndarray]) -> Arrangement:
    """The beam arrangement stored in a generated plan file."""
    techniques = tuple(Technique(str(t)) for t in arrays["beam_technique"])
    gantry = arrays["gantry_deg"].astype(np.float64)
    index = arrays["beam_index"]
    return Arrangement(techniques, tuple(tuple(float(a) for a in gantry[index == i])
                                         for i in range(len(techniques))))


def plan_from_arrays(arrays: dict[str, np.ndarray], case: Case) -> Plan:
    """The plan stored in a generated plan file, for ``case`` read from the same file."""
    i0, i1, i2 = (float(v) for v in arrays["isocenter_vox"])
    iso = tuple(float(v) for v in case.geometry.index_to_lps(
        [case.geometry.shape[0] - 1 - i2, i0, i1]))
    base = case.plan or Plan(())
    return dataclasses.replace(base, beams=read_plan_beams(arrays).beams(iso),
                               name=f"physics plan ({arrays['source_case']})")
