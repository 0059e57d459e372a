"""The in-memory patient: CT volume with its geometry, structures, plan and reference dose.

Conventions (DESIGN §2):

* Patient coordinates are DICOM LPS in millimetres, written ``(x, y, z)``.
* Volumes are numpy arrays indexed ``[z, y, x]`` (slice, row, column). Their :class:`Geometry`
  gives ``origin`` (LPS position of the centre of voxel ``[0, 0, 0]``), ``spacing`` in array
  order ``(z, y, x)`` and ``direction``: ``direction[k]`` is the LPS unit vector along array
  axis ``k`` (0 = slice, 1 = row, 2 = column). For an axial head-first-supine CT this is
  ``((0, 0, 1), (0, 1, 0), (1, 0, 0))``.
* Dose in Gy (float32), angles in degrees (IEC 61217), lengths in mm.

Every value here is immutable: arrays are made read-only and editing a beam makes a new
:class:`Plan` (``plan.with_gantry(...)``). That is what lets the engine cache work by content.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

AXIAL_DIRECTION: tuple[tuple[float, float, float], ...] = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0),
                                                           (1.0, 0.0, 0.0))


def _frozen(array: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
    """Return ``array`` (converted to ``dtype``) as a read-only C-contiguous array."""
    out = np.ascontiguousarray(array, dtype=dtype)
    if out is array and array.flags.writeable:
        out = out.copy()
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class Geometry:
    """Where a ``[z, y, x]`` array lies in patient (LPS, mm) space.

    Attributes:
        shape: array shape ``(nz, ny, nx)``.
        origin: LPS position (x, y, z) in mm of the centre of voxel ``[0, 0, 0]``.
        spacing: voxel size in mm along the array axes ``(z, y, x)``.
        direction: ``direction[k]`` = LPS unit vector of array axis ``k``.
    """

    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...] = AXIAL_DIRECTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "direction",
                           tuple(tuple(float(v) for v in row) for row in self.direction))
        if len(self.shape) != 3 or len(self.origin) != 3 or len(self.spacing) != 3:
            raise ValueError("Geometry needs 3-D shape, origin and spacing")
        if min(self.spacing) <= 0:
            raise ValueError(f"voxel spacing must be positive, got {self.spacing} mm")
        d = np.asarray(self.direction)
        if d.shape != (3, 3) or not np.allclose(d @ d.T, np.eye(3), atol=1e-4):
            raise ValueError(f"direction must be 3 orthonormal axis vectors, got {self.direction}")

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix: homogeneous indices ``(k, j, i, 1)`` ([z, y, x]) to LPS ``(x, y, z, 1)``."""
        m = np.eye(4)
        m[:3, :3] = (np.asarray(self.direction) * np.asarray(self.spacing)[:, None]).T
        m[:3, 3] = self.origin
        return m

    @property
    def voxel_volume_cc(self) -> float:
        """Volume of one voxel in cm³."""
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_lps(self, index: np.ndarray | Sequence[float]) -> np.ndarray:
        """Map (fractional) indices ``[..., (k, j, i)]`` to LPS points ``[..., (x, y, z)]`` mm."""
        idx = np.asarray(index, dtype=np.float64)
        a = self.affine
        return idx @ a[:3, :3].T + a[:3, 3]

    def lps_to_index(self, points: np.ndarray | Sequence[float]) -> np.ndarray:
        """Map LPS points ``[..., (x, y, z)]`` mm to fractional indices ``[..., (k, j, i)]``."""
        p = np.asarray(points, dtype=np.float64)
        a = self.affine
        return (p - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T

    def axis_coordinates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LPS coordinates of voxel centres along each array axis, for axis-aligned grids.

        Returns ``(z, y, x)`` 1-D arrays in mm; raises if the grid is not axis aligned.
        """
        d = np.abs(np.asarray(self.direction))
        if not np.allclose(d, np.asarray(AXIAL_DIRECTION)):
            raise ValueError("axis_coordinates() needs an axial, axis-aligned grid")
        sign = np.sign(np.asarray(self.direction)).sum(axis=1)
        out = []
        for k, lps_axis in zip(range(3), (2, 1, 0)):
            n = self.shape[k]
            out.append(self.origin[lps_axis] + sign[k] * self.spacing[k] * np.arange(n))
        return out[0], out[1], out[2]


@dataclass(frozen=True)
class Volume:
    """A ``[z, y, x]`` array with its geometry. The array is read-only."""

    array: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        object.__setattr__(self, "array", _frozen(self.array))
        if tuple(self.array.shape) != self.geometry.shape:
            raise ValueError(f"array shape {self.array.shape} != geometry shape "
                             f"{self.geometry.shape}")

    def content_hash(self) -> str:
        return content_hash(self.array, self.geometry)


class Role(str, enum.Enum):
    """What a structure is for in planning."""

    TARGET = "target"
    OAR = "oar"
    EXTERNAL = "external"
    OTHER = "other"


@dataclass(frozen=True)
class Structure:
    """One ROI as a boolean mask on the CT grid.

    Attributes:
        name: the ROI name as the clinic wrote it.
        role: target, organ at risk, body/external or other (support, markers, ...).
        mask: bool ``[z, y, x]`` array on the CT grid (read-only).
        prescription_gy: prescribed dose for targets, in Gy; None otherwise.
        color: display colour (r, g, b) 0..255, or None.
        number: the ROI number in its RTSTRUCT (0 when not from DICOM).
        contours: the source polygons when known (from an RTSTRUCT), each an ``(N, 3)`` array of
            LPS points in mm on one slice; lets metrics weight boundary voxels by partial volume.
    """

    name: str
    role: Role
    mask: np.ndarray
    prescription_gy: float | None = None
    color: tuple[int, int, int] | None = None
    number: int = 0
    contours: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", _frozen(self.mask, dtype=bool))
        object.__setattr__(self, "contours",
                           tuple(_frozen(c, dtype=np.float64) for c in self.contours))
        object.__setattr__(self, "role", Role(self.role))

    def volume_cc(self, geometry: Geometry) -> float:
        return float(np.count_nonzero(self.mask)) * geometry.voxel_volume_cc


@dataclass(frozen=True)
class StructureNotOnCt:
    """A ROI of the structure set that has no mask on the CT: listed, never used as a mask.

    Attributes:
        name, role, number, color: as for :class:`Structure`.
        reason: why it has no mask, for the user (e.g. "its contours lie outside the CT").
    """

    name: str
    role: Role
    number: int
    reason: str
    color: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))


class Technique(str, enum.Enum):
    STATIC = "static"
    ARC = "arc"


@dataclass(frozen=True)
class Beam:
    """One treatment beam (IEC 61217 angles in degrees, positions in LPS mm).

    A static beam has one ``gantry_deg``. An arc (VMAT) has its control-point gantry angles in
    delivery order in ``control_point_gantry_deg`` and ``gantry_deg`` equal to the first of them.
    """

    name: str
    gantry_deg: float
    isocenter_mm: tuple[float, float, float]
    couch_deg: float = 0.0
    collimator_deg: float = 0.0
    technique: Technique = Technique.STATIC
    control_point_gantry_deg: tuple[float, ...] = ()
    sad_mm: float = 1000.0
    energy_mv: float = 6.0
    number: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "technique", Technique(self.technique))
        object.__setattr__(self, "gantry_deg", float(self.gantry_deg) % 360.0)
        object.__setattr__(self, "isocenter_mm", tuple(float(v) for v in self.isocenter_mm))
        object.__setattr__(self, "control_point_gantry_deg",
                           tuple(float(a) % 360.0 for a in self.control_point_gantry_deg))
        if self.technique is Technique.ARC and len(self.control_point_gantry_deg) < 2:
            raise ValueError(f"arc beam {self.name!r} needs at least two control-point angles")

    @property
    def gantry_angles_deg(self) -> tuple[float, ...]:
        """Angles the beam is delivered from: its one angle, or an arc's control points."""
        if self.technique is Technique.ARC:
            return self.control_point_gantry_deg
        return (self.gantry_deg,)

    def rotated(self, delta_deg: float) -> Beam:
        """This beam with every gantry angle turned by ``delta_deg`` degrees."""
        return dataclasses.replace(
            self, gantry_deg=self.gantry_deg + delta_deg,
            control_point_gantry_deg=tuple(a + delta_deg for a in self.control_point_gantry_deg))


class PatientPosition(str, enum.Enum):
    HFS = "HFS"
    HFP = "HFP"
    FFS = "FFS"
    FFP = "FFP"
    HFDL = "HFDL"
    HFDR = "HFDR"
    FFDL = "FFDL"
    FFDR = "FFDR"


@dataclass(frozen=True)
class Plan:
    """A treatment plan: beams plus prescription.

    Attributes:
        beams: the treatment beams.
        fractions: number of fractions planned.
        prescription_gy: total prescribed dose to the primary target, Gy (None if unknown).
        patient_position: how the patient lies on the couch (for gantry geometry).
        name: the plan label.
    """

    beams: tuple[Beam, ...]
    fractions: int = 1
    prescription_gy: float | None = None
    patient_position: PatientPosition = PatientPosition.HFS
    name: str = "Plan"

    def __post_init__(self) -> None:
        object.__setattr__(self, "beams", tuple(self.beams))
        object.__setattr__(self, "patient_position", PatientPosition(self.patient_position))

    @property
    def isocenter_mm(self) -> tuple[float, float, float]:
        """The first beam's isocentre (LPS mm); plans here share one isocentre."""
        if not self.beams:
            raise ValueError(f"plan {self.name!r} has no beams")
        return self.beams[0].isocenter_mm

    def with_gantry(self, beam_index: int, gantry_deg: float) -> Plan:
        """A new plan with beam ``beam_index`` turned to ``gantry_deg`` (an arc keeps its span)."""
        beam = self.beams[beam_index]
        new = beam.rotated(gantry_deg - beam.gantry_deg)
        beams = self.beams[:beam_index] + (new,) + self.beams[beam_index + 1:]
        return dataclasses.replace(self, beams=beams)

    def with_beams(self, beams: Sequence[Beam]) -> Plan:
        return dataclasses.replace(self, beams=tuple(beams))


@dataclass(frozen=True)
class DicomRefs:
    """DICOM identifiers that exports link to (empty strings when the case is not from DICOM).

    ``plan_path`` is the source RTPLAN file, re-read (never written) when an edited plan is
    exported as a copy of it.
    """

    patient_id: str = ""
    patient_name: str = ""
    study_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    ct_series_instance_uid: str = ""
    ct_sop_instance_uids: tuple[str, ...] = ()
    structure_set_sop_instance_uid: str = ""
    plan_sop_instance_uid: str = ""
    plan_path: str = ""


@dataclass(frozen=True)
class Case:
    """One patient: CT (HU, float32), structures on the CT grid, plan and optional reference dose.

    ``dose`` is the reference dose resampled onto the CT grid (Gy); ``dose_grid`` the same dose
    on its own grid as the RTDOSE holds it (None when the case did not come with one), which
    still shows the whole dose when the dose reaches beyond the CT. ``structures_not_on_ct``
    lists the structure set's ROIs that have no mask on the CT (their contours lie outside it,
    they have none, ...), so that a listing can show every ROI; only ``structures`` are masks.
    ``warnings`` collects everything the importer had to skip or guess, for the user to read;
    ``study_warnings`` are those of them about the study as a whole (an incomplete CT series, a
    structure set or dose that belongs to another CT), which a planner must see before trusting
    anything shown.
    """

    name: str
    ct: Volume
    structures: tuple[Structure, ...] = ()
    plan: Plan | None = None
    dose: Volume | None = None
    refs: DicomRefs = field(default_factory=DicomRefs)
    warnings: tuple[str, ...] = ()
    structures_not_on_ct: tuple[StructureNotOnCt, ...] = ()
    dose_grid: Volume | None = None
    study_warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "structures", tuple(self.structures))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        object.__setattr__(self, "structures_not_on_ct", tuple(self.structures_not_on_ct))
        object.__setattr__(self, "study_warnings", tuple(self.study_warnings))
        if not set(self.study_warnings) <= set(self.warnings):
            raise ValueError("every study warning must also be one of the case's warnings")
        for s in self.structures:
            if s.mask.shape != self.ct.geometry.shape:
                raise ValueError(f"structure {s.name!r} mask {s.mask.shape} is not on the CT grid "
                                 f"{self.ct.geometry.shape}")
        if self.dose is not None and self.dose.geometry.shape != self.ct.geometry.shape:
            raise ValueError("the reference dose must be resampled onto the CT grid")

    @property
    def geometry(self) -> Geometry:
        return self.ct.geometry

    def structure(self, name: str) -> Structure:
        """The structure called ``name`` (case-insensitive); KeyError naming what exists."""
        for s in self.structures:
            if s.name.lower() == name.lower():
                return s
        raise KeyError(f"no structure {name!r}; the case has "
                       f"{', '.join(s.name for s in self.structures) or 'none'}")

    def by_role(self, role: Role) -> tuple[Structure, ...]:
        return tuple(s for s in self.structures if s.role is Role(role))

    @property
    def targets(self) -> tuple[Structure, ...]:
        return self.by_role(Role.TARGET)

    @property
    def oars(self) -> tuple[Structure, ...]:
        return self.by_role(Role.OAR)

    @property
    def external(self) -> Structure | None:
        ext = self.by_role(Role.EXTERNAL)
        return ext[0] if ext else None

    def with_plan(self, plan: Plan) -> Case:
        return dataclasses.replace(self, plan=plan)

    def with_dose(self, dose: Volume | None) -> Case:
        """This case with another reference dose (on the CT grid); the RTDOSE's own grid,
        which no longer matches it, is dropped."""
        return dataclasses.replace(self, dose=dose, dose_grid=None)


def content_hash(*parts: object) -> str:
    """A stable hex digest of arrays, geometries and plain values (for caches keyed by content)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str((p.dtype.str, p.shape)).encode())
            h.update(np.ascontiguousarray(p).data)
        else:
            h.update(repr(p).encode())
    return h.hexdigest()
