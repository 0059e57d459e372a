"""Beam plate and angle plate: where the beams of a plan go, as volumes on a grid.

Semantics follow the GDP-HMM challenge toolkit (notes/gdp-hmm-challenge.md §2.2-2.3):

* **beam plate**, per gantry angle: the voxels on rays cast from the source (SAD 1000 mm)
  through the PTV surface to the far side of the grid (:mod:`engine.features.beam_rays`), closed
  by a 4^3 dilation and a 3^3 erosion (``scipy.ndimage`` conventions: the even box reaches one
  voxel further towards lower indices; the erosion clears the grid's outer faces), times the
  inverse-square factor ``|s - iso|^2 / |v - s|^2`` computed in voxel-index units (1 at the
  isocentre); summed over all angles.
* **angle plate**: on the axial plane, a spoke of ``length`` voxels and ``width`` voxels from the
  isocentre towards each source, drawn on the slices ``[iso_z - 5, iso_z + 5)``; 1 on a spoke,
  0 elsewhere. The reference draws it with ``cv2.line(thickness=4)``; here a spoke is the set of
  pixels within ``width / 2`` of the segment (a capsule).

Everything works in the grid's index space. Sources come from the beams' IEC angles and the
patient position (:mod:`engine.features.beam_geometry`), then are truncated to integer voxel
positions as the reference's ``int()`` does (:func:`source_index`). Static beams use their
gantry angle; an arc uses its control-point angles, thinned to at most one per
``arc_step_deg`` and weighted so the sum still counts every control point.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.case import Geometry, Plan, Technique
from engine.features.beam_geometry import source_direction_lps
from engine.features.beam_rays import BeamMarks, surface_voxels

ANGLE_PLATE_LENGTH = 50.0
ANGLE_PLATE_WIDTH = 4.0
ANGLE_PLATE_HALF_SLICES = 5


def _snap(index: np.ndarray) -> np.ndarray:
    """Indices within 1e-6 of an integer become that integer (round-off from LPS transforms)."""
    nearest = np.rint(index)
    return np.where(np.abs(index - nearest) < 1e-6, nearest, index)


def source_index(geometry: Geometry, isocenter_index: np.ndarray, direction_lps: np.ndarray,
                 sad_mm: float) -> np.ndarray:
    """The source as voxel indices, computed as the reference does and truncated like ``int()``.

    The reference adds ``SAD * direction / spacing`` to the integer isocentre and truncates;
    doing the same arithmetic (rather than mapping the LPS source point) gives bit-identical
    sources on axis-aligned grids.
    """
    along_axes = np.asarray(geometry.direction) @ np.asarray(direction_lps, dtype=np.float64)
    offset = sad_mm * along_axes / np.asarray(geometry.spacing)
    return np.trunc(_snap(np.asarray(isocenter_index, dtype=np.float64)) + offset)


def _shift_bits(packed: np.ndarray, towards_lower: bool) -> np.ndarray:
    """Bits packed big-endian along the last axis, moved by one position (zeros shifted in)."""
    out = np.empty_like(packed)
    if towards_lower:  # out[x] = bits[x + 1]
        np.left_shift(packed, 1, out=out)
        out[..., :-1] |= packed[..., 1:] >> 7
    else:  # out[x] = bits[x - 1]
        np.right_shift(packed, 1, out=out)
        out[..., 1:] |= packed[..., :-1] << 7
    return out


def _dilate_axis(a: np.ndarray, axis: int) -> np.ndarray:
    """``out[i] = a[i-1] | a[i] | a[i+1] | a[i+2]`` along ``axis`` (outside: 0)."""
    def cut(lo: int | None, hi: int | None) -> tuple[slice, ...]:
        return (slice(None),) * axis + (slice(lo, hi),)

    out = a.copy()
    out[cut(1, None)] |= a[cut(None, -1)]
    out[cut(None, -1)] |= a[cut(1, None)]
    out[cut(None, -2)] |= a[cut(2, None)]
    return out


def _erode_axis(a: np.ndarray, axis: int) -> np.ndarray:
    """``out[i] = a[i-1] & a[i] & a[i+1]`` along ``axis`` (outside: 0)."""
    def cut(lo: int | None, hi: int | None) -> tuple[slice, ...]:
        return (slice(None),) * axis + (slice(lo, hi),)

    out = np.zeros_like(a)
    np.bitwise_and(a[cut(None, -2)], a[cut(1, -1)], out=out[cut(1, -1)])
    out[cut(1, -1)] &= a[cut(2, None)]
    return out


def close_like_reference(marks: np.ndarray) -> np.ndarray:
    """``binary_erosion(binary_dilation(m, ones((4,4,4))), ones((3,3,3)))`` as scipy does it.

    Both boxes are separable, so this is three 1-D passes each. scipy centres ``ones(4)`` at
    index 2, so the dilation is ``out[i] = any(m[i-1 : i+3])``; the erosion counts everything
    outside the array as 0 (the outer faces always end up 0). The work is done on bits packed
    along x, eight voxels a byte.
    """
    nx = marks.shape[2]
    m = np.packbits(marks, axis=2)
    if nx % 8:  # keep the padding bits out of the array: they must act as "outside" (0)
        m[..., -1] &= np.uint8((0xFF << (8 - nx % 8)) & 0xFF)
    m = _dilate_axis(_dilate_axis(m, 0), 1)
    pair = m | _shift_bits(m, towards_lower=True)
    m = pair | _shift_bits(m, towards_lower=False) | _shift_bits(pair, towards_lower=True)
    if nx % 8:
        m[..., -1] &= np.uint8((0xFF << (8 - nx % 8)) & 0xFF)
    m = _erode_axis(_erode_axis(m, 0), 1)
    m = m & _shift_bits(m, towards_lower=True) & _shift_bits(m, towards_lower=False)
    out = np.unpackbits(m, axis=2, count=nx).view(bool)
    out[..., 0] = False
    out[..., -1] = False
    return out


def _padded_box(box: tuple[slice, ...], shape: tuple[int, ...], pad: int = 3) -> tuple[slice, ...]:
    return tuple(slice(max(b.start - pad, 0), min(b.stop + pad, n)) for b, n in zip(box, shape))


def _one_beam(shape: tuple[int, int, int], surface: np.ndarray, iso: np.ndarray,
              source: np.ndarray, weight: float
              ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray] | None:
    """One source's weighted plate over its bounding box: ``(box, weights, closed mask)``."""
    marks = BeamMarks(shape, surface, source)
    box = marks.bounding_box()
    if box is None:
        return None
    box = _padded_box(box, shape)
    closed = close_like_reference(marks.render(box))
    d2 = [((np.arange(b.start, b.stop, dtype=np.float64) - s) ** 2).astype(np.float32)
          for b, s in zip(box, source)]
    dist2 = d2[0][:, None, None] + (d2[1][:, None] + d2[2][None, :])[None]
    scale = np.float32(weight * float(np.sum((source - iso) ** 2)))
    np.divide(scale, dist2, out=dist2)
    return box, dist2, closed


