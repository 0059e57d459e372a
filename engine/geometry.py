"""Grids and resampling in patient space (DICOM LPS, mm).

Resampling works in physical positions: each voxel centre of the target grid is mapped to the
source grid through both geometries (origin, spacing and direction cosines), so grids that are
shifted, flipped (HFP/FFS/FFP) or oblique relative to each other resample correctly.

SimpleITK does the interpolation: its resampler is multithreaded C++ that understands direction
cosines natively and works on the fly, whereas ``scipy.ndimage.map_coordinates`` would need an
explicit float64 coordinate array of 3 x N target points (about 1 GB for a 150 x 512 x 512 CT) and
runs on one core.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from engine.case import AXIAL_DIRECTION, Geometry, Volume

_INTERPOLATORS = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}


def sitk_direction(geometry: Geometry) -> tuple[float, ...]:
    """SimpleITK's row-major direction matrix: column ``c`` is the LPS axis of image index ``c``.

    SimpleITK indexes ``(i, j, k)`` = (column, row, slice), the reverse of our ``[z, y, x]``.
    """
    d = np.asarray(geometry.direction)[::-1].T  # columns: x-axis, y-axis, z-axis vectors
    return tuple(float(v) for v in d.ravel())


def to_sitk(volume: Volume) -> sitk.Image:
    """A SimpleITK image with the volume's voxels and geometry (bool becomes uint8)."""
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    g = volume.geometry
    image.SetOrigin(g.origin)
    image.SetSpacing(g.spacing[::-1])
    image.SetDirection(sitk_direction(g))
    return image


def geometry_from_sitk(image: sitk.Image) -> Geometry:
    """The :class:`Geometry` of a 3-D SimpleITK image."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    direction = tuple(tuple(d[:, c]) for c in (2, 1, 0))
    return Geometry(shape=image.GetSize()[::-1], origin=image.GetOrigin(),
                    spacing=image.GetSpacing()[::-1], direction=direction)


def readonly(array: np.ndarray) -> np.ndarray:
    """Mark a freshly made array (no other references) read-only, so that wrapping it in a
    :class:`Volume` or :class:`Structure` does not copy it."""
    array.flags.writeable = False
    return array


def from_sitk(image: sitk.Image) -> Volume:
    """A :class:`Volume` from a 3-D SimpleITK image (array ``[z, y, x]``)."""
    return Volume(readonly(sitk.GetArrayFromImage(image)), geometry_from_sitk(image))


def _output_dtype(dtype: np.dtype, order: int) -> np.dtype:
    if order == 0:
        return dtype
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def resample(volume: Volume, target: Geometry, order: int = 1, fill: float = 0.0) -> Volume:
    """Resample ``volume`` onto the ``target`` grid by physical (LPS) position.

    Args:
        volume: the source voxels and their geometry.
        target: the grid to produce.
        order: 0 nearest neighbour (keeps the dtype: masks, labels), 1 trilinear, 3 B-spline.
            Orders 1 and 3 give float32 (float64 stays float64); a bool mask resampled with
            order 1 gives the fraction of the mask around each target voxel centre.
        fill: value of target voxels that fall outside the source grid. A source voxel covers
            its whole extent, so positions up to half a voxel beyond the outer voxel centres take
            the edge value.

    Returns:
        a new :class:`Volume` on ``target``.
    """
    if order not in _INTERPOLATORS:
        raise ValueError(f"interpolation order must be 0, 1 or 3, got {order}")
    src = volume.array
    out_dtype = _output_dtype(src.dtype, order)
    if volume.geometry == target:
        return Volume(src.astype(out_dtype, copy=False), target)
    work = src
    if src.dtype == bool:
        work = src.astype(np.uint8 if order == 0 else np.float32)
    elif order != 0 and src.dtype not in (np.float32, np.float64):
        work = src.astype(np.float32)
    image = to_sitk(Volume(work, volume.geometry))
    f = sitk.ResampleImageFilter()
    f.SetOutputOrigin(target.origin)
    f.SetOutputSpacing(target.spacing[::-1])
    f.SetOutputDirection(sitk_direction(target))
    f.SetSize([int(s) for s in target.shape[::-1]])
    f.SetInterpolator(_INTERPOLATORS[order])
    f.SetDefaultPixelValue(float(fill))
    f.SetTransform(sitk.Transform())
    out = sitk.GetArrayFromImage(f.Execute(image))
    if src.dtype == bool and order == 0:
        out = out.astype(bool)
    return Volume(readonly(out.astype(out_dtype, copy=False)), target)


def grid_around(center_mm: tuple[float, float, float], shape: tuple[int, int, int],
                spacing: tuple[float, float, float],
                direction: tuple[tuple[float, float, float], ...] = AXIAL_DIRECTION) -> Geometry:
    """A grid of ``shape`` (z, y, x) and ``spacing`` (mm) whose centre lies at ``center_mm`` (LPS).

    For an odd size the centre is a voxel centre; for an even size it lies between two voxels.
    """
    d = np.asarray(direction, dtype=np.float64)
    half = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * np.asarray(spacing)
    origin = np.asarray(center_mm, dtype=np.float64) - half @ d
    return Geometry(shape=shape, origin=tuple(origin), spacing=spacing, direction=direction)


def voxel_centers_lps(geometry: Geometry) -> np.ndarray:
    """LPS positions (mm) of every voxel centre, shape ``(nz, ny, nx, 3)`` (x, y, z last)."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in geometry.shape),
                          indexing="ij")
    return geometry.index_to_lps(np.stack([k, j, i], axis=-1))


