"""Display conventions shared by the views: window/level presets, dose colours, and axis-aligned
slicing of ``[z, y, x]`` volumes in patient millimetres.

Screen orientation (radiological): axial shows patient right on the left of the screen and
anterior up; coronal and sagittal show superior up, sagittal with anterior on the left.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyqtgraph as pg

from engine.case import Geometry

# name -> (window width, level centre) in HU
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "Soft tissue": (400.0, 40.0),
    "Head & neck": (350.0, 60.0),
    "Lung": (1500.0, -600.0),
    "Bone": (1800.0, 400.0),
    "Brain": (80.0, 40.0),
}

ISODOSE_PERCENT = (30.0, 50.0, 80.0, 95.0, 100.0, 107.0)

ORIENTATIONS = ("axial", "coronal", "sagittal")

_DEFAULT_COLORS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                   (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
                   (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40))


def structure_color(index: int, color: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """The structure's own colour, or a distinct default by its index."""
    return tuple(color) if color is not None else _DEFAULT_COLORS[index % len(_DEFAULT_COLORS)]


@functools.lru_cache(maxsize=64)
def isodose_color(fraction: float) -> tuple[int, int, int]:
    """Colour of the isodose line at ``fraction`` of the reference dose (blue -> red)."""
    return tuple(int(c) for c in dose_colormap().map(min(max(fraction / 1.1, 0.0), 1.0),
                                                     mode="byte")[:3])


def dose_colormap(transparent_below: float = 0.0) -> pg.ColorMap:
    """A rainbow dose map over [0, 1]; values below ``transparent_below`` are fully transparent."""
    base = pg.colormap.get("turbo")
    pos = np.linspace(0.0, 1.0, 33)
    colors = base.map(pos, mode="byte").copy()
    colors[pos < transparent_below, 3] = 0
    return pg.ColorMap(pos, colors)


def difference_colormap() -> pg.ColorMap:
    """The diverging map of dose differences ("CET-D1", blue below 0, red above) over [0, 1],
    used with levels symmetric about 0 Gy; values near 0 are transparent."""
    pos = np.linspace(0.0, 1.0, 33)
    colors = pg.colormap.get("CET-D1").map(pos, mode="byte").copy()
    colors[np.abs(pos - 0.5) < 0.04, 3] = 0
    return pg.ColorMap(pos, colors)


@dataclass(frozen=True)
class OrthoGrid:
    """Voxel-centre coordinates (mm, increasing) of an axis-aligned grid, and the flips that
    bring a ``[z, y, x]`` array into that increasing order."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    flip: tuple[bool, bool, bool]

    @classmethod
    def from_geometry(cls, geometry: Geometry) -> OrthoGrid:
        coords = geometry.axis_coordinates()
        flip = tuple(bool(len(c) > 1 and c[1] < c[0]) for c in coords)
        z, y, x = (c[::-1] if f else c for c, f in zip(coords, flip))
        return cls(z=np.asarray(z), y=np.asarray(y), x=np.asarray(x), flip=flip)

    def orient(self, array: np.ndarray) -> np.ndarray:
        """``array`` ([z, y, x]) as a view with all three axes in increasing mm."""
        index = tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        return array[index]

    def axes(self, orientation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(normal axis, horizontal axis, vertical axis) coordinates for a view."""
        if orientation == "axial":
            return self.z, self.x, self.y
        if orientation == "coronal":
            return self.y, self.x, self.z
        if orientation == "sagittal":
            return self.x, self.y, self.z
        raise ValueError(f"unknown orientation {orientation!r}")

    def slice(self, oriented: np.ndarray, orientation: str, index: int) -> np.ndarray:
        """The 2-D slice ``[rows (vertical), columns (horizontal)]`` at ``index`` along the
        view's normal, from an already oriented volume."""
        if orientation == "axial":
            return oriented[index]
        if orientation == "coronal":
            return oriented[:, index, :]
        return oriented[:, :, index]

    def nearest(self, orientation: str, point_mm: tuple[float, float, float]) -> int:
        """Index along the view's normal closest to LPS ``point_mm`` (x, y, z)."""
        normal = self.axes(orientation)[0]
        value = {"axial": point_mm[2], "coronal": point_mm[1], "sagittal": point_mm[0]}[
            orientation]
        return int(np.clip(np.abs(normal - value).argmin(), 0, len(normal) - 1))

    @staticmethod
    def extent(coords: np.ndarray) -> tuple[float, float]:
        """(start, length) in mm covering the voxels centred at ``coords``."""
        step = float(coords[1] - coords[0]) if len(coords) > 1 else 1.0
        return float(coords[0]) - step / 2.0, step * len(coords)


def outline(mask2d: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2-D boolean mask (4-connected)."""
    if not mask2d.any():
        return mask2d
    inner = mask2d.copy()
    inner[1:, :] &= mask2d[:-1, :]
    inner[:-1, :] &= mask2d[1:, :]
    inner[:, 1:] &= mask2d[:, :-1]
    inner[:, :-1] &= mask2d[:, 1:]
    return mask2d & ~inner
