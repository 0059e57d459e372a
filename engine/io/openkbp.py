"""OpenKBP head-and-neck cases (Babier et al. 2021) as :class:`~engine.case.Case` values.

Two layouts are read:

* the shared compressed ``pt_N.npz`` (``ct`` as HU + 1024, ``dose_cgy``, ``roi_bits``,
  ``roi_names``, ``present``, ``voxel_mm``; see data/openkbp/README.md);
* the original OpenKBP repository layout, one folder per patient with sparse CSV files
  (``ct.csv``, ``dose.csv``, ``possible_dose_mask.csv``, ``voxel_dimensions.csv``,
  ``<ROI>.csv``): a header line ``,data`` then ``flat_index,value`` rows, or ``flat_index,``
  rows for masks; flat indices are C-order into a 128 x 128 x 128 array;
  ``voxel_dimensions.csv`` holds three numbers (in-plane, in-plane, slice) in mm.

**Orientation.** OpenKBP gives no geometry beyond voxel sizes, so the axes were established from
the anatomy of the shared cases (``a[i0, i1, i2]``, checked over all 202 cases in
tests/test_openkbp.py):

* ``i2`` is the slice axis, increasing towards the **feet**: the brainstem has a lower ``i2``
  than the larynx and the oesophagus, the spinal cord runs along it, and its voxel size is the
  slice thickness (``voxel_mm[2]``, 1.5-3.3 mm against 2.7-5.4 mm in plane).
* ``i0`` increases towards the **posterior**: the mandible has a lower ``i0`` than the spinal
  cord and the brainstem in every case.
* ``i1`` increases towards the patient's **left**: the ROI labelled ``LeftParotid`` has a higher
  ``i1`` than ``RightParotid`` in every case where both exist. Nothing in a head-and-neck CT
  tells left from right anatomically, so this rests on the clinical labels (which name the
  patient's side, whatever the display convention) being right.

So ``i0`` is LPS +y (rows), ``i1`` is LPS +x (columns) and ``i2`` is LPS -z. The case's arrays
are ``a.transpose(2, 0, 1)[::-1]``: slices in increasing z (inferior to superior), rows
anterior to posterior, columns right to left, i.e. the standard axial head-first-supine
direction. The grid is centred on LPS (0, 0, 0). Every plan is nine coplanar static 6 MV beams
at 0, 40, ..., 320 degrees, head first supine, 35 fractions, 70 Gy to PTV70 (PTV63 / PTV56 get
63 / 56 Gy), isocentre at the centroid of the union of the PTVs (the isocentre is not shipped).
The body is OpenKBP's possible-dose mask, the voxels inside the patient that can receive dose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.case import Beam, Case, Geometry, Plan, Role, Structure, Volume
from engine.io.plan_beams import plan_from_arrays

OPENKBP_SHAPE = (128, 128, 128)
OPENKBP_ROIS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
                "Mandible", "PTV56", "PTV63", "PTV70")
PRESCRIPTIONS_GY = {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}
GANTRY_ANGLES_DEG = tuple(float(a) for a in range(0, 360, 40))
BODY_NAME = "Body"
_CT_OFFSET = 1024.0  # OpenKBP CT numbers: 0 is air, about HU + 1024


class OpenKBPFormatError(ValueError):
    """An OpenKBP file or folder that cannot be read as a case (the message says why)."""


def to_case_axes(array: np.ndarray) -> np.ndarray:
    """An OpenKBP ``[i0, i1, i2]`` array as ``[z, y, x]`` (see the module docstring)."""
    return np.ascontiguousarray(np.asarray(array).transpose(2, 0, 1)[::-1])


def from_case_axes(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_case_axes`: a case ``[z, y, x]`` array in OpenKBP ``[i0, i1, i2]``."""
    return np.ascontiguousarray(np.asarray(array)[::-1].transpose(1, 2, 0))


