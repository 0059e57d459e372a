"""The model grid: 97 x 128 x 160 voxels of (2.0, 2.5, 2.5) mm around the isocentre.

The grid is axis aligned in LPS (``direction`` = the axial identity) whatever the CT's
orientation, so a feature drawn on it (beam and angle plates) has the same meaning for every
patient position. As in GDP-HMM's crop (start index ``c - size // 2``), the isocentre lies on the
centre of voxel ``(48, 64, 80)``. Volumes move between the patient's CT grid and the model grid by
physical resampling (:func:`engine.geometry.resample`), never by index arithmetic, and the
:class:`ModelGridTransform` keeps both geometries so a prediction goes back exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.case import AXIAL_DIRECTION, Geometry, Volume
from engine.geometry import resample

MODEL_SHAPE: tuple[int, int, int] = (97, 128, 160)
MODEL_SPACING: tuple[float, float, float] = (2.0, 2.5, 2.5)
ISOCENTER_VOXEL: tuple[int, int, int] = tuple(n // 2 for n in MODEL_SHAPE)


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

    @property
    def isocenter_index(self) -> np.ndarray:
        """The isocentre in model-grid indices ``(z, y, x)``."""
        return self.model.lps_to_index(self.isocenter_mm)

    def to_model(self, array: np.ndarray, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """A patient-grid array resampled onto the model grid (``fill`` outside the patient grid).

        ``order`` 0 (labels, masks) keeps the dtype; 1 gives float32.
        """
        return resample(Volume(array, self.patient), self.model, order=order, fill=fill).array

    def dose_to_model(self, dose_gy: np.ndarray) -> np.ndarray:
        """A patient-grid dose (Gy) on the model grid: cubic B-spline, clipped at 0."""
        return np.maximum(self.to_model(dose_gy, order=3, fill=0.0), np.float32(0.0))

    def dose_to_patient(self, dose_gy: np.ndarray) -> Volume:
        """A model-grid dose (Gy) back on the patient grid: cubic B-spline, clipped at 0.

        Patient voxels outside the model grid get 0 Gy: the model sees nothing there.
        """
        back = self.to_patient(dose_gy, order=3, fill=0.0)
        return Volume(np.maximum(back.array, np.float32(0.0)), back.geometry)

    def to_patient(self, array: np.ndarray, order: int = 1, fill: float = 0.0) -> Volume:
        """A model-grid array (e.g. a predicted dose, Gy) resampled back onto the patient grid.

        Patient voxels outside the model grid get ``fill``.
        """
        return resample(Volume(np.asarray(array, dtype=np.float32), self.model), self.patient,
                        order=order, fill=fill)
