"""GDP-HMM challenge case files (``{PID}+{PlanID}+MOS_{n}.npz``) as :class:`~engine.case.Case`.

A case file holds one pickled dict under ``arr_0`` (notes/gdp-hmm-challenge.md §1.1). It is read
only through :func:`engine.io.safe_unpickle.load_npz_restricted`: numpy arrays and plain values,
nothing that can run code. The keys used:

* ``img`` (CT in HU, ``[z, y, x]``), ``origin``, ``spacing`` and ``direction`` (SimpleITK
  metadata in x, y, z order; when absent, the challenge's (2, 2.5, 2.5) mm grid at the origin);
* one binary mask per structure name, ``Body`` (or ``BODY``) being the external contour;
* ``dose`` times ``dose_scale`` (the reference dose in Gy), when present;
* ``isocenter`` (voxel indices ``[z, y, x]``), ``angle_list`` (degrees), ``isVMAT``.

The patient's metadata come from ``PTV_DICT.json`` (targets and prescriptions: ``OPTName``,
``StructName`` and ``PDose`` per level) and ``Pat_Obj_DICT.json`` (structures used in the
optimisation, which become organs at risk, rings included, as the challenge codes them).
Other masks are kept with the role "other". The files carry no patient position: the plan is
head first supine, the convention the challenge's own beam plates assume. IMRT plans become
one static beam per angle; a VMAT plan becomes one arc whose control points are the angles in
ascending order (``angle_list`` is stored unordered, so the delivery direction is unknown).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.case import Beam, Case, Geometry, Plan, Role, Structure, Technique, Volume
from engine.io.safe_unpickle import load_npz_restricted

CHALLENGE_SPACING = (2.0, 2.5, 2.5)
_NON_MASK_KEYS = {"img", "dose", "dose_scale", "isVMAT", "angle_plate", "isocenter", "angle_list",
                  "origin", "spacing", "direction", "size", "beam_plate", "all_mask"}
_BODY_NAMES = ("Body", "BODY", "External")


class GdpHmmFormatError(ValueError):
    """A GDP-HMM case file or metadata that cannot be read (the message says why)."""


def patient_id(path: str | Path) -> str:
    """The challenge's patient id: the file name up to the first '+'."""
    return Path(path).name.split("+")[0]


def find_metadata(path: Path, meta_dir: str | Path | None) -> Path:
    """The folder holding PTV_DICT.json: ``meta_dir``, else next to the file or in meta_files/."""
    candidates = [Path(meta_dir)] if meta_dir is not None else [
        path.parent, path.parent / "meta_files", path.parent.parent / "meta_files"]
    for c in candidates:
        if (c / "PTV_DICT.json").is_file():
            return c
    raise GdpHmmFormatError(f"{path}: no PTV_DICT.json found in "
                            f"{', '.join(str(c) for c in candidates)}; pass the folder of the "
                            f"challenge's meta files")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise GdpHmmFormatError(f"{path}: not readable JSON ({exc})") from None


def _geometry(data: dict[str, Any], shape: tuple[int, ...], warnings: list[str]) -> Geometry:
    if all(k in data for k in ("origin", "spacing")):
        origin = tuple(float(v) for v in np.ravel(data["origin"]))
        spacing = tuple(float(v) for v in np.ravel(data["spacing"]))[::-1]
        d = np.asarray(data.get("direction", np.eye(3).ravel()), dtype=np.float64).reshape(3, 3)
        direction = tuple(tuple(d[:, c]) for c in (2, 1, 0))
        return Geometry(shape=shape, origin=origin, spacing=spacing, direction=direction)
    warnings.append("no origin/spacing in the file: assumed the challenge grid "
                    "(2, 2.5, 2.5) mm with its first voxel at the origin")
    return Geometry(shape=shape, origin=(0.0, 0.0, 0.0), spacing=CHALLENGE_SPACING)


