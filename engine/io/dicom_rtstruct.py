"""RTSTRUCT contours to masks, and masks back to contours.

Rasterisation works in the CT's fractional index space, so vertices keep their sub-voxel
positions and any (flipped) axial grid works. Each contour is matched to the CT slice nearest its
plane (within half a slice: ContourImageSequence is not needed). All contours of a ROI on one
slice are filled together with the even-odd rule, so holes (a contour inside another) are
subtracted and several islands per slice are kept. A voxel belongs to the ROI when its centre is
inside. The fill is a vectorised scanline: every polygon edge adds a parity toggle on each voxel
row it crosses, and a running XOR along the row turns toggles into inside/outside.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import contourpy
import numpy as np
from pydicom.dataset import Dataset

from engine.case import Geometry
from engine.geometry import readonly

CONTOUR_DATA = 0x30060050
# a contour belongs to a slice when all its vertices are this close (in slices) to one plane
_PLANARITY_TOL = 0.1


@dataclass(frozen=True)
class RoiContours:
    """One ROI of an RTSTRUCT as read from the file (before rasterisation).

    ``contours`` holds the CLOSED_PLANAR polygons as ``(N, 3)`` LPS points in mm; ``notes`` what
    was skipped while reading (open or point contours, contours with fewer than 3 points).
    """

    number: int
    name: str
    interpreted_type: str | None
    color: tuple[int, int, int] | None
    frame_of_reference_uid: str
    contours: tuple[np.ndarray, ...]
    notes: tuple[str, ...] = ()


def _contour_points(item: Dataset) -> np.ndarray:
    """ContourData as ``(N, 3)`` float64, parsed from the raw bytes (pydicom's per-value
    DSfloat conversion is about 50x slower on large structure sets)."""
    raw = item.get_item(CONTOUR_DATA)
    if raw is None:
        return np.zeros((0, 3))
    value = raw.value
    if isinstance(value, bytes):
        text = value.strip(b" \x00")
        values = np.array(text.split(b"\\"), dtype=np.float64) if text else np.zeros(0)
    else:  # already converted by pydicom (a dataset built in memory)
        values = np.asarray(item.ContourData if value is not None else [], dtype=np.float64)
    if values.size % 3:
        raise ValueError(f"ContourData has {values.size} numbers, not a multiple of 3")
    return readonly(values.reshape(-1, 3))


def _color(value: object) -> tuple[int, int, int] | None:
    try:
        r, g, b = (int(float(v)) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return (r, g, b)


def read_rois(ds: Dataset) -> list[RoiContours]:
    """Every ROI of an RTSTRUCT dataset with its closed planar contours (LPS mm)."""
    names: dict[int, tuple[str, str]] = {}
    for item in ds.get("StructureSetROISequence", []):
        number = int(item.get("ROINumber", -1))
        names[number] = (str(item.get("ROIName", "") or f"ROI {number}").strip(),
                         str(item.get("ReferencedFrameOfReferenceUID", "") or ""))
    types = {int(o.get("ReferencedROINumber", -1)): o.get("RTROIInterpretedType")
             for o in ds.get("RTROIObservationsSequence", [])}
    found: dict[int, tuple[tuple[int, int, int] | None, list[np.ndarray], list[str]]] = {}
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.get("ReferencedROINumber", -1))
        contours: list[np.ndarray] = []
        counts = {"few": 0, "open": 0, "point": 0, "bad": 0}
        for item in roi.get("ContourSequence", None) or []:
            kind = str(item.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
            if kind == "POINT":
                counts["point"] += 1
                continue
            if kind != "CLOSED_PLANAR":
                counts["open"] += 1
                continue
            try:
                pts = _contour_points(item)
            except ValueError:
                counts["bad"] += 1
                continue
            if len(pts) < 3 or not np.isfinite(pts).all():
                counts["few"] += 1
                continue
            contours.append(pts)
        notes = []
        if counts["few"]:
            notes.append(f"skipped {counts['few']} contour(s) with fewer than 3 points")
        if counts["open"]:
            notes.append(f"skipped {counts['open']} open (non-closed) contour(s)")
        if counts["point"]:
            notes.append(f"has {counts['point']} point marker(s), which have no volume")
        if counts["bad"]:
            notes.append(f"skipped {counts['bad']} contour(s) with malformed ContourData")
        found[number] = (_color(roi.get("ROIDisplayColor")), contours, notes)
    out = []
    for number in sorted(set(names) | set(found)):
        name, for_uid = names.get(number, (f"ROI {number}", ""))
        color, contours, notes = found.get(number, (None, [], []))
        interpreted = types.get(number)
        out.append(RoiContours(number=number, name=name,
                               interpreted_type=str(interpreted) if interpreted else None,
                               color=color, frame_of_reference_uid=for_uid,
                               contours=tuple(contours), notes=tuple(notes)))
    return out


def _zero_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """A writable all-False bool array whose memory pages exist only once written.

    It lives in its own anonymous memory mapping, which the kernel fills with zeros page by page
    on first use. A ROI's mask is mostly False outside its bounding box, so a 40-ROI structure
    set on a 400 x 512 x 512 CT holds its boxes' pages (some 0.3 GB), not 40 x 105 MB: np.zeros
    gives that only while glibc hands out fresh memory, not after the engine's allocator tuning
    (engine.cpu_tuning keeps freed heap memory, which calloc must clear) nor with numpy's huge
    pages, where one written row makes 2 MB resident.
    """
    size = int(np.prod(shape))
    if size == 0:
        return np.zeros(shape, dtype=bool)
    # private: reading an unwritten page then maps the kernel's shared zero page (Python's
    # default, a shared mapping, would allocate it); Windows has no flags and maps lazily too
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") \
        else {}
    return np.frombuffer(mmap.mmap(-1, size, **private), dtype=bool).reshape(shape)


@dataclass(frozen=True)
class Rasterized:
    """A ROI's mask, the indices of the contours that made it, and how many were left out."""

    mask: np.ndarray
    kept: tuple[int, ...] = ()
    outside: int = 0
    off_plane: int = 0
    clipped: bool = False


