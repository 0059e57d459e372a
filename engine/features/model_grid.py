"""The model grid: 97 x 128 x 160 voxels of (2.0, 2.5, 2.5) mm around the isocentre.

The grid is axis aligned in LPS (``direction`` = the axial identity) whatever the CT's
orientation, so a feature drawn on it (beam and angle plates) has the same meaning for every
patient position. As in GDP-HMM's crop (start index ``c - size // 2``), the isocentre lies on the
centre of voxel ``(48, 64, 80)``. Volumes move between the patient's CT grid and the model grid by
physical resampling (:func:`engine.geometry.resample`), never by index arithmetic, and the
:class:`ModelGridTransform` keeps both geometries so a prediction goes back exactly.

A planning CT is often far larger than the model grid (a 400 x 512 x 512 CT has 100 M voxels,
the model grid 2 M), so only the part of the patient grid the model grid covers
(:meth:`ModelGridTransform.patient_box`) is ever resampled, in both directions. Towards the
model grid, nearest-neighbour values are exactly those of the whole grid, trilinear ones equal
to float32 rounding (the box's origin changes the last bit of a continuous index), cubic
B-splines (a global prefilter) too, thanks to a wider margin. Back to the patient grid only
the target grid is cut, with the same float32-rounding agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.case import AXIAL_DIRECTION, Geometry, Volume
from engine.geometry import readonly, resample

MODEL_SHAPE: tuple[int, int, int] = (97, 128, 160)
MODEL_SPACING: tuple[float, float, float] = (2.0, 2.5, 2.5)
ISOCENTER_VOXEL: tuple[int, int, int] = tuple(n // 2 for n in MODEL_SHAPE)
# patient voxels kept around the model grid per interpolation order: nearest and trilinear need
# their direct neighbours; the cubic B-spline prefilter's influence decays by 0.268 per voxel,
# so 16 voxels leave under 1e-9 of a value's size
BOX_MARGIN = {0: 1, 1: 1, 3: 16}
# the falloff (mm, along z, y, x) of the dose the model grid leaves out, fitted on the shipped
# model's predictions of OpenKBP training cases by benchmarks/beyond_grid_falloff.py (RESULTS.md):
# superior-inferior only. Reference doses would carry in-plane too (an 80-160 mm falloff), but
# the model's values at the lateral faces are too uncertain to be carried out
BEYOND_GRID_FALLOFF_MM: tuple[float, float, float] = (5.0, 0.0, 0.0)


def model_geometry(isocenter_mm: Sequence[float], shape: tuple[int, int, int] = MODEL_SHAPE,
                   spacing: tuple[float, float, float] = MODEL_SPACING) -> Geometry:
    """The axis-aligned model grid with the isocentre (LPS mm) at voxel ``shape // 2``."""
    iso = np.asarray(isocenter_mm, dtype=np.float64)
    centre = np.array([n // 2 for n in shape], dtype=np.float64) * np.asarray(spacing)
    origin = iso - centre[::-1]  # (z, y, x) offsets -> LPS (x, y, z)
    return Geometry(shape=shape, origin=tuple(origin), spacing=spacing,
                    direction=AXIAL_DIRECTION)


@dataclass(frozen=True)
class ModelGridTransform:
    """The patient grid and the model grid cut around the isocentre, for both directions."""

    patient: Geometry
    model: Geometry
    isocenter_mm: tuple[float, float, float]

    @classmethod
    def around(cls, patient: Geometry, isocenter_mm: Sequence[float]) -> ModelGridTransform:
        iso = tuple(float(v) for v in isocenter_mm)
        return cls(patient=patient, model=model_geometry(iso), isocenter_mm=iso)

    def patient_box(self, margin: int = 1) -> tuple[slice, slice, slice] | None:
        """The part of the patient grid that the model grid covers, plus ``margin`` voxels.

        The model grid's outer faces (half a voxel beyond its outer voxel centres, the reach of
        :func:`engine.geometry.resample`) are mapped to patient indices; patient voxels outside
        the box lie outside the model grid. ``None`` when the grids do not overlap.
        """
        shape = np.asarray(self.model.shape, dtype=np.float64)
        corners = np.array([[a, b, c] for a in (-0.5, shape[0] - 0.5)
                            for b in (-0.5, shape[1] - 0.5) for c in (-0.5, shape[2] - 0.5)])
        index = self.patient.lps_to_index(self.model.index_to_lps(corners))
        lo = np.maximum(np.floor(index.min(axis=0)).astype(int) - margin, 0)
        hi = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1 + margin, self.patient.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def box_geometry(self, box: tuple[slice, slice, slice]) -> Geometry:
        """The geometry of ``patient_array[box]`` (the same voxel positions)."""
        p = self.patient
        start = np.asarray([b.start for b in box], dtype=np.float64)
        return Geometry(shape=tuple(b.stop - b.start for b in box),
                        origin=tuple(p.index_to_lps(start)), spacing=p.spacing,
                        direction=p.direction)

    def box_to_model(self, part: np.ndarray, box: tuple[slice, slice, slice] | None,
                     order: int = 1, fill: float = 0.0) -> np.ndarray:
        """``part`` = ``patient_array[box]`` (``box`` from :meth:`patient_box` with a margin of
        at least ``BOX_MARGIN[order]``) resampled onto the model grid: what resampling the
        whole array gives. ``box`` None: the grids do not overlap, all ``fill``."""
        if box is None:
            dtype = part.dtype if order == 0 else np.float32
            return np.full(self.model.shape, fill, dtype=dtype)
        return resample(Volume(part, self.box_geometry(box)), self.model, order=order,
                        fill=fill).array

    def to_model(self, array: np.ndarray, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """A patient-grid array resampled onto the model grid (``fill`` outside the patient grid).

        ``order`` 0 (labels, masks) keeps the dtype; 1 gives float32. Only the patient box
        around the model grid is resampled.
        """
        box = self.patient_box(BOX_MARGIN[order])
        part = np.asarray(array)[box] if box is not None else np.asarray(array)
        return self.box_to_model(part, box, order, fill)

    @property
    def isocenter_index(self) -> np.ndarray:
        """The isocentre in model-grid indices ``(z, y, x)``."""
        return self.model.lps_to_index(self.isocenter_mm)

    def dose_to_model(self, dose_gy: np.ndarray) -> np.ndarray:
        """A patient-grid dose (Gy) on the model grid: cubic B-spline, clipped at 0."""
        return np.maximum(self.to_model(dose_gy, order=3, fill=0.0), np.float32(0.0))

    def dose_to_patient(self, dose_gy: np.ndarray, order: int = 3) -> Volume:
        """A model-grid dose (Gy) back on the patient grid: B-spline of ``order``, clipped at 0.

        The model sees nothing beyond its grid, but the dose there is not 0 (the beams' exit and
        scatter dose): patient voxels outside it get the nearest dose inside it, falling off by
        :data:`BEYOND_GRID_FALLOFF_MM` (:func:`extend_beyond`).
        """
        return self.to_patient(dose_gy, order=order, fill=0.0, floor=0.0,
                               beyond_mm=BEYOND_GRID_FALLOFF_MM)

    def to_patient(self, array: np.ndarray, order: int = 1, fill: float = 0.0,
                   floor: float | None = None,
                   beyond_mm: Sequence[float] | None = None) -> Volume:
        """A model-grid array (e.g. a predicted dose, Gy) resampled back onto the patient grid.

        Patient voxels outside the model grid get ``fill``, or with ``beyond_mm`` the values
        of :func:`extend_beyond`; only the patient box around the model grid is interpolated
        (the values of resampling the whole patient grid, to float32 rounding: the box is a grid
        of the same voxel positions). ``floor`` clips the interpolated values from below (e.g.
        0 Gy against B-spline overshoot).
        """
        out = np.full(self.patient.shape, fill, dtype=np.float32)
        box = self.patient_box()
        if box is not None:
            part = resample(Volume(np.asarray(array, dtype=np.float32), self.model),
                            self.box_geometry(box), order=order, fill=fill).array
            out[box] = part if floor is None else np.maximum(part, np.float32(floor))
            if beyond_mm is not None:
                extend_beyond(out, self.patient, self.model, beyond_mm)
        return Volume(readonly(out), self.patient)


def extend_beyond(array: np.ndarray, patient: Geometry, model: Geometry,
                  falloff_mm: Sequence[float]) -> None:
    """Fill, in place, the voxels of a patient-grid ``array`` outside the ``model`` grid: the
    nearest voxel inside it times ``exp(-(dz/fz + dy/fy + dx/fx))``, ``d`` the distances
    between the two (mm) along the patient axes ``(z, y, x)`` and ``f`` = ``falloff_mm`` per
    axis (0: nothing carries along that axis).

    Inside means between the second and the second-to-last model voxel centre, where a cubic
    B-spline's values owe nothing to the fill beyond the grid's faces. The falloff is a product
    of one factor per axis, so each axis is one pass over its outer slabs only (a 50 M-voxel CT
    costs little more than its slabs). A grid that is not axial (``Geometry.axis_coordinates``)
    is left as it is; one with no voxel inside is set to 0.
    """
    try:
        coords = patient.axis_coordinates()
    except ValueError:
        return
    for axis, (c, m, f) in enumerate(zip(coords, model.axis_coordinates(), falloff_mm)):
        inside = np.nonzero((c >= m[1]) & (c <= m[-2]))[0]
        if not inside.size:
            array[...] = 0.0
            return
        view = np.moveaxis(array, axis, 0)
        for outer, edge in ((np.arange(inside[0]), inside[0]),
                            (np.arange(inside[-1] + 1, c.size), inside[-1])):
            if outer.size:
                gap = np.abs(c[outer] - c[edge])
                factor = np.exp(-gap / f) if f > 0 else np.zeros_like(gap)
                view[outer] = view[edge][None] * factor.astype(np.float32)[:, None, None]
