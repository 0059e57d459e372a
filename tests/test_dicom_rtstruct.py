"""The contour rasteriser and tracer on analytic shapes."""

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from engine.case import Geometry
from engine.geometry import voxel_centers_lps
from engine.io.dicom_rtstruct import rasterize, read_rois, trace_contours


def _circle(cx, cy, r, z, n=256):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t), np.full(n, z)])


@pytest.fixture()
def grid():
    # non-square slices with anisotropic pixels: x has 50 columns, y 36 rows
    return Geometry((6, 36, 50), (-24.5, -17.3, 0.0), (2.0, 1.0, 1.0))


def test_holes_islands_and_sub_voxel_vertices(grid):
    pts = voxel_centers_lps(grid)
    on = np.isclose(pts[..., 2], 4.0)
    d0 = np.hypot(pts[..., 0] - 0.3, pts[..., 1] - 0.2)
    d1 = np.hypot(pts[..., 0] - 17.6, pts[..., 1] + 9.1)
    truth = on & (((d0 <= 12.37) & (d0 > 5.41)) | (d1 <= 4.33))
    contours = [_circle(0.3, 0.2, 12.37, 4.0), _circle(0.3, 0.2, 5.41, 4.1),  # ring (hole)
                _circle(17.6, -9.1, 4.33, 3.2)]  # an island, off the slice by < half a slice
    r = rasterize(contours, grid)
    assert np.count_nonzero(r.mask ^ truth) <= 2  # only vertices of the 256-gon vs the circle
    assert r.outside == r.off_plane == 0 and not r.clipped


def test_nested_ring_inside_hole_is_filled_again(grid):
    cs = [_circle(0, 0, 14, 2.0), _circle(0, 0, 9, 2.0), _circle(0, 0, 4, 2.0)]
    m = rasterize(cs, grid).mask[1]
    pts = voxel_centers_lps(grid)[1]
    d = np.hypot(pts[..., 0], pts[..., 1])
    assert m[d < 3.5].all() and m[(d > 9.5) & (d < 13.5)].all()
    assert not m[(d > 4.5) & (d < 8.5)].any() and not m[d > 14.5].any()


def test_contours_outside_off_plane_and_clipped(grid):
    far = _circle(0, 0, 5, 40.0)  # beyond the last slice (z = 10) by more than half a slice
    beside = _circle(200, 0, 5, 2.0)  # in a slice, but outside the image
    tilted = _circle(0, 0, 5, 2.0)
    tilted[:, 2] += np.linspace(0, 3, len(tilted))  # not in one slice plane
    edge = _circle(-24.5, 0, 6, 6.0)  # half of it left of the image
    r = rasterize([far, beside, tilted, edge], grid)
    assert (r.outside, r.off_plane, r.clipped, r.kept) == (2, 1, True, (3,))
    assert r.mask[3].any() and r.mask.sum() == r.mask[3].sum()
    assert r.mask[3, :, 0].any() and not r.mask[3, :, 7:].any()


def test_trace_then_rasterize_is_exact_for_any_mask(grid):
    rng = np.random.default_rng(3)
    mask = rng.random(grid.shape) > 0.6
    mask[:, 0, :] = True  # touching the image border
    polygons = trace_contours(mask, grid)
    assert all(p.shape[1] == 3 for p in polygons)
    assert np.array_equal(rasterize(polygons, grid).mask, mask)
    assert trace_contours(np.zeros(grid.shape, bool), grid) == ()


def test_read_rois_skips_degenerate_open_and_point_contours():
    ds = Dataset()
    roi = Dataset()
    roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = 5, "Cord", "1.2.3"
    ds.StructureSetROISequence = Sequence([roi])
    items = []
    for kind, pts in (("CLOSED_PLANAR", [0, 0, 0, 1, 0, 0, 1, 1, 0]),
                      ("CLOSED_PLANAR", [0, 0, 0, 1, 0, 0]),  # 2 points
                      ("OPEN_PLANAR", [0, 0, 0, 1, 0, 0, 1, 1, 0]),
                      ("POINT", [0, 0, 0])):
        c = Dataset()
        c.ContourGeometricType = kind
        c.NumberOfContourPoints = len(pts) // 3
        c.ContourData = pts
        items.append(c)
    rc = Dataset()
    rc.ReferencedROINumber = 5
    rc.ROIDisplayColor = [255, 255, 0]
    rc.ContourSequence = Sequence(items)
    ds.ROIContourSequence = Sequence([rc])
    (r,) = read_rois(ds)
    assert (r.number, r.name, r.color, r.interpreted_type) == (5, "Cord", (255, 255, 0), None)
    assert len(r.contours) == 1 and r.contours[0].shape == (3, 3)
    assert any("fewer than 3 points" in n for n in r.notes)
    assert any("open" in n for n in r.notes) and any("point marker" in n for n in r.notes)