def flip_axes(volume: Volume, axes: tuple[int, ...]) -> Volume:
    """The same voxels with the array reversed along ``axes`` (0 = z, 1 = y, 2 = x).

    Every voxel keeps its LPS position: the geometry's origin moves to the opposite end of each
    flipped axis and that axis' direction is negated. Exact (no interpolation).
    """
    g = volume.geometry
    if not axes:
        return volume
    far = [0.0, 0.0, 0.0]
    direction = [list(row) for row in g.direction]
    for a in axes:
        far[a] = g.shape[a] - 1.0
        direction[a] = [-v for v in direction[a]]
    origin = g.index_to_lps(far)
    new = Geometry(shape=g.shape, origin=tuple(origin), spacing=g.spacing,
                   direction=tuple(tuple(r) for r in direction))
    return Volume(np.flip(volume.array, axis=axes), new)


def reorient_axial(volume: Volume, tol: float = 1e-4) -> Volume:
    """The volume in the axial convention: array axes along +z, +y, +x (``AXIAL_DIRECTION``).

    Works for grids whose axes lie along the patient axes in any order and sense (HFP, FFS,
    FFP images; decubitus images whose rows run along y): array axes are transposed and
    reversed, which is exact. Raises ValueError for oblique grids (beyond ``tol``).
    """
    g = volume.geometry
    d = np.asarray(g.direction)
    if np.abs(np.abs(d) - np.round(np.abs(d))).max() > tol:
        raise ValueError(f"the grid is oblique (direction {g.direction}); it has no exact "
                         "axial reorientation")
    # for result axis k (z, y, x) the source axis that runs along LPS axis 2 - k
    source = [int(np.argmax(np.abs(d[:, 2 - k]))) for k in range(3)]
    array = np.transpose(volume.array, source)
    direction = tuple(tuple(d[a]) for a in source)
    spacing = tuple(g.spacing[a] for a in source)
    turned = Volume(array, Geometry(array.shape, g.origin, spacing, direction))
    flipped = flip_axes(turned, tuple(k for k in range(3) if direction[k][2 - k] < 0))
    f = flipped.geometry
    return Volume(flipped.array, Geometry(f.shape, f.origin, f.spacing, AXIAL_DIRECTION))
