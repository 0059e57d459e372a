"""RTDOSE to a dose volume (Gy) on its own grid, and onto the CT grid.

Frames lie at ImagePositionPatient + GridFrameOffsetVector along the slice normal; the vector is
relative to the first frame when its first value is 0 and holds absolute positions otherwise
(DICOM PS3.3 C.8.8.3.2), both handled. Stored values times DoseGridScaling give the dose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from engine.case import Geometry, Volume
from engine.geometry import readonly, reorient_axial, resample
from engine.io.dicom_ct import axial_frame, pixel_array
from engine.io.dicom_errors import DicomImportError


@dataclass(frozen=True)
class DoseGrid:
    """A parsed RTDOSE: dose on its own grid and its DICOM context."""

    volume: Volume
    units: str
    summation_type: str
    referenced_plan_uid: str
    frame_of_reference_uid: str
    scaling: float
    notes: tuple[str, ...] = ()


def read_rtdose(ds: Dataset, where: str = "RTDOSE") -> DoseGrid:
    """Parse an RTDOSE dataset into a dose volume (axial convention, float32)."""
    notes: list[str] = []
    row, col, normal = axial_frame(ds.get("ImageOrientationPatient"), where)
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        dy, dx = (float(v) for v in ds.PixelSpacing)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        scaling = float(ds.get("DoseGridScaling", 1.0) or 1.0)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DicomImportError(f"{where}: missing or unreadable grid attributes ({exc})") from exc
    raw = pixel_array(ds, where, frames)
    if frames > 1:
        try:
            gfov = np.asarray([float(v) for v in ds.GridFrameOffsetVector])
        except (AttributeError, TypeError, ValueError) as exc:
            raise DicomImportError(f"{where}: multi-frame dose without a readable "
                                   "GridFrameOffsetVector") from exc
        if gfov.size != frames:
            raise DicomImportError(f"{where}: GridFrameOffsetVector has {gfov.size} values for "
                                   f"{frames} frames")
        offsets = gfov - gfov[0]  # absolute positions (first != 0) start at the first frame
        steps = np.diff(offsets)
        dz = float(np.mean(steps))
        if abs(dz) < 1e-6 or np.abs(steps - dz).max() > max(0.01, 0.01 * abs(dz)):
            raise DicomImportError(f"{where}: dose frames are not evenly spaced "
                                   f"(GridFrameOffsetVector {gfov[:6].tolist()}...)")
    else:
        dz = float(ds.get("SliceThickness", 0) or 0) or 1.0
    axis0 = normal if dz > 0 else -normal
    dose = (raw.astype(np.float64) * scaling).astype(np.float32)
    geometry = Geometry(shape=dose.shape, origin=tuple(ipp), spacing=(abs(dz), dy, dx),
                        direction=(tuple(axis0), tuple(col), tuple(row)))
    volume = reorient_axial(Volume(readonly(dose), geometry))
    units = str(ds.get("DoseUnits", "GY") or "GY").upper()
    if units != "GY":
        notes.append(f"{where}: dose units are {units}, not Gy; values are shown unscaled")
    summation = str(ds.get("DoseSummationType", "") or "").upper()
    plans = ds.get("ReferencedRTPlanSequence", [])
    return DoseGrid(volume=volume, units=units, summation_type=summation,
                    referenced_plan_uid=str(plans[0].get("ReferencedSOPInstanceUID", ""))
                    if plans else "",
                    frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
                    scaling=scaling, notes=tuple(notes))


def dose_on_ct(dose: Volume, ct: Geometry, body: np.ndarray | None = None,
               where: str = "RTDOSE") -> tuple[Volume, tuple[str, ...]]:
    """Resample a dose onto the CT grid (trilinear, 0 Gy outside the dose grid).

    Warns when the dose grid does not cover the body (or, without a body, the CT): voxels
    outside get 0 Gy, which would understate DVHs of structures reaching there.
    """
    on_ct = resample(dose, ct, order=1, fill=0.0)
    idx = dose.geometry.lps_to_index(ct.index_to_lps(np.asarray(ct.shape) - 1.0))
    idx0 = dose.geometry.lps_to_index(ct.origin)
    lo = np.minimum(idx, idx0)
    hi = np.maximum(idx, idx0)
    half = 0.5 + 1e-6
    covers_ct = bool(np.all(lo >= -half) and np.all(hi <= np.asarray(dose.geometry.shape) - 1
                                                    + half))
    notes: list[str] = []
    if not covers_ct:
        inside = resample(Volume(np.ones(dose.geometry.shape, np.uint8), dose.geometry), ct,
                          order=0, fill=0).array.astype(bool)
        region, label = (body, "body") if body is not None and body.any() else (None, "CT")
        if region is None:
            frac = 1.0 - inside.mean()
        else:
            frac = 1.0 - inside[region].mean()
        if frac > 0.001:
            notes.append(f"{where}: the dose grid does not cover the whole {label} "
                         f"({100 * frac:.1f}% of it lies outside; set to 0 Gy there)")
    return on_ct, tuple(notes)


@dataclass(frozen=True)
class DoseBeyondCt:
    """How much of a dose lies outside the CT's extent (voxel centres beyond its edge voxels'
    outer faces).

    Attributes:
        fraction_outside: share of the integral dose (sum over voxels) outside the CT, 0..1.
        max_gy: the dose maximum on its own grid.
        max_outside_gy: the largest dose outside the CT (0 when none lies there).
    """

    fraction_outside: float
    max_gy: float
    max_outside_gy: float


def dose_beyond_ct(dose: Volume, ct: Geometry) -> DoseBeyondCt:
    """Where ``dose`` (on its own axial grid) lies relative to the CT grid ``ct`` (axial)."""
    bounds = []
    for d_axis, c_axis, half in zip(dose.geometry.axis_coordinates(), ct.axis_coordinates(),
                                    np.asarray(ct.spacing) / 2.0):
        lo, hi = float(c_axis.min()) - half - 1e-6, float(c_axis.max()) + half + 1e-6
        inside = np.flatnonzero((d_axis >= lo) & (d_axis <= hi))  # one run: the axes are sorted
        bounds.append((int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 0))
    a = dose.array
    (k0, k1), (j0, j1), (i0, i1) = bounds
    # the outside as six slabs around the inside block (views, no copies of a large grid)
    slabs = [a[:k0], a[k1:], a[k0:k1, :j0], a[k0:k1, j1:], a[k0:k1, j0:j1, :i0],
             a[k0:k1, j0:j1, i1:]]
    total = float(a.sum(dtype=np.float64))
    outside = sum(float(s.sum(dtype=np.float64)) for s in slabs)
    return DoseBeyondCt(
        fraction_outside=outside / total if total > 0 else 0.0,
        max_gy=float(a.max()) if a.size else 0.0,
        max_outside_gy=max((float(s.max()) for s in slabs if s.size), default=0.0))
