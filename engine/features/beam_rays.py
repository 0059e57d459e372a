"""Voxels marked by the GDP-HMM beam-plate ray cast, computed without a loop over rays.

The reference (``toolkit.get_per_beamplate``, notes/gdp-hmm-challenge.md §2.2) casts, for every
PTV surface voxel ``p``, a ray from the source ``s`` through ``p`` to the far row boundary of the
grid (end point truncated to integers) and rasterises it with ``n = max|c - s| + 1`` rounded
``linspace`` samples: along the ray's major axis every integer position is visited once, and the
two other coordinates are ``rint(k * step + s)`` with ``k`` the distance along the major axis.

Here every ray is reduced to its per-unit-step slopes. Rays whose major axis is in-plane (row
or column: all rays of a coplanar beam) mark, in each major-axis slice and each column of that
slice, exactly the voxels ``rint(k * slope_z + s_z)`` of the rays that round into that column. We
take the *hull* of those marks per column (lowest to highest marked z) with a sorted-slope
search and sparse-table range minima/maxima, which reproduces the reference exactly where the
beam's eye view of the PTV has no gap along z within one column. Where it has gaps (target lobes
one above the other, a concave outline), rays are split by which z-run of their beam's-eye-view
column they belong to, and rays in columns where that split is ambiguous (a lobe starts or
ends) are rasterised exactly as the reference does, sample by sample. Rays with the same
truncated end point are the same ray and are cast once. Sparse sampling holes that the
reference leaves inside a hull are filled here; the reference's closing (dilation 4^3, erosion
3^3) fills nearly all of them too: 99.98 % of voxels agree on a real head-and-neck PTV and
99.9+ % on the synthetic cases of tests/test_plates.py.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_GAP_BINS = 2  # occupancy padding around the binned slopes
_BRIDGE = (2, 3)  # closing (z, column) bins: smaller holes in the binned slopes are sampling holes


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Indices ``(n, 3)`` of mask voxels with a 6-neighbour outside the mask.

    Neighbours wrap around at the array ends, like the reference's unchecked ``p - 1``.
    """
    if not mask.any():
        return np.zeros((0, 3), dtype=np.int64)
    extent = [np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != k)))[0]
              for k in range(3)]
    lo = [int(e[0]) for e in extent]
    hi = [int(e[-1]) for e in extent]
    if min(lo) == 0 or any(h == n - 1 for h, n in zip(hi, mask.shape)):
        offset = np.zeros(3, dtype=np.int64)  # touches a face: wrap-around neighbours matter
    else:  # a one-voxel margin of background around the box gives the same answer, faster
        box = tuple(slice(a - 1, b + 2) for a, b in zip(lo, hi))
        mask, offset = mask[box], np.array(lo, dtype=np.int64) - 1
    inner = mask.copy()
    for axis in range(3):
        inner &= np.roll(mask, 1, axis)
        inner &= np.roll(mask, -1, axis)
    return np.argwhere(mask & ~inner) + offset


def _row_max_abs(v: np.ndarray) -> np.ndarray:
    """``abs(v).max(axis=1)`` for ``(n, 3)`` arrays (element-wise: much faster than a reduce)."""
    a = np.abs(v)
    return np.maximum(np.maximum(a[:, 0], a[:, 1]), a[:, 2])


