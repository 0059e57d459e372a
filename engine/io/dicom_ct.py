"""A CT series (one file per slice) to a HU volume with its geometry.

Slices are sorted by their position along the slice normal (ImagePositionPatient projected on
row x column direction), never by InstanceNumber. The stack must be axial (the image axes along
the patient axes, in any of the HFS/HFP/FFS/FFP flips), evenly spaced and stacked along its
normal; anything else is refused with a message that names what is wrong. Flipped or turned
acquisitions (HFP, FFS, FFP, decubitus) are put into the axial convention (+z, +y, +x along the
array axes) exactly, by reversing and transposing array axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from engine.case import Geometry, Volume
from engine.geometry import readonly, reorient_axial
from engine.io.dicom_errors import DicomImportError

# largest deviation of a direction cosine from a patient axis that still counts as axial
# (1e-4 is 0.006 degrees: under 0.03 mm across a 50 cm field of view)
AXIS_TOL = 1e-4
# slices may sit this far (mm) off the common stacking line before the stack counts as sheared
SHEAR_TOL_MM = 0.05
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                 "1.2.840.10008.1.2.1.99"}


@dataclass(frozen=True)
class CtSeries:
    """The CT volume (HU, float32, axial convention) and what the rest of the import needs."""

    volume: Volume
    sop_instance_uids: tuple[str, ...]
    patient_position: str | None
    notes: tuple[str, ...] = ()


def axial_frame(iop: object, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and slice normal of an ImageOrientationPatient.

    Raises DicomImportError when the image plane is not axial within :data:`AXIS_TOL`.
    """
    try:
        v = np.asarray([float(x) for x in iop], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise DicomImportError(f"{where}: unreadable ImageOrientationPatient {iop!r}") from exc
    if v.shape != (6,):
        raise DicomImportError(f"{where}: ImageOrientationPatient needs 6 values, got {iop!r}")
    row, col = v[:3], v[3:]
    row = row / np.linalg.norm(row)
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    dev = max(float(1.0 - np.max(np.abs(u))) for u in (row, col))
    if dev > AXIS_TOL:
        tilt = float(np.degrees(np.arccos(np.clip(1.0 - dev, -1.0, 1.0))))
        raise DicomImportError(
            f"{where}: the images are oblique (rows along {np.round(row, 4).tolist()}, columns "
            f"along {np.round(col, 4).tolist()}, {tilt:.2f} degrees off the patient axes); "
            "DosePilot needs axial images. Reformat the series to axial slices first.")
    if np.argmax(np.abs(normal)) != 2:
        plane = "sagittal" if np.argmax(np.abs(normal)) == 0 else "coronal"
        raise DicomImportError(
            f"{where}: the images are {plane}, not axial; DosePilot needs an axial CT.")
    return row, col, normal


def _floats(ds: Dataset, keyword: str, n: int, where: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        out = np.asarray([float(x) for x in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DicomImportError(f"{where}: missing or unreadable {keyword}") from exc
    if out.shape != (n,) or not np.isfinite(out).all():
        raise DicomImportError(f"{where}: {keyword} should hold {n} numbers, got {value!r}")
    return out


def pixel_array(ds: Dataset, where: str, frames: int = 1) -> np.ndarray:
    """Stored pixel values of a single-sample image, shape ``(frames, rows, cols)``.

    Uncompressed data is read straight from the bytes (fast); anything else goes through
    pydicom's decoders, with a readable error when none can decode it.
    """
    if "PixelData" not in ds:
        raise DicomImportError(f"{where}: the file has no pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    bits = int(ds.get("BitsAllocated", 0))
    stored = int(ds.get("BitsStored", bits))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomImportError(f"{where}: colour images (SamplesPerPixel > 1) are not CT/dose")
    if rows <= 0 or cols <= 0:
        raise DicomImportError(f"{where}: Rows/Columns missing or zero")
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")) \
        if hasattr(ds, "file_meta") else "1.2.840.10008.1.2"
    n = frames * rows * cols
    if syntax in _UNCOMPRESSED and bits in (8, 16, 32) and (stored == bits or not signed):
        endian = ">" if syntax == "1.2.840.10008.1.2.2" else "<"
        dtype = np.dtype(f"{endian}{'i' if signed else 'u'}{bits // 8}")
        data = ds.PixelData
        if len(data) < n * dtype.itemsize:
            raise DicomImportError(f"{where}: pixel data is truncated ({len(data)} bytes, "
                                   f"{n * dtype.itemsize} expected for {frames}x{rows}x{cols})")
        out = np.frombuffer(data, dtype=dtype, count=n)
        return out.reshape(frames, rows, cols)
    try:
        out = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many types for undecodable data
        raise DicomImportError(f"{where}: cannot decode the pixel data (transfer syntax "
                               f"{syntax}): {exc}") from exc
    return out.reshape(frames, rows, cols)


def _stack_spacing(positions: np.ndarray, files: list[str], where: str,
                   thickness: float | None) -> float:
    """The uniform spacing (mm) of sorted slice positions; DicomImportError for gaps."""
    if len(positions) == 1:
        if thickness and thickness > 0:
            return thickness
        raise DicomImportError(f"{where}: a single slice without SliceThickness has no "
                               "known slice spacing")
    diffs = np.diff(positions)
    dup = np.flatnonzero(diffs < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise DicomImportError(
            f"{where}: two different slices lie at the same position {positions[i]:.2f} mm "
            f"({files[i]} and {files[i + 1]}); the series seems to mix two acquisitions.")
    step = float(np.min(diffs))
    tol = max(0.01, 0.01 * step)
    bad = np.flatnonzero(np.abs(diffs - step) > tol)
    if bad.size:
        i = int(bad[0])
        ratio = diffs[i] / step
        if abs(ratio - round(ratio)) * step <= tol:
            missing = int(round(ratio)) - 1
            raise DicomImportError(
                f"{where}: {missing} slice(s) missing between {positions[i]:.2f} mm and "
                f"{positions[i + 1]:.2f} mm along the slice normal (gap of {diffs[i]:.2f} mm "
                f"where the other slices are {step:.2f} mm apart).")
        raise DicomImportError(
            f"{where}: slice spacing is not uniform ({', '.join(f'{d:.2f}' for d in diffs[:6])}"
            f"{'...' if diffs.size > 6 else ''} mm); DosePilot needs evenly spaced slices.")
    return float(diffs.mean())


def read_ct_series(slices: list[tuple[Path, Dataset]], series_uid: str) -> CtSeries:
    """Read the CT slices of one series into a HU volume in the axial convention."""
    where = f"CT series {series_uid}"
    notes: list[str] = []
    uniq: dict[str, tuple[Path, Dataset]] = {}
    for path, ds in slices:
        uid = str(ds.get("SOPInstanceUID", path))
        if uid in uniq:
            notes.append(f"{where}: {path.name} duplicates {uniq[uid][0].name}; read once")
            continue
        uniq[uid] = (path, ds)
    items = list(uniq.values())
    if not items:
        raise DicomImportError(f"{where}: no image slices")
    first_path, first = items[0]
    row, col, normal = axial_frame(first.get("ImageOrientationPatient"),
                                   f"{where} ({first_path.name})")
    iop0 = np.concatenate([row, col])
    spacing_rc = _floats(first, "PixelSpacing", 2, f"{where} ({first_path.name})")
    shape_rc = (int(first.get("Rows", 0)), int(first.get("Columns", 0)))
    positions, ipps = [], []
    for path, ds in items:
        w = f"{where} ({path.name})"
        iop = _floats(ds, "ImageOrientationPatient", 6, w)
        iop = np.concatenate([iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])])
        if np.abs(iop - iop0).max() > AXIS_TOL:
            raise DicomImportError(f"{where}: slices have different orientations "
                                   f"({first_path.name} and {path.name})")
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != shape_rc:
            raise DicomImportError(f"{where}: slices have different sizes ({first_path.name} "
                                   f"and {path.name})")
        if np.abs(_floats(ds, "PixelSpacing", 2, w) - spacing_rc).max() > 1e-4:
            raise DicomImportError(f"{where}: slices have different pixel spacings "
                                   f"({first_path.name} and {path.name})")
        ipp = _floats(ds, "ImagePositionPatient", 3, w)
        ipps.append(ipp)
        positions.append(float(ipp @ normal))
    order = np.argsort(positions, kind="stable")
    items = [items[i] for i in order]
    ipps_sorted = np.asarray(ipps)[order]
    pos = np.asarray(positions)[order]
    names = [p.name for p, _ in items]
    in_plane = ipps_sorted - ipps_sorted[0] - np.outer(pos - pos[0], normal)
    shear = float(np.abs(in_plane).max()) if len(items) > 1 else 0.0
    if shear > SHEAR_TOL_MM:
        extent = max(pos[-1] - pos[0], 1e-6)
        tilt = float(np.degrees(np.arctan(shear / extent)))
        raise DicomImportError(
            f"{where}: the slices are not stacked along their normal (shifted {shear:.2f} mm "
            f"in-plane over {extent:.1f} mm, a gantry tilt of about {tilt:.1f} degrees: an "
            "oblique stack); reconstruct the CT without gantry tilt.")
    thickness = first.get("SliceThickness")
    dz = _stack_spacing(pos, names, where, float(thickness) if thickness else None)
    raw = np.empty((len(items),) + shape_rc, dtype=np.float32)
    slopes = np.ones(len(items), dtype=np.float32)
    intercepts = np.zeros(len(items), dtype=np.float32)
    for k, (path, ds) in enumerate(items):
        raw[k] = pixel_array(ds, f"{where} ({path.name})")[0]
        slopes[k] = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercepts[k] = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    raw *= slopes[:, None, None]
    raw += intercepts[:, None, None]
    geometry = Geometry(shape=raw.shape, origin=tuple(ipps_sorted[0]),
                        spacing=(dz, float(spacing_rc[0]), float(spacing_rc[1])),
                        direction=(tuple(normal), tuple(col), tuple(row)))
    volume = reorient_axial(Volume(readonly(raw), geometry))
    uids = [str(ds.get("SOPInstanceUID", "")) for _, ds in items]
    if normal[2] < 0:  # slices were sorted along -z
        uids.reverse()
    position = first.get("PatientPosition")
    return CtSeries(volume=volume, sop_instance_uids=tuple(uids),
                    patient_position=str(position).strip().upper() if position else None,
                    notes=tuple(notes))
