"""The engine's coarse dose grid on a case grid: trilinear interpolation with SimpleITK's edge
rule, and the voxels a region's dose is read from (what a packed plan must keep)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.case import Geometry
from engine.dose_grid import DoseGrid, restore_support, to_case_grid

CASE = Geometry((12, 20, 16), (-30.0, -38.0, -14.0), (2.5, 4.0, 4.0))


def _linear_grid(shape=(8, 18, 15), origin=(-33.0, -41.0, -16.0), spacing=(5.0, 5.0, 5.0)):
    """A dose linear in LPS position on a coarse grid covering CASE: interpolation reproduces
    a linear function exactly, so the case dose is known independently."""
    z, y, x = (origin[::-1][a] + np.arange(shape[a]) * spacing[a] for a in range(3))
    dose = 40.0 + 0.3 * x[None, None, :] - 0.2 * y[None, :, None] + 0.5 * z[:, None, None]
    return DoseGrid(np.broadcast_to(dose, shape).astype(np.float64), origin, spacing)


def _case_positions():
    z, y, x = (CASE.origin[::-1][a] + np.arange(CASE.shape[a]) * CASE.spacing[a]
               for a in range(3))
    return z[:, None, None], y[None, :, None], x[None, None, :]


def test_linear_dose_is_reproduced_on_the_case_grid():
    z, y, x = _case_positions()
    expected = 40.0 + 0.3 * x - 0.2 * y + 0.5 * z
    np.testing.assert_allclose(to_case_grid(_linear_grid(), CASE), expected, atol=1e-9)


def test_points_beyond_half_a_voxel_outside_get_zero_and_nearer_ones_the_edge_value():
    # CASE's x voxel centres run from -30 to 30 mm; a grid whose x centres start at -28 leaves
    # the first case column 2 mm (0.4 voxel) outside it: edge value; one starting at -24 leaves
    # it 6 mm (1.2 voxels) outside: zero
    for origin_x, first_column in ((-28.0, "edge"), (-24.0, "zero")):
        grid = DoseGrid(np.full((8, 18, 15), 7.0), (origin_x, -41.0, -16.0), (5.0, 5.0, 5.0))
        out = to_case_grid(grid, CASE)
        assert np.all(out[:, :, 1:] == pytest.approx(7.0))
        assert np.all(out[:, :, 0] == (7.0 if first_column == "edge" else 0.0))


def test_restore_support_is_enough_and_much_smaller_than_the_grid():
    grid = _linear_grid()
    region = np.zeros(CASE.shape, bool)
    region[4:8, 6:12, 5:9] = True
    support = restore_support(grid.array.shape, grid.origin_lps_mm, grid.spacing_zyx_mm, CASE,
                              region)
    assert 0 < support.sum() < 0.2 * support.size
    kept = DoseGrid(np.where(support, grid.array, 0.0), grid.origin_lps_mm, grid.spacing_zyx_mm)
    np.testing.assert_array_equal(to_case_grid(kept, CASE)[region],
                                  to_case_grid(grid, CASE)[region])
    # dropping one more voxel changes the region's dose: none of the support is superfluous
    # here (no case voxel centre falls exactly on a grid voxel centre)
    k = tuple(np.argwhere(support)[len(np.argwhere(support)) // 2])
    fewer = kept.array.copy()
    fewer[k] = 0.0
    changed = to_case_grid(DoseGrid(fewer, grid.origin_lps_mm, grid.spacing_zyx_mm), CASE)
    assert not np.array_equal(changed[region], to_case_grid(kept, CASE)[region])


def test_a_non_axial_case_grid_is_refused():
    flipped = Geometry(CASE.shape, CASE.origin, CASE.spacing,
                       ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)))
    with pytest.raises(ValueError, match="axial case grid"):
        to_case_grid(_linear_grid(), flipped)