def openkbp_geometry(voxel_mm: np.ndarray, shape: tuple[int, int, int] = OPENKBP_SHAPE
                     ) -> Geometry:
    """The case grid: axial HFS directions, spacing (slice, in-plane, in-plane), centred at 0."""
    vm = np.asarray(voxel_mm, dtype=np.float64).ravel()
    if vm.shape != (3,) or not np.all(vm > 0) or not np.all(np.isfinite(vm)):
        raise OpenKBPFormatError(f"voxel dimensions must be three positive numbers, got {vm}")
    spacing = (vm[2], vm[0], vm[1])
    case_shape = (shape[2], shape[0], shape[1])
    half = (np.asarray(case_shape) - 1) / 2.0 * np.asarray(spacing)
    origin = -half[::-1]  # (z, y, x) -> LPS (x, y, z)
    return Geometry(shape=case_shape, origin=tuple(origin), spacing=spacing)


def build_case(name: str, ct: np.ndarray, masks: dict[str, np.ndarray],
               possible_dose_mask: np.ndarray | None, voxel_mm: np.ndarray,
               dose_gy: np.ndarray | None = None) -> Case:
    """A case from OpenKBP arrays in their own ``[i0, i1, i2]`` order.

    Args:
        ct: CT numbers as shipped (HU + 1024).
        masks: ROI name -> boolean mask, for the ROIs present.
        possible_dose_mask: OpenKBP's mask of voxels that can receive dose (the body).
        voxel_mm: the three voxel dimensions as shipped.
        dose_gy: reference dose in Gy, if any.
    """
    shape = tuple(np.shape(ct))
    if len(shape) != 3:
        raise OpenKBPFormatError(f"{name}: CT must be 3-D, got shape {shape}")
    geometry = openkbp_geometry(voxel_mm, shape)
    hu = to_case_axes(np.asarray(ct, dtype=np.float32) - np.float32(_CT_OFFSET))
    structures = []
    for roi in OPENKBP_ROIS:
        if roi not in masks:
            continue
        mask = to_case_axes(np.asarray(masks[roi], dtype=bool))
        role = Role.TARGET if roi in PRESCRIPTIONS_GY else Role.OAR
        structures.append(Structure(name=roi, role=role, mask=mask,
                                    prescription_gy=PRESCRIPTIONS_GY.get(roi),
                                    number=len(structures) + 1))
    warnings = []
    if possible_dose_mask is not None:
        structures.append(Structure(name=BODY_NAME, role=Role.EXTERNAL,
                                    mask=to_case_axes(np.asarray(possible_dose_mask, bool)),
                                    number=len(structures) + 1))
    else:
        warnings.append("no possible-dose mask: the case has no body structure")
    targets = [s for s in structures if s.role is Role.TARGET and s.mask.any()]
    if not targets:
        raise OpenKBPFormatError(f"{name}: no PTV70/PTV63/PTV56 voxels, so no isocentre")
    union = np.logical_or.reduce([t.mask for t in targets])
    iso = tuple(float(v) for v in geometry.index_to_lps(np.argwhere(union).mean(axis=0)))
    beams = tuple(Beam(name=f"G{int(a):03d}", gantry_deg=a, isocenter_mm=iso, number=i + 1)
                  for i, a in enumerate(GANTRY_ANGLES_DEG))
    plan = Plan(beams=beams, fractions=35, prescription_gy=70.0, name="OpenKBP IMRT")
    dose = None
    if dose_gy is not None:
        dose = Volume(to_case_axes(np.asarray(dose_gy, dtype=np.float32)), geometry)
    return Case(name=name, ct=Volume(hu, geometry), structures=tuple(structures), plan=plan,
                dose=dose, warnings=tuple(warnings))