def beam_plate(ptv: np.ndarray, isocenter_index: Sequence[float], sources_index: np.ndarray,
               weights: Sequence[float] | None = None, workers: int = 2) -> np.ndarray:
    """The summed beam plate (float32, the grid's shape) for sources given as voxel indices.

    Args:
        ptv: boolean target mask ``[z, y, x]``.
        isocenter_index: isocentre ``(z, y, x)`` in voxel indices.
        sources_index: ``(n, 3)`` source positions in voxel indices (see :func:`source_index`).
        weights: per-source multiplier of its plate (default 1 each).
        workers: threads computing beams side by side (numpy releases the GIL in its loops).
    """
    shape = tuple(int(n) for n in ptv.shape)
    plate = np.zeros(shape, dtype=np.float32)
    sources = np.atleast_2d(np.asarray(sources_index, dtype=np.float64))
    weights = np.ones(len(sources)) if weights is None else np.asarray(weights, dtype=np.float64)
    surface = surface_voxels(np.asarray(ptv, dtype=bool))
    iso = np.asarray(isocenter_index, dtype=np.float64)
    jobs = [(shape, surface, iso, s, float(w)) for s, w in zip(sources, weights)]
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda job: _one_beam(*job), jobs))
    else:
        results = [_one_beam(*job) for job in jobs]
    for result in results:
        if result is not None:
            box, values, closed = result
            target = plate[box]
            np.add(target, values, out=target, where=closed)
    return plate