def _targets(pid: str, ptv_dict: dict[str, Any]) -> dict[str, float]:
    entry = ptv_dict.get(pid)
    if not entry:
        raise GdpHmmFormatError(f"patient {pid!r} is not in PTV_DICT.json: its targets and "
                                f"prescriptions are unknown")
    out: dict[str, float] = {}
    for level in entry.values():
        dose = float(level["PDose"])
        for key in ("OPTName", "StructName"):
            if key in level:
                out[level[key]] = max(dose, out.get(level[key], 0.0))
    return out


def load_gdp_hmm_npz(path: str | Path, meta_dir: str | Path | None = None) -> Case:
    """One GDP-HMM case file with its patient's metadata.

    Raises:
        UnsafePickleError: the file's pickle asks for anything beyond arrays and plain values.
        GdpHmmFormatError: missing keys or metadata.
    """
    path = Path(path)
    meta = find_metadata(path, meta_dir)
    arrays = load_npz_restricted(path)
    if "arr_0" not in arrays or arrays["arr_0"].dtype != object or arrays["arr_0"].ndim != 0:
        raise GdpHmmFormatError(f"{path}: expected one pickled dict under 'arr_0'")
    data = arrays["arr_0"].item()
    if not isinstance(data, dict):
        raise GdpHmmFormatError(f"{path}: 'arr_0' holds a {type(data).__name__}, not a dict")
    missing = {"img", "isocenter", "angle_list"} - set(data)
    if missing:
        raise GdpHmmFormatError(f"{path}: missing keys {sorted(missing)}")
    pid = patient_id(path)
    prescriptions = _targets(pid, _read_json(meta / "PTV_DICT.json"))
    objectives = set(_read_json(meta / "Pat_Obj_DICT.json").get(pid, []))
    warnings: list[str] = []
    img = np.asarray(data["img"], dtype=np.float32)
    if img.ndim != 3:
        raise GdpHmmFormatError(f"{path}: 'img' must be 3-D, got shape {img.shape}")
    geometry = _geometry(data, img.shape, warnings)
    structures = []
    for name, value in data.items():
        if name in _NON_MASK_KEYS or not isinstance(value, np.ndarray) or value.shape != img.shape:
            continue
        if name in prescriptions:
            role, rx = Role.TARGET, prescriptions[name]
        elif name in _BODY_NAMES:
            role, rx = Role.EXTERNAL, None
        elif name in objectives:
            role, rx = Role.OAR, None
        else:
            role, rx = Role.OTHER, None
        structures.append(Structure(name=name, role=role, mask=np.asarray(value) > 0.5,
                                    prescription_gy=rx, number=len(structures) + 1))
    absent = sorted(set(prescriptions) - {s.name for s in structures})
    if len(absent) == len(prescriptions):
        raise GdpHmmFormatError(f"{path}: none of the targets named in PTV_DICT.json "
                                f"({', '.join(sorted(prescriptions))}) is in the file")
    if absent:
        warnings.append(f"targets named in PTV_DICT.json but not in the file: {absent}")
    iso = tuple(float(v) for v in geometry.index_to_lps(np.asarray(data["isocenter"], float)))
    angles = sorted(float(a) % 360.0 for a in np.ravel(np.asarray(data["angle_list"], float)))
    if not angles:
        raise GdpHmmFormatError(f"{path}: empty angle_list")
    if bool(data.get("isVMAT", False)) and len(angles) > 1:
        beams: tuple[Beam, ...] = (Beam(name="Arc 1", gantry_deg=angles[0], isocenter_mm=iso,
                                        technique=Technique.ARC,
                                        control_point_gantry_deg=tuple(angles), number=1),)
    else:
        beams = tuple(Beam(name=f"G{a:05.1f}", gantry_deg=a, isocenter_mm=iso, number=i + 1)
                      for i, a in enumerate(angles))
    rx_max = max(prescriptions.values())
    plan = Plan(beams=beams, prescription_gy=rx_max, name=path.stem.split("+")[1]
                if "+" in path.stem else "Plan")
    dose = None
    if "dose" in data:
        scale = float(data.get("dose_scale", 1.0))
        dose = Volume(np.asarray(data["dose"], dtype=np.float32) * np.float32(scale), geometry)
    return Case(name=path.stem, ct=Volume(img, geometry), structures=tuple(structures),
                plan=plan, dose=dose, warnings=tuple(warnings))
