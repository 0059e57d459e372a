"""Synthetic head-and-neck-like patients with exact ground truth, written as real DICOM.

A phantom is built from analytic primitives (ellipsoids and elliptic cylinders along z) scaled to
the grid's field of view, so the same anatomy fits a 24-slice test grid and a 150 x 512 x 512
benchmark CT:

* body (external), a vertebra (bone ring around the spinal canal: a structure with a hole), the
  spinal cord in the canal, an air-filled trachea (air cavity), oesophagus, larynx, brainstem
  and both parotids;
* PTV70 (primary target) and PTV56 (bilateral nodes: two islands on each slice);
* a plan with equally spaced static beams or two VMAT arcs, isocentre at the PTV70 centre;
* optionally a smooth synthetic dose (not a physics dose: a blurred prescription map).

A structure is the even-odd combination (XOR) of its primitives, which is exactly what its
RTSTRUCT contours say, so the ground-truth mask (voxel centres inside) and the contours agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from engine.case import (
    Beam,
    Case,
    Geometry,
    PatientPosition,
    Plan,
    Role,
    Structure,
    Technique,
    Volume,
)
from engine.geometry import grid_around
from engine.io.dicom_export import WrittenCase, write_case_dicom


@dataclass(frozen=True)
class PhantomSpec:
    """What phantom to make.

    Attributes:
        shape: CT size (slices, rows, columns); rows and columns may differ.
        spacing: voxel size (z, y, x) in mm.
        patient_position: HFS, HFP, FFS or FFP (the CT is written in that orientation).
        arc: two VMAT arcs instead of static beams.
        n_beams: number of equally spaced static beams.
        arc_step_deg: control-point spacing of the arcs.
        extra_oars: additional small organs (e.g. to reach 30 ROIs for a benchmark).
        with_dose: add a synthetic reference dose.
        noise_hu: standard deviation of the CT noise.
        seed: random seed of the noise.
        name: patient name and ID.
    """

    shape: tuple[int, int, int] = (32, 72, 88)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    patient_position: str = "HFS"
    arc: bool = False
    n_beams: int = 7
    arc_step_deg: float = 4.0
    extra_oars: int = 0
    with_dose: bool = False
    noise_hu: float = 8.0
    seed: int = 0
    name: str = "PHANTOM"


@dataclass(frozen=True)
class Primitive:
    """An ellipsoid (``z_half`` finite, ``cylinder`` False) or an elliptic cylinder along z
    between ``center[2] - z_half`` and ``center[2] + z_half``; LPS mm."""

    center: tuple[float, float, float]
    radii_xy: tuple[float, float]
    z_half: float
    cylinder: bool = False

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Which points are inside; ``x``, ``y``, ``z`` (mm) broadcast against each other."""
        u = (x - self.center[0]) / self.radii_xy[0]
        v = (y - self.center[1]) / self.radii_xy[1]
        w = (z - self.center[2]) / self.z_half
        if self.cylinder:
            return (u * u + v * v <= 1.0) & (np.abs(w) <= 1.0)
        return u * u + v * v + w * w <= 1.0

    def section(self, z: float, step_mm: float) -> np.ndarray | None:
        """The closed polygon (N, 3) where the plane at ``z`` cuts the primitive, or None."""
        w = (z - self.center[2]) / self.z_half
        if abs(w) > 1.0:
            return None
        scale = 1.0 if self.cylinder else math.sqrt(max(1.0 - w * w, 0.0))
        rx, ry = self.radii_xy[0] * scale, self.radii_xy[1] * scale
        if min(rx, ry) < 1e-6:
            return None
        perimeter = 2 * math.pi * math.sqrt((rx * rx + ry * ry) / 2)
        n = int(np.clip(math.ceil(perimeter / step_mm), 64, 720))
        # radii scaled so that the polygon's area equals the ellipse's
        area_scale = math.sqrt((2 * math.pi / n) / math.sin(2 * math.pi / n))
        rx, ry = rx * area_scale, ry * area_scale
        t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
        return np.column_stack([self.center[0] + rx * np.cos(t), self.center[1] + ry * np.sin(t),
                                np.full(n, z)])


@dataclass(frozen=True)
class Organ:
    name: str
    role: Role
    parts: tuple[Primitive, ...]
    hu: float | None = None
    prescription_gy: float | None = None
    color: tuple[int, int, int] | None = None


