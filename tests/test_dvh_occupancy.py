"""Partial-volume occupancy of contours: exact fractions and centroids on hand-made polygons."""

from __future__ import annotations

import numpy as np
import pytest

from engine.case import Geometry
from engine.metrics.occupancy import contour_occupancy

# 1 mm voxels in-plane, 2 mm slices; voxel (j, i) centre at LPS (x=i, y=j), slice k at z=2k
GEOM = Geometry((4, 10, 12), (0.0, 0.0, 0.0), (2.0, 1.0, 1.0))


def square(x0: float, y0: float, x1: float, y1: float, k: int = 1) -> np.ndarray:
    z = 2.0 * k
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]])


def as_grid(occ) -> tuple[np.ndarray, np.ndarray]:
    frac = np.zeros(GEOM.shape)
    frac.reshape(-1)[occ.flat_index] = occ.fraction
    offs = np.zeros((*GEOM.shape, 2))
    offs.reshape(-1, 2)[occ.flat_index] = occ.offset_yx
    return frac, offs


def test_square_on_voxel_faces_fills_whole_voxels() -> None:
    occ = contour_occupancy([square(1.5, 2.5, 4.5, 5.5)], GEOM)  # voxels i 2-4, j 3-5
    frac, offs = as_grid(occ)
    expected = np.zeros(GEOM.shape)
    expected[1, 3:6, 2:5] = 1.0
    np.testing.assert_allclose(frac, expected, atol=1e-12)
    np.testing.assert_allclose(offs, 0.0, atol=1e-12)
    assert occ.total_volume_cc == pytest.approx(9 * 2.0 / 1000)
    assert occ.volume_outside_cc == pytest.approx(0.0)


def test_half_voxel_shift_gives_half_voxels_with_their_centroids() -> None:
    occ = contour_occupancy([square(2.0, 3.0, 5.0, 5.0)], GEOM)  # x 2..5, y 3..5
    frac, offs = as_grid(occ)
    assert frac[1, 3, 3] == pytest.approx(0.5)  # y 3..3.5 inside, x full
    assert frac[1, 3, 2] == pytest.approx(0.25)  # corner: x 2..2.5, y 3..3.5
    assert frac[1, 4, 3] == pytest.approx(1.0)
    assert offs[1, 3, 3, 0] == pytest.approx(0.25)  # covered part above the centre in y
    assert offs[1, 3, 3, 1] == pytest.approx(0.0)
    assert offs[1, 3, 2] == pytest.approx([0.25, 0.25])
    assert frac.sum() * GEOM.voxel_volume_cc == pytest.approx(3 * 2 * 2.0 / 1000)


def test_holes_and_islands_follow_the_even_odd_rule() -> None:
    ring = [square(0.5, 0.5, 7.5, 7.5), square(2.5, 2.5, 5.5, 5.5)]  # 7x7 minus 3x3
    island = [square(8.5, 1.5, 10.5, 3.5)]  # 2x2 elsewhere on the slice
    occ = contour_occupancy(ring + island, GEOM)
    frac, _ = as_grid(occ)
    assert frac[1, 4, 4] == 0.0 and frac[1, 1, 1] == 1.0 and frac[1, 2, 9] == 1.0
    assert frac.sum() == pytest.approx(49 - 9 + 4)


def test_parts_off_the_grid_are_counted_outside() -> None:
    # x from 9.5 to 13.5 runs past the last column (centre 11, edge 11.5); slice 6 is off-grid
    occ = contour_occupancy([square(9.5, 1.5, 13.5, 3.5), square(1.5, 1.5, 3.5, 3.5, k=6)], GEOM)
    frac, _ = as_grid(occ)
    assert frac.sum() == pytest.approx(2 * 2)  # columns 10-11, rows 2-3
    assert occ.total_volume_cc == pytest.approx((8 + 4) * 2.0 / 1000)
    assert occ.volume_outside_cc == pytest.approx((4 + 4) * 2.0 / 1000)


def test_degenerate_contours_enclose_nothing() -> None:
    line = np.array([[1.0, 1.0, 2.0], [5.0, 1.0, 2.0]])
    occ = contour_occupancy([line, np.zeros((0, 3))], GEOM)
    assert len(occ.flat_index) == 0 and occ.total_volume_cc == 0.0
