"""The physics plans' photon pencil-beam kernel, for the quick plan to compute doses with.

The physics plans (:mod:`engine.physics.dose_calc`) are computed by pyRadPlan's SVD pencil beam
with matRad's generic 6 MV machine. A bixel of weight ``w`` gives a voxel the dose

    w * (SAD / r)^2 * sum_c D_c(d) * B_c(x, z),
    D_c(d) = beta_c / (beta_c - m) * (exp(-m d) - exp(-beta_c d)),

with ``d`` the voxel's radiological depth (mm), ``r`` its distance from the source, ``(x, z)``
its lateral offset from the bixel's centre projected onto the isocentre plane, and ``B_c`` the
bixel's square convolved with the penumbra's Gaussian and the machine's radial kernel component
``c`` (``c`` = 1..3). This module holds that machine's data
(``resources/physics/photon_kernel_6mv.json``, taken from pyRadPlan's BSD-licensed
``photons_Generic.mat`` at SSD 900 mm, the head-and-neck plans' central-ray SSD within 5 %:
the components' integrals change by 1-3 % between SSD 850 and 950 mm) and tabulates ``B_c``
the way pyRadPlan does (0.5 mm convolution grid, bixel doses cut off 50 mm from the bixel's
centre, pyRadPlan's default lateral cut-off). Its own code, not pyRadPlan's: the quick plan runs in
the planner's environment, where pyRadPlan is not installed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.signal import fftconvolve

from engine.resources import resource_path

RESOLUTION_MM = 0.5
CUTOFF_MM = 50.0


@dataclass(frozen=True)
class PhotonKernel:
    """A photon machine's SVD pencil-beam data (lengths in mm).

    Attributes:
        sad_mm: source-to-axis distance.
        penumbra_fwhm_mm: the penumbra's full width at half maximum at the isocentre.
        m_per_mm: the primary attenuation coefficient ``m``.
        betas_per_mm: ``beta_c`` of the three components.
        radius_mm: the radii the kernels are tabulated at.
        kernels: ``(3, len(radius_mm))`` radial kernel components, per mm^2.
    """

    sad_mm: float
    penumbra_fwhm_mm: float
    m_per_mm: float
    betas_per_mm: tuple[float, float, float]
    radius_mm: np.ndarray
    kernels: np.ndarray


@dataclass(frozen=True)
class BixelResponse:
    """``B_c`` of one bixel size on a square grid centred on the bixel:
    ``tables[i, j, c]`` at lateral offset ``(origin_mm + i * step_mm, origin_mm + j * step_mm)``
    (float32, zero beyond the cut-off)."""

    tables: np.ndarray
    origin_mm: float
    step_mm: float
    _rows: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the table as (n * n + 1, 3) rows, the last one zero: one gather per lookup
        rows = np.concatenate([self.tables.reshape(-1, 3), np.zeros((1, 3), np.float32)])
        object.__setattr__(self, "_rows", rows)

    def at(self, dz_mm: np.ndarray, dv_mm: np.ndarray) -> np.ndarray:
        """``(N, 3)`` responses at lateral offsets (mm) from the bixel's centre (the nearest
        tabulated offset; zero outside the table)."""
        n = self.tables.shape[0]
        iz = np.rint((dz_mm - self.origin_mm) / self.step_mm).astype(np.int64)
        iv = np.rint((dv_mm - self.origin_mm) / self.step_mm).astype(np.int64)
        inside = (iz >= 0) & (iz < n) & (iv >= 0) & (iv < n)
        return self._rows[np.where(inside, iz * n + iv, n * n)]


@lru_cache(maxsize=1)
def photon_kernel() -> PhotonKernel:
    """The shipped 6 MV machine (``resources/physics/photon_kernel_6mv.json``)."""
    data = json.loads(resource_path("physics", "photon_kernel_6mv.json").read_text())
    return PhotonKernel(sad_mm=float(data["sad_mm"]),
                        penumbra_fwhm_mm=float(data["penumbra_fwhm_at_iso_mm"]),
                        m_per_mm=float(data["m_per_mm"]),
                        betas_per_mm=tuple(float(b) for b in data["betas_per_mm"]),
                        radius_mm=np.asarray(data["radius_mm"], np.float64),
                        kernels=np.asarray(data["kernels_per_mm2"], np.float64))


def depth_factors(kernel: PhotonKernel, depth_mm: np.ndarray) -> np.ndarray:
    """``D_c`` at radiological depths (mm; negative counts as 0): ``(N, 3)`` float32."""
    d = np.maximum(np.asarray(depth_mm, np.float64), 0.0)[:, None]
    beta = np.asarray(kernel.betas_per_mm)[None, :]
    m = kernel.m_per_mm
    return (beta / (beta - m) * (np.exp(-m * d) - np.exp(-beta * d))).astype(np.float32)


@lru_cache(maxsize=4)
def bixel_response(bixel_mm: float) -> BixelResponse:
    """``B_c`` of a ``bixel_mm`` square bixel of the shipped machine, as pyRadPlan computes
    it: the bixel's square (cells on its edge half-weighted, so that its area is exact)
    convolved with the penumbra's Gaussian and each kernel component on a 0.5 mm grid (the
    kernels' values at radius 0 are point masses on this grid, as in pyRadPlan), cut off 50 mm
    from the centre."""
    kernel = photon_kernel()
    res = RESOLUTION_MM
    half = math.ceil((CUTOFF_MM + bixel_mm) / res)
    grid = res * np.arange(-half, half + 1)
    x, z = np.meshgrid(grid, grid, indexing="ij")
    r = np.hypot(x, z)
    sigma = kernel.penumbra_fwhm_mm / math.sqrt(8.0 * math.log(2.0))
    gauss = res ** 2 / (2.0 * math.pi * sigma ** 2) * np.exp(-r ** 2 / (2.0 * sigma ** 2))
    edge = np.clip((bixel_mm / 2.0 + res / 2.0 - np.abs(grid)) / res, 0.0, 1.0)
    square = edge[:, None] * edge[None, :]
    field = fftconvolve(square, gauss, mode="same")
    tables = np.stack([fftconvolve(field, res ** 2 * np.interp(r, kernel.radius_mm, k, right=0.0),
                                   mode="same") for k in kernel.kernels])
    tables[:, r > CUTOFF_MM] = 0.0
    return BixelResponse(np.ascontiguousarray(np.moveaxis(tables, 0, -1), np.float32),
                         float(grid[0]), res)