def _anatomy(g: Geometry, spec: PhantomSpec) -> list[Organ]:
    nz, ny, nx = g.shape
    dz, dy, dx = g.spacing
    a, b = 0.42 * nx * dx, 0.40 * ny * dy  # body semi-axes (x, y)
    c = 0.5 * nz * dz  # half the scanned length
    m = min(a, b)
    zc = float(g.index_to_lps([(nz - 1) / 2.0, 0, 0])[2])
    long = 4 * c  # cylinders longer than the scan

    def cyl(x: float, y: float, rx: float, ry: float, z0: float = 0.0, half: float = long):
        return Primitive((x, y, zc + z0 * c), (rx, ry), half, cylinder=True)

    def ell(x: float, y: float, z: float, rx: float, ry: float, rz: float):
        return Primitive((x * a, y * b, zc + z * c), (rx * a, ry * b), rz * c)

    organs = [
        Organ("BODY", Role.EXTERNAL, (cyl(0, 0, a, b),), hu=30.0, color=(0, 180, 80)),
        Organ("Vertebra", Role.OTHER, (cyl(0, 0.55 * b, 0.16 * m, 0.16 * m),
                                       cyl(0, 0.55 * b, 0.07 * m, 0.07 * m)),
              hu=700.0, color=(230, 230, 200)),
        Organ("SpinalCord", Role.OAR, (cyl(0, 0.55 * b, 0.045 * m, 0.045 * m),), hu=35.0,
              color=(255, 255, 0)),
        Organ("Trachea", Role.OTHER, (cyl(0, -0.25 * b, 0.08 * m, 0.07 * m),), hu=-1000.0,
              color=(120, 200, 255)),
        Organ("Esophagus", Role.OAR, (cyl(0, 0.3 * b, 0.05 * m, 0.04 * m, z0=-1.35,
                                          half=1.65 * c),), hu=40.0, color=(200, 120, 80)),
        Organ("Larynx", Role.OAR, (ell(0, -0.45, -0.4, 0.12, 0.1, 0.25),), hu=20.0,
              color=(0, 200, 200)),
        Organ("Brainstem", Role.OAR, (ell(0, 0.35, 0.85, 0.1, 0.1, 0.25),), hu=38.0,
              color=(180, 80, 200)),
        Organ("Parotid_L", Role.OAR, (ell(0.55, 0.1, 0.3, 0.15, 0.2, 0.35),), hu=10.0,
              color=(0, 120, 255)),
        Organ("Parotid_R", Role.OAR, (ell(-0.55, 0.1, 0.3, 0.15, 0.2, 0.35),), hu=10.0,
              color=(0, 80, 200)),
        Organ("PTV70", Role.TARGET, (ell(-0.35, -0.2, 0.05, 0.17, 0.17, 0.35),),
              prescription_gy=70.0, color=(255, 0, 0)),
        Organ("PTV56", Role.TARGET, (ell(0.45, 0.0, -0.45, 0.12, 0.14, 0.3),
                                     ell(-0.45, 0.0, -0.45, 0.12, 0.14, 0.3)),
              prescription_gy=56.0, color=(255, 140, 0)),
    ]
    for i in range(spec.extra_oars):
        t = 2 * math.pi * i / max(spec.extra_oars, 1)
        z = -0.7 + 1.4 * ((i * 0.618) % 1.0)
        organs.append(Organ(f"Organ_{i + 1:02d}", Role.OAR,
                            (ell(0.72 * math.cos(t), 0.72 * math.sin(t), z, 0.08, 0.08, 0.2),),
                            color=(100 + (37 * i) % 156, 100, 200 - (23 * i) % 100)))
    return organs


def _beams(iso: tuple[float, float, float], spec: PhantomSpec) -> tuple[Beam, ...]:
    if spec.arc:
        step = spec.arc_step_deg
        cw = np.arange(181.0, 181.0 + 358.0 + 1e-6, step) % 360.0
        return (Beam("Arc1", cw[0], iso, technique=Technique.ARC,
                     control_point_gantry_deg=tuple(cw), number=1),
                Beam("Arc2", cw[-1], iso, technique=Technique.ARC,
                     control_point_gantry_deg=tuple(cw[::-1]), number=2, collimator_deg=90.0))
    return tuple(Beam(f"B{i + 1:02d}", round(360.0 * i / spec.n_beams, 1), iso, number=i + 1)
                 for i in range(spec.n_beams))


