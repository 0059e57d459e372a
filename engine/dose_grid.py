"""The physics engine's coarse dose grid and its linear interpolation onto a case's CT grid.

pyRadPlan computes a dose on an isotropic dose grid (``PhysicsSettings.dose_grid_mm``) and
interpolates it linearly onto the CT grid. The coarse dose holds all the information of the
fine one (about 4x fewer voxels at 5 mm on an OpenKBP grid), so compact copies of generated
plans store it and :func:`to_case_grid` recreates the CT-grid dose: deterministic numpy
arithmetic, so the same stored values give bit-identical doses on any machine.

Conventions: a :class:`DoseGrid` array runs along +z, +y, +x (LPS; the canonical order of
:func:`engine.physics.dose_calc.to_canonical`), its origin is the LPS position (x, y, z, mm) of
voxel [0, 0, 0]'s centre and its spacing is (z, y, x) mm. Interpolation follows SimpleITK's linear
interpolator (which pyRadPlan uses): a point within half a voxel outside the outermost voxel
centres takes the edge value, a point further out gets 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.case import AXIAL_DIRECTION, Geometry


@dataclass(frozen=True)
class DoseGrid:
    """A dose (Gy) on an axis-aligned grid whose array axes run along +z, +y, +x.

    Attributes:
        array: ``[z, y, x]`` dose in Gy.
        origin_lps_mm: (x, y, z) LPS position of voxel [0, 0, 0]'s centre, mm.
        spacing_zyx_mm: voxel size along the array axes, mm.
    """

    array: np.ndarray
    origin_lps_mm: tuple[float, float, float]
    spacing_zyx_mm: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a dose grid is 3-D, got shape {self.array.shape}")
        if len(self.origin_lps_mm) != 3 or len(self.spacing_zyx_mm) != 3 or not all(
                s > 0 for s in self.spacing_zyx_mm):
            raise ValueError(f"bad dose grid origin {self.origin_lps_mm} or spacing "
                             f"{self.spacing_zyx_mm}")

    def scaled(self, factor: float) -> DoseGrid:
        return DoseGrid((self.array * factor).astype(np.float32), self.origin_lps_mm,
                        self.spacing_zyx_mm)


def _axis_stencil(n: int, coords: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For continuous indices ``coords`` on an axis of ``n`` voxels: the two voxels read
    (lo, hi), the weight of hi, and whether each point is inside (SimpleITK's rule)."""
    inside = (coords >= -0.5) & (coords <= n - 0.5)
    c = np.clip(coords, 0.0, n - 1.0)
    lo = np.clip(np.floor(c).astype(np.int64), 0, max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, c - lo, inside


def _case_coords(grid_origin_lps_mm: Sequence[float], grid_spacing_zyx_mm: Sequence[float],
                 geometry: Geometry) -> list[np.ndarray]:
    """Per case axis (z, y, x): the case voxel centres as continuous indices of the grid."""
    if not np.allclose(geometry.direction, AXIAL_DIRECTION):
        raise ValueError("a dose grid maps only onto an axial case grid whose axes run along "
                         "+z, +y, +x")
    origin_zyx = np.asarray(grid_origin_lps_mm, dtype=np.float64)[::-1]
    case_origin_zyx = np.asarray(geometry.origin, dtype=np.float64)[::-1]
    return [(case_origin_zyx[axis] + np.arange(geometry.shape[axis]) * float(
        geometry.spacing[axis]) - origin_zyx[axis]) / float(grid_spacing_zyx_mm[axis])
        for axis in range(3)]


def to_case_grid(grid: DoseGrid, geometry: Geometry) -> np.ndarray:
    """The dose of ``grid`` on ``geometry`` (float64 Gy, ``[z, y, x]`` of an axial case grid
    with +z, +y, +x axes, like OpenKBP's), by trilinear interpolation."""
    out = np.asarray(grid.array, dtype=np.float64)
    for axis, coords in enumerate(_case_coords(grid.origin_lps_mm, grid.spacing_zyx_mm,
                                               geometry)):
        lo, hi, w, inside = _axis_stencil(out.shape[axis], coords)
        shape = [1, 1, 1]
        shape[axis] = len(coords)
        w = w.reshape(shape)
        out = (out.take(lo, axis=axis) * (1.0 - w) + out.take(hi, axis=axis) * w) \
            * inside.reshape(shape)
    return out


def restore_support(grid_shape: Sequence[int], grid_origin_lps_mm: Sequence[float],
                    grid_spacing_zyx_mm: Sequence[float], geometry: Geometry,
                    region: np.ndarray) -> np.ndarray:
    """The voxels of a dose grid that :func:`to_case_grid` reads for the case voxels in
    ``region`` (boolean ``[z, y, x]`` on ``geometry``): the rest can be left out (zeroed)
    without changing the dose there."""
    out = np.asarray(region, dtype=np.float32)
    for axis, coords in enumerate(_case_coords(grid_origin_lps_mm, grid_spacing_zyx_mm,
                                               geometry)):
        lo, hi, _, inside = _axis_stencil(int(grid_shape[axis]), coords)
        reads = np.zeros((int(grid_shape[axis]), len(coords)), np.float32)
        cols = np.flatnonzero(inside)
        reads[lo[cols], cols] = 1.0
        reads[hi[cols], cols] = 1.0
        out = np.moveaxis(np.tensordot(reads, out, axes=([1], [axis])), 0, axis)
    return out > 0