def angle_plate_2d(shape_yx: tuple[int, int], isocenter_yx: Sequence[float],
                   directions_yx: np.ndarray, length: float = ANGLE_PLATE_LENGTH,
                   width: float = ANGLE_PLATE_WIDTH) -> np.ndarray:
    """Spokes from the isocentre along in-plane unit directions ``(n, 2)`` as (row, col)."""
    rows = np.arange(shape_yx[0], dtype=np.float64)[:, None] - isocenter_yx[0]
    cols = np.arange(shape_yx[1], dtype=np.float64)[None, :] - isocenter_yx[1]
    out = np.zeros(shape_yx, dtype=bool)
    r2 = (width / 2.0) ** 2
    for d in np.atleast_2d(directions_yx):
        n = np.hypot(d[0], d[1])
        if n < 1e-9:
            continue
        dy, dx = d / n
        t = np.clip(rows * dy + cols * dx, 0.0, length)
        out |= (rows - t * dy) ** 2 + (cols - t * dx) ** 2 <= r2
    return out


def angle_plate(shape: tuple[int, int, int], isocenter_index: Sequence[float],
                directions_yx: np.ndarray) -> np.ndarray:
    """The 3-D angle plate: :func:`angle_plate_2d` on the slices around the isocentre (float32)."""
    out = np.zeros(shape, dtype=np.float32)
    z = int(round(float(isocenter_index[0])))
    lo, hi = max(z - ANGLE_PLATE_HALF_SLICES, 0), min(z + ANGLE_PLATE_HALF_SLICES, shape[0])
    if lo < hi:
        out[lo:hi] = angle_plate_2d(shape[1:], isocenter_index[1:], directions_yx)
    return out


def plan_angles(plan: Plan, arc_step_deg: float = 4.0) -> list[tuple[int, float, float]]:
    """``(beam index, gantry angle, weight)`` for every angle the plates are drawn from.

    Static beams give their one angle (weight 1). An arc keeps its first control point and then
    every control point at least ``arc_step_deg`` further round; each kept angle's weight is the
    number of control points it stands for, so the weights sum to the control-point count.
    """
    out = []
    for i, beam in enumerate(plan.beams):
        if beam.technique is not Technique.ARC:
            out.append((i, beam.gantry_deg, 1.0))
            continue
        cps = beam.control_point_gantry_deg
        kept = [0]
        travelled = 0.0
        for j in range(1, len(cps)):
            step = abs((cps[j] - cps[j - 1] + 180.0) % 360.0 - 180.0)
            travelled += step
            if travelled >= arc_step_deg:
                kept.append(j)
                travelled = 0.0
        bounds = kept + [len(cps)]
        out.extend((i, cps[a], float(b - a)) for a, b in zip(bounds[:-1], bounds[1:]))
    return out


def plan_plates(ptv: np.ndarray, geometry: Geometry, plan: Plan, arc_step_deg: float = 4.0
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Beam plate, angle plate and the number of angles summed, for a plan on a grid.

    The grid must be axis aligned with the isocentre on a voxel centre (the model grid is built
    that way); the PTV is a boolean mask on it.
    """
    if not plan.beams:
        raise ValueError(f"plan {plan.name!r} has no beams: no beam plate can be drawn")
    angles = plan_angles(plan, arc_step_deg)
    iso_index = _snap(geometry.lps_to_index(np.asarray(plan.isocenter_mm)))
    sources = []
    directions = []
    for beam_index, angle, _ in angles:
        beam = plan.beams[beam_index]
        direction = source_direction_lps(angle, beam.couch_deg, plan.patient_position)
        sources.append(source_index(geometry, iso_index, direction, beam.sad_mm))
        directions.append((np.asarray(geometry.direction) @ direction)[1:]
                          / np.asarray(geometry.spacing[1:]))
    weights = [w for _, _, w in angles]
    beam = beam_plate(ptv, iso_index, np.array(sources), weights)
    angle = angle_plate(ptv.shape, iso_index, np.array(directions))
    return beam, angle, float(sum(weights))