def load_openkbp_npz(path: str | Path) -> Case:
    """One shared ``pt_N.npz`` case (no pickles are loaded)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise OpenKBPFormatError(f"{path}: no such file") from None
    except (ValueError, OSError) as exc:
        raise OpenKBPFormatError(f"{path}: not an OpenKBP npz file ({exc})") from None
    missing = {"ct", "roi_bits", "roi_names", "voxel_mm"} - set(arrays)
    if missing:
        raise OpenKBPFormatError(f"{path}: missing arrays {sorted(missing)}; has "
                                 f"{sorted(arrays)}")
    bits = arrays["roi_bits"]
    names = [str(n) for n in arrays["roi_names"]]
    present = {str(n) for n in arrays.get("present", names)}
    masks = {n: ((bits >> k) & 1).astype(bool) for k, n in enumerate(names) if n in present}
    pdm = ((bits >> 15) & 1).astype(bool)
    dose = arrays["dose_cgy"].astype(np.float32) / 100.0 if "dose_cgy" in arrays else None
    case = build_case(path.stem, arrays["ct"], masks, pdm, arrays["voxel_mm"], dose)
    if "gantry_deg" in arrays:  # a generated physics plan: its own beams, not the nine fields
        case = case.with_plan(plan_from_arrays(arrays, case))
    return case


def _read_sparse_csv(path: Path, values: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Flat indices (and values) of an OpenKBP sparse CSV file."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise OpenKBPFormatError(f"{path}: cannot read ({exc.strerror})") from None
    rows = [ln.split(",") for ln in lines[1:] if ln.strip()]
    if lines and lines[0].replace(" ", "") != ",data":
        raise OpenKBPFormatError(f"{path}: expected the header ',data', got {lines[0]!r}")
    try:
        index = np.array([int(float(r[0])) for r in rows], dtype=np.int64)
        data = (np.array([float(r[1]) for r in rows], dtype=np.float64) if values else None)
    except (ValueError, IndexError):
        raise OpenKBPFormatError(f"{path}: rows must be 'index,value' numbers") from None
    size = int(np.prod(OPENKBP_SHAPE))
    if len(index) and (index.min() < 0 or index.max() >= size):
        raise OpenKBPFormatError(f"{path}: voxel index out of range 0..{size - 1}")
    return index, data


def _dense(index: np.ndarray, data: np.ndarray | None, dtype: type) -> np.ndarray:
    out = np.zeros(int(np.prod(OPENKBP_SHAPE)), dtype=dtype)
    out[index] = True if data is None else data
    return out.reshape(OPENKBP_SHAPE)


def load_openkbp_csv(folder: str | Path) -> Case:
    """One patient folder of the original OpenKBP repository (sparse CSV files)."""
    folder = Path(folder)
    if not (folder / "ct.csv").is_file():
        raise OpenKBPFormatError(f"{folder}: not an OpenKBP patient folder (no ct.csv)")
    if not (folder / "voxel_dimensions.csv").is_file():
        raise OpenKBPFormatError(f"{folder}: voxel_dimensions.csv is missing")
    try:
        voxel_mm = np.loadtxt(folder / "voxel_dimensions.csv", dtype=np.float64)
    except ValueError:
        raise OpenKBPFormatError(f"{folder / 'voxel_dimensions.csv'}: expected three numbers"
                                 ) from None
    ct = _dense(*_read_sparse_csv(folder / "ct.csv", values=True), np.float32)
    dose = None
    if (folder / "dose.csv").is_file():
        dose = _dense(*_read_sparse_csv(folder / "dose.csv", values=True), np.float32)
    pdm = None
    if (folder / "possible_dose_mask.csv").is_file():
        pdm = _dense(*_read_sparse_csv(folder / "possible_dose_mask.csv", values=False), bool)
    masks = {roi: _dense(*_read_sparse_csv(folder / f"{roi}.csv", values=False), bool)
             for roi in OPENKBP_ROIS if (folder / f"{roi}.csv").is_file()}
    return build_case(folder.name, ct, masks, pdm, voxel_mm, dose)


def load_openkbp(path: str | Path) -> Case:
    """An OpenKBP case from a ``.npz`` file or a CSV patient folder."""
    path = Path(path)
    if path.is_dir():
        return load_openkbp_csv(path)
    return load_openkbp_npz(path)