def rasterize(contours: tuple[np.ndarray, ...] | list[np.ndarray],
              geometry: Geometry) -> Rasterized:
    """Fill closed planar contours (LPS mm) on ``geometry`` with the even-odd rule per slice.

    Returns the read-only bool ``[z, y, x]`` mask; contours beyond the CT (more than half a
    slice from the first/last slice, or entirely outside the image) and contours that do not lie
    in a slice plane are counted in ``outside`` / ``off_plane`` and left out.
    """
    nz, ny, nx = geometry.shape
    mask = _zero_mask(geometry.shape)
    ks, ja, ia, jb, ib = [], [], [], [], []
    outside = off_plane = 0
    clipped = False
    kept: list[int] = []
    for n_contour, pts in enumerate(contours):
        idx = geometry.lps_to_index(pts)
        kk = idx[:, 0]
        if np.ptp(kk) > _PLANARITY_TOL:
            off_plane += 1
            continue
        k = int(np.floor(kk.mean() + 0.5))
        j, i = idx[:, 1], idx[:, 2]
        if (not 0 <= k < nz or j.max() < -0.5 or j.min() > ny - 0.5 or i.max() < -0.5
                or i.min() > nx - 0.5):
            outside += 1
            continue
        if j.min() < -0.5 or j.max() > ny - 0.5 or i.min() < -0.5 or i.max() > nx - 0.5:
            clipped = True
        kept.append(n_contour)
        ks.append(np.full(len(j), k))
        ja.append(j)
        ia.append(i)
        jb.append(np.roll(j, -1))
        ib.append(np.roll(i, -1))
    if not ks:
        return Rasterized(readonly(mask), tuple(kept), outside, off_plane, clipped)
    k = np.concatenate(ks)
    y0, x0, y1, x1 = (np.concatenate(a) for a in (ja, ia, jb, ib))
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # voxel rows r with lo <= r < hi (half-open, so a vertex on a row is counted once)
    r_first = np.clip(np.ceil(lo), 0, ny).astype(np.int64)
    r_stop = np.clip(np.ceil(hi), 0, ny).astype(np.int64)
    n = np.maximum(r_stop - r_first, 0)
    keep = n > 0
    if not keep.any():
        return Rasterized(readonly(mask), tuple(kept), outside, off_plane, clipped)
    k, y0, x0, y1, x1, r_first, n = (a[keep] for a in (k, y0, x0, y1, x1, r_first, n))
    edge = np.repeat(np.arange(len(n)), n)
    offsets = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    rows = r_first[edge] + offsets
    x = x0[edge] + (rows - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    # the crossing toggles every voxel centre to its right: columns floor(x)+1 onwards
    cols = np.clip(np.floor(x).astype(np.int64) + 1, 0, nx)
    kk = k[edge]
    k0, k1 = kk.min(), kk.max() + 1
    r0, r1 = rows.min(), rows.max() + 1
    c0, c1 = cols.min(), min(cols.max(), nx - 1) + 1  # no voxel left of c0 is inside
    width = max(c1 - c0, 1)
    cols = np.minimum(cols, c1) - c0  # toggles at or beyond the last column change nothing
    flat = ((kk - k0) * (r1 - r0) + (rows - r0)) * (width + 1) + cols
    uniq, count = np.unique(flat, return_counts=True)
    toggles = np.zeros((k1 - k0) * (r1 - r0) * (width + 1), dtype=np.uint8)
    toggles[uniq[count % 2 == 1]] = 1
    inside = np.bitwise_xor.accumulate(toggles.reshape(k1 - k0, r1 - r0, width + 1), axis=2)
    mask[k0:k1, r0:r1, c0:c0 + width] = inside[:, :, :width].view(bool)
    return Rasterized(readonly(mask), tuple(kept), outside, off_plane, clipped)


def trace_contours(mask: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, ...]:
    """Closed planar polygons (LPS mm, one ``(N, 3)`` array each) around a mask, slice by slice.

    The polygons follow the 0.5 iso-line of the mask (marching squares), which passes half way
    between voxel centres inside and outside, so :func:`rasterize` gives the mask back exactly;
    holes and islands come out as separate polygons for the even-odd rule.
    """
    mask = np.asarray(mask, dtype=bool)
    out: list[np.ndarray] = []
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    for k in slices:
        sl = mask[k]
        rows = np.flatnonzero(sl.any(axis=1))
        cols = np.flatnonzero(sl.any(axis=0))
        j0, i0 = rows[0] - 1, cols[0] - 1
        crop = np.zeros((rows[-1] - rows[0] + 3, cols[-1] - cols[0] + 3), dtype=np.float64)
        crop[1:-1, 1:-1] = sl[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        gen = contourpy.contour_generator(z=crop, name="serial", line_type="Separate",
                                          corner_mask=False)
        for line in gen.lines(0.5):
            if len(line) > 1 and np.allclose(line[0], line[-1]):
                line = line[:-1]
            if len(line) < 3:
                continue
            idx = np.column_stack([np.full(len(line), float(k)), line[:, 1] + j0,
                                   line[:, 0] + i0])
            out.append(geometry.index_to_lps(idx))
    return tuple(out)