def ray_ends(surface: np.ndarray, source: np.ndarray, shape: tuple[int, int, int]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per ray: ``c - s`` (the reference's truncated far end) and ``L = max |c - s|``."""
    p = surface.astype(np.float64)
    s = source
    y_end = np.where(s[1] > p[:, 1], 0.0, shape[1] - 1.0)
    py = np.where(p[:, 1] == s[1], p[:, 1] + 1.0, p[:, 1])
    ratio = (y_end - s[1]) / (py - s[1])
    delta = np.stack([np.trunc(s[0] + ratio * (p[:, 0] - s[0])) - s[0], y_end - s[1],
                      np.trunc(s[2] + ratio * (p[:, 2] - s[2])) - s[2]], axis=1)
    return delta, _row_max_abs(delta)


def _range_min_max(values: np.ndarray, lo: np.ndarray, hi: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min and max of ``values[lo:hi]`` per query, and which queries were non-empty.

    Sparse tables: level ``l`` holds the min/max of ``values[i : i + 2**l]``, built only up to
    the longest query; each query is then two overlapping power-of-two windows.
    """
    n = hi - lo
    nonempty = n > 0
    n = np.where(nonempty, n, 1)
    lo = np.where(nonempty, lo, 0)
    level = np.frexp(n)[1] - 1  # floor(log2 n)
    size = len(values)
    levels = int(level.max()) + 1
    lows = np.empty((levels, size))
    highs = np.empty((levels, size))
    lows[0], highs[0] = values, values
    for lev in range(1, levels):  # only the windows that fit: the rest is never read
        width, fit = 1 << (lev - 1), size - (1 << lev) + 1
        np.minimum(lows[lev - 1, :fit], lows[lev - 1, width: width + fit], out=lows[lev, :fit])
        np.maximum(highs[lev - 1, :fit], highs[lev - 1, width: width + fit],
                   out=highs[lev, :fit])
    first = level * size + lo  # flat indices: far faster than 2-D fancy indexing
    last = first + n - (1 << level)
    lows, highs = lows.ravel(), highs.ravel()
    return (np.minimum(lows[first], lows[last]), np.maximum(highs[first], highs[last]),
            nonempty)


def _label_rays(slope_o: np.ndarray, slope_z: np.ndarray, bin_size: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Split rays by beam's-eye-view z-run, and flag those whose run is ambiguous.

    Slopes are binned (``bin_size``, the widest column a major-axis slice has). After a small
    closing (``_BRIDGE``: sampling holes, not gaps) the occupied bins of each column of bins
    form runs along z; a ray's label is the index of its run. A column is *consistent* when it
    and its neighbours on each side have the same number of runs and run ``k`` of each overlaps
    run ``k`` of the next; rays of inconsistent columns (where a lobe starts or ends, where
    runs merge) are flagged for exact rasterisation.

    Returns:
        labels: run index per ray.
        hard: True for rays to rasterise exactly.
    """
    bo = np.floor(slope_o / bin_size).astype(np.int64)
    bz = np.floor(slope_z / bin_size).astype(np.int64)
    bo -= bo.min() - _GAP_BINS - 1
    bz -= bz.min() - _GAP_BINS - 1
    occ = np.zeros((bz.max() + _GAP_BINS + 2, bo.max() + _GAP_BINS + 2), dtype=bool)
    occ[bz, bo] = True
    occ = ndimage.binary_closing(occ, np.ones(_BRIDGE, dtype=bool))
    starts = occ[1:] & ~occ[:-1]
    run_index = np.cumsum(np.vstack([occ[:1], starts]), axis=0) - 1
    n_runs = run_index[-1] + 1
    labels = run_index[bz, bo]
    # run k of column c overlaps run k of column c+1 iff some z row holds run k in both
    same = occ[:, :-1] & occ[:, 1:] & (run_index[:, :-1] == run_index[:, 1:])
    overlaps = np.zeros(occ.shape[1] - 1, dtype=np.int64)
    for k in range(int(n_runs.max())):
        overlaps += (same & (run_index[:, :-1] == k)).any(axis=0)
    joined = (n_runs[:-1] == n_runs[1:]) & (overlaps == n_runs[:-1])
    joined |= (n_runs[:-1] == 0) & (n_runs[1:] == 0)
    ok = np.ones(occ.shape[1], dtype=bool)  # consistent: joined to both neighbours
    ok[:-1] &= joined
    ok[1:] &= joined
    return labels, ~ok[bo]


_RAY_CHUNK = 128  # rays rasterised together: keeps the (rays x slices) temporaries in cache


def words_per_column(n_z: int) -> int:
    """64-bit words that hold one column of ``n_z`` voxels as bits (see :meth:`BeamMarks.bits`)."""
    return max((n_z + 63) // 64, 1)


LOW_BITS = np.array([(1 << n) - 1 for n in range(65)], dtype=np.uint64)  # n lowest bits set


def _rasterise(delta: np.ndarray, length: np.ndarray, source: np.ndarray,
               shape: tuple[int, int, int], major: int, sign: float) -> np.ndarray:
    """Flat indices, in the z-last layout ``(Y, X, 64 * words)``, of the in-grid samples of rays
    sharing one major axis and direction (repeats kept)."""
    z_pad = 64 * words_per_column(shape[0])
    stride = {0: 1, 1: shape[2] * z_pad, 2: z_pad}  # flat = (y * X + x) * z_pad + z
    k = (np.arange(shape[major], dtype=np.float64) - source[major]) * sign
    along = np.nonzero(k >= 0)[0]
    if len(along) == 0:
        return np.zeros(0, dtype=np.int64)
    k = k[along]
    base = (along * stride[major]).astype(np.float64)
    others = [a for a in range(3) if a != major]
    slopes = [delta[:, a] / length for a in others]
    # a ray keeps every sample when it reaches the last slice and both its ends are in the grid
    # (rint is monotone along a ray)
    whole = length >= k.max()
    for a, slope in zip(others, slopes):
        for kk in (k.min(), k.max()):
            end = np.rint(kk * slope + source[a])
            whole &= (end >= 0) & (end < shape[a])
    out = []
    for rays, checked in ((np.nonzero(whole)[0], False), (np.nonzero(~whole)[0], True)):
        for lo in range(0, len(rays), _RAY_CHUNK):
            part = rays[lo: lo + _RAY_CHUNK]
            flat = None
            valid = k[None, :] <= length[part, None] if checked else None
            for a, slope in zip(others, slopes):
                c = np.multiply.outer(slope[part], k)
                c += source[a]
                np.rint(c, out=c)
                if valid is not None:
                    valid &= (c >= 0) & (c < shape[a])
                if a != 0:
                    c *= stride[a]
                flat = c if flat is None else np.add(flat, c, out=flat)
            flat += base
            out.append((flat.ravel() if valid is None else flat[valid]).astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class BeamMarks:
    """The reference's marked voxels for one source: z-intervals per column plus exact points.

    Attributes:
        intervals: ``(ys, xs, z_lo, z_hi)``, one per group of rays sharing a major axis: the
            inclusive marked z range of each column of the box ``[ys, xs]`` (``z_lo > z_hi``:
            none; columns outside the box: none).
        points: flat indices of the voxels marked sample by sample, in the z-last layout
            ``(Y, X, 64 * words_per_column(Z))`` (repeats allowed).
    """

    def __init__(self, shape: tuple[int, int, int], surface: np.ndarray, source: np.ndarray):
        self.shape = shape
        self.intervals: list[tuple[slice, slice, np.ndarray, np.ndarray]] = []
        points = []
        self.points = np.zeros(0, dtype=np.int64)
        if len(surface) == 0:
            return
        delta, length = ray_ends(surface, source, shape)
        delta = delta[length > 0]
        # rays with the same truncated end point are the same ray: keep one of each (the work
        # below is on one contiguous array per axis: much faster than on (n, 3) columns)
        ends = [delta[:, k] for k in range(3)]
        low = [e.min() for e in ends]
        span = [e.max() - lo + 1 for e, lo in zip(ends, low)]
        keys = np.unique(((ends[0] - low[0]) * span[1] + (ends[1] - low[1])) * span[2]
                         + (ends[2] - low[2]))  # exact integers
        keys, ends[2] = np.divmod(keys, span[2])
        ends[0], ends[1] = np.divmod(keys, span[1])
        ends = [e + lo for e, lo in zip(ends, low)]
        size = [np.abs(e) for e in ends]
        length = np.maximum(np.maximum(size[0], size[1]), size[2])
        # the first axis reaching the length is the major (stepping) axis
        major = np.where(size[0] >= length, 0, np.where(size[1] >= length, 1, 2))
        group = 2 * major + (np.choose(major, ends) > 0)  # (major axis, direction)
        counts = np.bincount(group, minlength=6)
        for ax in range(3):
            for sg in (-1.0, 1.0):
                if not counts[2 * ax + (sg > 0)]:
                    continue
                sel = np.nonzero(group == 2 * ax + (sg > 0))[0]
                if ax == 0:  # only for non-coplanar sources: no column structure along z
                    points.append(self._exact(ends, length, sel, source, ax, sg))
                    continue
                other = 3 - ax
                k = (np.arange(shape[ax], dtype=np.float64) - source[ax]) * sg
                rows = np.nonzero(k > 0)[0]
                if len(rows) == 0:
                    continue
                kk = k[rows]
                s_o, s_z = ends[other][sel] / length[sel], ends[0][sel] / length[sel]
                labels, hard = _label_rays(s_o, s_z, 1.0 / kk.min())
                if hard.any():
                    points.append(self._exact(ends, length, sel[hard], source, ax, sg))
                for label in range(int(labels.max()) + 1):
                    one = ~hard & (labels == label)
                    if one.any():
                        self._hull(s_o[one], s_z[one], source, ax, other, rows, kk)
        if points:
            self.points = np.concatenate(points)

    def _exact(self, ends: list[np.ndarray], length: np.ndarray, rays: np.ndarray,
               source: np.ndarray, ax: int, sign: float) -> np.ndarray:
        delta = np.stack([e[rays] for e in ends], axis=1)
        return _rasterise(delta, length[rays], source, self.shape, ax, sign)

    def _hull(self, s_o: np.ndarray, s_z: np.ndarray, source: np.ndarray, ax: int, other: int,
              rows: np.ndarray, kk: np.ndarray) -> None:
        order = np.argsort(s_o)  # ties need no order: a column takes all of them or none
        s_o, s_z = s_o[order], s_z[order]
        # only the columns the rays can round into (a margin of one against round-off)
        o_lo = int(np.floor(np.min(kk * s_o[0]) + source[other] + 0.5)) - 1
        o_hi = int(np.floor(np.max(kk * s_o[-1]) + source[other] + 0.5)) + 2
        o_lo, o_hi = max(o_lo, 0), min(o_hi, self.shape[other])
        if o_hi <= o_lo:
            return
        n_o = o_hi - o_lo
        edges = ((np.arange(o_lo, o_hi + 1) - 0.5 - source[other])[None, :]) / kk[:, None]
        idx = np.searchsorted(s_o, edges.ravel()).reshape(edges.shape)
        zmin, zmax, nonempty = _range_min_max(s_z, idx[:, :-1].ravel(), idx[:, 1:].ravel())
        shape2 = (len(kk), n_o)
        lo = np.rint(kk[:, None] * zmin.reshape(shape2) + source[0])
        hi = np.rint(kk[:, None] * zmax.reshape(shape2) + source[0])
        nonempty = nonempty.reshape(shape2)
        z_lo = np.where(nonempty, np.clip(lo, 0, self.shape[0]), self.shape[0]).astype(np.int32)
        z_hi = np.where(nonempty, np.clip(hi, -1, self.shape[0] - 1), -1).astype(np.int32)
        along = slice(int(rows[0]), int(rows[-1]) + 1)  # rows: a run of slices (k > 0)
        across = slice(o_lo, o_hi)
        if ax == 1:
            self.intervals.append((along, across, z_lo, z_hi))
        else:
            self.intervals.append((across, along, z_lo.T, z_hi.T))

    def bits(self) -> np.ndarray:
        """The marks packed along z: ``(Y, X, words)`` uint64, voxel ``z`` of a column is bit
        ``z % 64`` of its word ``z // 64`` (bits past the grid are 0)."""
        z_n, y_n, x_n = self.shape
        n_words = words_per_column(z_n)
        if len(self.points):
            scratch = np.zeros((y_n, x_n, 64 * n_words), dtype=bool)
            scratch.reshape(-1)[self.points] = True
            words = np.packbits(scratch, axis=2, bitorder="little").view(np.dtype("<u8"))
        else:
            words = np.zeros((y_n, x_n, n_words), dtype=np.dtype("<u8"))
        for ys, xs, z_lo, z_hi in self.intervals:
            for w in range(n_words):
                lo = np.clip(z_lo - 64 * w, 0, 64)
                hi = np.clip(z_hi + 1 - 64 * w, 0, 64)
                words[ys, xs, w] |= LOW_BITS[hi] & ~LOW_BITS[lo]
        return words
