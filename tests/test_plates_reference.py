"""An independent, straightforward re-implementation of the GDP-HMM beam plate (loops allowed).

It follows the challenge toolkit's algorithm as described in notes/gdp-hmm-challenge.md §2.2
(``get_source_from_angle``, ``surface_coordinates``, ``interpolate_line``,
``get_per_beamplate``) ray by ray, for checking :mod:`engine.features.plates` on small grids and
as the "loop version" the plate benchmark compares against. It is deliberately naive.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def reference_source(isocenter, angle_deg, spacing=(2.0, 2.5, 2.5), sad_mm=1000.0):
    """Source voxel position: theta = angle - 90, in-plane offsets truncated with int()."""
    theta = math.radians(angle_deg - 90.0)
    return (float(isocenter[0]), int(isocenter[1] + sad_mm * math.sin(theta) / spacing[1]),
            int(isocenter[2] + sad_mm * math.cos(theta) / spacing[2]))


def reference_surface(mask):
    """Mask voxels with a 6-neighbour equal to 0 (index - 1 wraps round, as in the toolkit)."""
    nz, ny, nx = mask.shape
    out = []
    for z, y, x in zip(*np.nonzero(mask)):
        if (not mask[z - 1, y, x] or not mask[(z + 1) % nz, y, x] or not mask[z, y - 1, x]
                or not mask[z, (y + 1) % ny, x] or not mask[z, y, x - 1]
                or not mask[z, y, (x + 1) % nx]):
            out.append((int(z), int(y), int(x)))
    return out


def reference_marks(mask, source):
    """The union of the rasterised rays from the source through every surface voxel."""
    nz, ny, nx = mask.shape
    s0, s1, s2 = source
    marked = np.zeros(mask.shape, dtype=bool)
    for p0, p1, p2 in reference_surface(mask):
        y_end = 0 if s1 > p1 else ny - 1
        q1 = p1 + 1 if p1 == s1 else p1
        ratio = (y_end - s1) / (q1 - s1)
        c0, c2 = int(s0 + ratio * (p0 - s0)), int(s2 + ratio * (p2 - s2))
        n = int(max(abs(c0 - s0), abs(y_end - s1), abs(c2 - s2)))
        zz = np.round(np.linspace(s0, c0, n + 1)).astype(int)
        yy = np.round(np.linspace(s1, y_end, n + 1)).astype(int)
        xx = np.round(np.linspace(s2, c2, n + 1)).astype(int)
        inside = (zz >= 0) & (zz < nz) & (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        marked[zz[inside], yy[inside], xx[inside]] = True
    return marked


def reference_beam_plate(mask, isocenter, angle_deg, spacing=(2.0, 2.5, 2.5), source=None):
    """One beam's plate: marks, closing (dilation 4^3, erosion 3^3), inverse square in voxels."""
    source = reference_source(isocenter, angle_deg, spacing) if source is None else source
    plate = ndimage.binary_dilation(reference_marks(mask, source), structure=np.ones((4, 4, 4)))
    plate = ndimage.binary_erosion(plate, structure=np.ones((3, 3, 3)))
    k, j, i = np.meshgrid(*(np.arange(n) for n in mask.shape), indexing="ij")
    dist2 = (k - source[0]) ** 2 + (j - source[1]) ** 2 + (i - source[2]) ** 2
    iso2 = sum((s - c) ** 2 for s, c in zip(source, isocenter))
    return plate * (iso2 / dist2)


def reference_all_beam_plate(mask, isocenter, angles_deg, spacing=(2.0, 2.5, 2.5)):
    """Sum of the per-beam plates (``get_allbeam_plate``)."""
    out = np.zeros(mask.shape)
    for a in angles_deg:
        out += reference_beam_plate(mask, isocenter, a, spacing)
    return out


def test_reference_source_follows_the_toolkit_convention():
    # gantry 0: source 400 rows above (anterior); 90: 400 columns to the patient's left
    assert reference_source((10, 64, 80), 0.0) == (10.0, 64 - 400, 80)
    assert reference_source((10, 64, 80), 90.0) == (10.0, 64, 80 + 400)
    assert reference_source((10, 64, 80), 180.0) == (10.0, 64 + 400, 80)


def test_reference_plate_is_one_at_the_isocentre_and_empty_beside_the_beam():
    mask = np.zeros((20, 40, 40), dtype=bool)
    mask[8:12, 18:22, 18:22] = True
    plate = reference_beam_plate(mask, (10, 20, 20), 0.0)
    assert abs(plate[10, 20, 20] - 1.0) < 1e-9
    assert plate[10, 20, 35] == 0.0  # lateral of a beam that travels along the rows
    assert plate[10, 5, 20] > plate[10, 35, 20] > 0.0  # nearer the source: larger weight
