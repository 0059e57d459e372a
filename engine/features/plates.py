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

A beam's marks and their closing are held as columns of bits along z, 64 slices to a 64-bit
word (:meth:`BeamMarks.bits`), so the closing costs a few dozen word operations per column; the
inverse-square sum then runs block by block over rows of y, in cache, over the x range of each
beam's closed columns only.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.case import Geometry, Plan, Technique
from engine.features.beam_geometry import source_direction_lps
from engine.features.beam_rays import LOW_BITS, BeamMarks, surface_voxels, words_per_column

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


def _shift_z(words: np.ndarray, n: int) -> np.ndarray:
    """Columns of bits (:meth:`BeamMarks.bits` layout): ``out[z] = a[z + n]``, zeros shifted in
    (``0 < |n| < 64``)."""
    if n > 0:
        out = words >> n
        out[..., :-1] |= words[..., 1:] << (64 - n)
    else:
        out = words << -n
        out[..., 1:] |= words[..., :-1] >> (64 + n)
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


def close_bits(words: np.ndarray, n_z: int) -> np.ndarray:
    """The reference's closing of marks packed along z (``(Y, X, words)``, see
    :meth:`BeamMarks.bits`) on a grid of ``n_z`` slices; bits past the grid stay 0.

    ``binary_erosion(binary_dilation(m, ones((4,4,4))), ones((3,3,3)))`` as scipy does it: both
    boxes are separable; scipy centres ``ones(4)`` at index 2, so the dilation is
    ``out[i] = any(m[i-1 : i+3])``, and the erosion counts everything outside the grid as 0 (the
    outer faces always end up 0). Along z, 64 voxels go through each word operation.
    """
    m = _dilate_axis(_dilate_axis(words, 0), 1)
    m = m | _shift_z(m, -1) | _shift_z(m, 1) | _shift_z(m, 2)
    in_grid = LOW_BITS[np.clip(n_z - 64 * np.arange(m.shape[2]), 0, 64)]
    m &= in_grid  # past the last slice is outside: the erosion must see 0 there
    m = _erode_axis(_erode_axis(m, 0), 1)
    return m & _shift_z(m, -1) & _shift_z(m, 1)


def _pack_z(mask: np.ndarray) -> np.ndarray:
    """A boolean ``[z, y, x]`` mask in the :meth:`BeamMarks.bits` layout."""
    n_words = words_per_column(mask.shape[0])
    packed = np.zeros(mask.shape[1:] + (8 * n_words,), dtype=np.uint8)
    bytes_ = np.packbits(np.moveaxis(mask, 0, -1), axis=-1, bitorder="little")
    packed[..., : bytes_.shape[-1]] = bytes_
    return packed.view(np.dtype("<u8"))


def close_like_reference(marks: np.ndarray) -> np.ndarray:
    """``binary_erosion(binary_dilation(m, ones((4,4,4))), ones((3,3,3)))`` for a boolean
    ``[z, y, x]`` mask (:func:`close_bits` on the mask packed along z)."""
    n_z = marks.shape[0]
    closed = close_bits(_pack_z(np.asarray(marks, dtype=bool)), n_z)
    bits = np.unpackbits(closed.view(np.uint8), axis=-1, count=n_z, bitorder="little")
    return np.moveaxis(bits.view(bool), -1, 0)


_ROWS_PER_BLOCK = 8  # rows weighted together: a block's temporaries stay in cache


def _occupied(words: np.ndarray) -> np.ndarray:
    """Which columns of bits (``(Y, X, words)``) hold any set bit."""
    any_bit = words[..., 0].copy()
    for w in range(1, words.shape[2]):
        any_bit |= words[..., w]
    return any_bit != 0


def _closed_marks(shape: tuple[int, int, int], surface: np.ndarray, source: np.ndarray
                  ) -> tuple[tuple[int, int], np.ndarray] | None:
    """One source's closed marks over the box of its marks padded by 3 columns (the closing
    reaches 2 beyond a mark): ``((y0, x0), words)`` in :meth:`BeamMarks.bits` layout, or None
    when nothing is marked."""
    words = BeamMarks(shape, surface, source).bits()
    marked = _occupied(words)
    ys = np.nonzero(marked.any(axis=1))[0]
    if len(ys) == 0:
        return None
    xs = np.nonzero(marked.any(axis=0))[0]
    y0, x0 = max(int(ys[0]) - 3, 0), max(int(xs[0]) - 3, 0)
    return (y0, x0), close_bits(words[y0: ys[-1] + 4, x0: xs[-1] + 4], shape[0])


