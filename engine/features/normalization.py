"""Fixed constants that map each modality to [-1, 1]; stored in the model's config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np


def _to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of ``[lo, hi]`` onto ``[-1, 1]``, clipped, float32."""
    out = (np.asarray(values, dtype=np.float32) - np.float32(lo)) * np.float32(2.0 / (hi - lo))
    out -= np.float32(1.0)
    return np.clip(out, -1.0, 1.0, out=out)


@dataclass(frozen=True)
class Normalization:
    """How raw modality values become model inputs in ``[-1, 1]`` (and dose comes back).

    Attributes:
        ct_min_hu, ct_max_hu: CT clip range (HU), mapped linearly onto [-1, 1].
        ptv_max_gy: PTV channel scale: a voxel's prescription (Gy) over ``[0, ptv_max_gy]``.
        oar_max_code: OAR channel scale: GDP-HMM OAR codes (``1 + 4 idx / 30``, at most 5).
        dose_max_gy: dose scale: ``[0, dose_max_gy]`` Gy, clipped.
        beam_plate_max: beam-plate scale; the plate is first divided by the number of gantry
            angles summed, so it is about 1 at the isocentre for any plan, then
            ``[0, beam_plate_max]`` maps onto [-1, 1].
    Body and angle plate are binary: {0, 1} -> {-1, 1}.
    """

    ct_min_hu: float = -1000.0
    ct_max_hu: float = 1000.0
    ptv_max_gy: float = 80.0
    oar_max_code: float = 5.0
    dose_max_gy: float = 80.0
    beam_plate_max: float = 2.0

    def __post_init__(self) -> None:
        for lo, hi, what in ((self.ct_min_hu, self.ct_max_hu, "CT range"),
                             (0.0, self.ptv_max_gy, "PTV scale"),
                             (0.0, self.oar_max_code, "OAR scale"),
                             (0.0, self.dose_max_gy, "dose scale"),
                             (0.0, self.beam_plate_max, "beam-plate scale")):
            if not hi > lo:
                raise ValueError(f"normalisation {what} must be increasing, got {lo} .. {hi}")

    def to_dict(self) -> dict[str, float]:
        """Plain JSON-able values, for a model config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Normalization:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a config from elsewhere)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown normalisation keys {sorted(unknown)}; "
                             f"expected some of {sorted(known)}")
        return cls(**{k: float(v) for k, v in values.items()})

    def ct(self, hu: np.ndarray) -> np.ndarray:
        return _to_unit(hu, self.ct_min_hu, self.ct_max_hu)

    def ptv(self, prescription_gy: np.ndarray) -> np.ndarray:
        return _to_unit(prescription_gy, 0.0, self.ptv_max_gy)

    def ptv_to_gy(self, unit: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`ptv`: the PTV channel back to prescriptions in Gy (float32)."""
        x = np.clip(np.asarray(unit, dtype=np.float32), -1.0, 1.0)
        return (x + np.float32(1.0)) * np.float32(self.ptv_max_gy / 2.0)

    def oar(self, code: np.ndarray) -> np.ndarray:
        return _to_unit(code, 0.0, self.oar_max_code)

    def binary(self, mask: np.ndarray) -> np.ndarray:
        return np.where(np.asarray(mask) > 0.5, np.float32(1.0), np.float32(-1.0))

    def dose(self, dose_gy: np.ndarray) -> np.ndarray:
        return _to_unit(dose_gy, 0.0, self.dose_max_gy)

    def dose_to_gy(self, unit: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`dose`: model output in [-1, 1] back to Gy (float32)."""
        x = np.clip(np.asarray(unit, dtype=np.float32), -1.0, 1.0)
        return (x + np.float32(1.0)) * np.float32(self.dose_max_gy / 2.0)

    def beam_plate(self, plate: np.ndarray, n_angles: float) -> np.ndarray:
        return _to_unit(np.asarray(plate, dtype=np.float32) / max(float(n_angles), 1.0), 0.0,
                        self.beam_plate_max)

    def beam_plate_per_angle(self, unit: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`beam_plate`: the plate divided by the number of gantry angles
        (float32; values above ``beam_plate_max`` come back as ``beam_plate_max``)."""
        x = np.clip(np.asarray(unit, dtype=np.float32), -1.0, 1.0)
        return (x + np.float32(1.0)) * np.float32(self.beam_plate_max / 2.0)