def make_phantom(spec: PhantomSpec = PhantomSpec()) -> Case:
    """The phantom as a :class:`Case` (masks = exact ground truth, contours = its polygons)."""
    g = grid_around((0.0, 0.0, 0.0), spec.shape, spec.spacing)
    zs, ys, xs = g.axis_coordinates()
    x, y, z = xs[None, None, :], ys[None, :, None], zs[:, None, None]
    organs = _anatomy(g, spec)
    rng = np.random.default_rng(spec.seed)
    ct = np.full(g.shape, -1000.0, dtype=np.float32)
    step = 0.5 * min(g.spacing[1:])  # polygon edges of half a voxel
    structures = []
    for number, organ in enumerate(organs, start=1):
        mask = np.zeros(g.shape, dtype=bool)
        for part in organ.parts:
            mask ^= part.inside(x, y, z)
        if organ.hu is not None:
            ct[mask] = organ.hu
        contours = tuple(poly for zk in zs for part in organ.parts
                         if (poly := part.section(float(zk), step)) is not None)
        if mask.any():
            structures.append(Structure(organ.name, organ.role, mask, organ.prescription_gy,
                                        organ.color, number, contours))
    body = structures[0].mask
    ct[body] += rng.normal(0.0, spec.noise_hu, size=int(body.sum())).astype(np.float32)
    ptv = next(s for s in structures if s.name == "PTV70")
    iso = tuple(float(v) for v in g.index_to_lps(np.argwhere(ptv.mask).mean(axis=0)))
    plan = Plan(beams=_beams(iso, spec), fractions=35, prescription_gy=70.0,
                patient_position=PatientPosition(spec.patient_position), name="PhantomPlan")
    dose = None
    if spec.with_dose:
        rx = np.zeros(g.shape, dtype=np.float32)
        for s in structures:
            if s.prescription_gy:
                rx = np.maximum(rx, np.where(s.mask, s.prescription_gy, 0.0))
        sigma = [6.0 / sp for sp in g.spacing]
        blurred = gaussian_filter(rx, sigma) / np.maximum(
            gaussian_filter((rx > 0).astype(np.float32), sigma), 0.2)
        dose = Volume((np.where(body, np.minimum(blurred, 1.07 * 70.0), 0.0)).astype(
            np.float32), g)
    return Case(name=spec.name, ct=Volume(ct, g), structures=tuple(structures), plan=plan,
                dose=dose)


def write_phantom(out_dir: str | Path, spec: PhantomSpec = PhantomSpec(),
                  contour_image_refs: bool = True) -> WrittenCase:
    """Make the phantom and write it as DICOM (CT series, RTSTRUCT, RTPLAN, RTDOSE if any)."""
    return write_case_dicom(make_phantom(spec), out_dir, spec.patient_position,
                            contour_image_refs=contour_image_refs)


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.phantom OUT_DIR [options]``: write a phantom patient as DICOM."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m engine.phantom",
                                description="Write a synthetic phantom patient as DICOM.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   default=PhantomSpec.shape)
    p.add_argument("--spacing", type=float, nargs=3, metavar=("DZ", "DY", "DX"),
                   default=PhantomSpec.spacing)
    p.add_argument("--position", default="HFS", choices=["HFS", "HFP", "FFS", "FFP"])
    p.add_argument("--arc", action="store_true", help="two VMAT arcs instead of static beams")
    p.add_argument("--beams", type=int, default=PhantomSpec.n_beams)
    p.add_argument("--extra-oars", type=int, default=0)
    p.add_argument("--dose", action="store_true", help="add a synthetic reference dose")
    p.add_argument("--name", default=PhantomSpec.name)
    args = p.parse_args(argv)
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        p.error(f"{args.out_dir} is not empty")
    spec = PhantomSpec(shape=tuple(args.shape), spacing=tuple(args.spacing),
                       patient_position=args.position, arc=args.arc, n_beams=args.beams,
                       extra_oars=args.extra_oars, with_dose=args.dose, name=args.name)
    written = write_phantom(args.out_dir, spec)
    print(f"wrote {len(written.ct_paths)} CT slices, RTSTRUCT ({len(written.case.structures)} "
          f"ROIs), RTPLAN{', RTDOSE' if written.rtdose_path else ''} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