def _beam_terms(shape: tuple[int, int, int],
                closed: Sequence[tuple[tuple[int, int], np.ndarray] | None],
                iso: np.ndarray, sources: np.ndarray, weights: np.ndarray) -> list[tuple]:
    """Per marked beam, what :func:`_weighted_rows` needs: the closed words and their origin,
    their occupied columns, the squared index distances to the source along y, x and z, and the
    factor ``weight * |s - iso|^2``."""
    n_z, n_y, n_x = shape
    terms = []
    for item, source, weight in zip(closed, sources, weights):
        if item is None:
            continue
        (y0, x0), words = item
        d2y, d2x, d2z = (((np.arange(n, dtype=np.float64) - source[a]) ** 2).astype(np.float32)
                         for a, n in ((1, n_y), (2, n_x), (0, n_z)))
        scale = np.float32(weight * float(np.sum((source - iso) ** 2)))
        terms.append((y0, x0, words, _occupied(words), d2y, d2x, d2z, scale))
    return terms


def _weighted_rows(plate: np.ndarray, terms: list[tuple], starts: Sequence[int]) -> None:
    """Store into ``plate`` (``[z, y, x]``) the blocks of rows of y from ``starts``: the sum over
    beams of their closed marks times the inverse-square factor.

    Each block sums every beam in cache before it is stored once; a beam's part of a block is
    cut to the x range of its closed columns, so the arithmetic covers little more than the
    closed voxels of an oblique beam. Beams are added in order: any split of the blocks gives
    the same plate.
    """
    n_z, n_y, n_x = plate.shape
    block = np.empty((_ROWS_PER_BLOCK, n_x, n_z), dtype=np.float32)  # [y, x, z], like the bits
    for r0 in starts:
        r1 = min(r0 + _ROWS_PER_BLOCK, n_y)
        total = block[: r1 - r0]
        total.fill(0.0)
        for y0, x0, words, columns, d2y, d2x, d2z, scale in terms:
            lo, hi = max(r0 - y0, 0), min(r1 - y0, words.shape[0])
            if lo >= hi:
                continue
            xs = np.nonzero(columns[lo:hi].any(axis=0))[0]
            if len(xs) == 0:
                continue
            xs = slice(int(xs[0]), int(xs[-1]) + 1)
            inside = np.unpackbits(words[lo:hi, xs].view(np.uint8), axis=2, count=n_z,
                                   bitorder="little")
            ys, xs = slice(y0 + lo, y0 + hi), slice(x0 + xs.start, x0 + xs.stop)
            values = d2z[None, None, :] + (d2y[ys, None] + d2x[None, xs])[:, :, None]
            np.divide(scale, values, out=values)
            np.multiply(values, inside, out=values)
            total[ys.start - r0: ys.stop - r0, xs] += values
        plate[:, r0:r1] = np.moveaxis(total, -1, 0)


def beam_plate(ptv: np.ndarray, isocenter_index: Sequence[float], sources_index: np.ndarray,
               weights: Sequence[float] | None = None, workers: int = 2) -> np.ndarray:
    """The summed beam plate (float32, the grid's shape) for sources given as voxel indices.

    Args:
        ptv: boolean target mask ``[z, y, x]``.
        isocenter_index: isocentre ``(z, y, x)`` in voxel indices.
        sources_index: ``(n, 3)`` source positions in voxel indices (see :func:`source_index`).
        weights: per-source multiplier of its plate (default 1 each).
        workers: threads computing the beams' closed marks, then the weighted sum's blocks of
            rows, side by side (numpy releases the GIL in its loops); the plate is the same
            for any number.
    """
    shape = tuple(int(n) for n in ptv.shape)
    sources = np.atleast_2d(np.asarray(sources_index, dtype=np.float64))
    weights = np.ones(len(sources)) if weights is None else np.asarray(weights, dtype=np.float64)
    surface = surface_voxels(np.asarray(ptv, dtype=bool))
    iso = np.asarray(isocenter_index, dtype=np.float64)
    plate = np.empty(shape, dtype=np.float32)
    starts = list(range(0, shape[1], _ROWS_PER_BLOCK))
    if workers > 1 and len(sources) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            closed = list(pool.map(lambda s: _closed_marks(shape, surface, s), sources))
            terms = _beam_terms(shape, closed, iso, sources, weights)
            # interleaved blocks: each thread gets a share of the beams' rows
            list(pool.map(lambda k: _weighted_rows(plate, terms, starts[k::workers]),
                          range(workers)))
    else:
        closed = [_closed_marks(shape, surface, s) for s in sources]
        _weighted_rows(plate, _beam_terms(shape, closed, iso, sources, weights), starts)
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


def plan_plates(ptv: np.ndarray, geometry: Geometry, plan: Plan, arc_step_deg: float = 4.0,
                workers: int = 2) -> tuple[np.ndarray, np.ndarray, float]:
    """Beam plate, angle plate and the number of angles summed, for a plan on a grid.

    The grid must be axis aligned with the isocentre on a voxel centre (the model grid is built
    that way); the PTV is a boolean mask on it. ``workers``: threads of :func:`beam_plate`.
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
    beam = beam_plate(ptv, iso_index, np.array(sources), weights, workers=workers)
    angle = angle_plate(ptv.shape, iso_index, np.array(directions))
    return beam, angle, float(sum(weights))
