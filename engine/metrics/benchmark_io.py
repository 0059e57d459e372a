"""Reading benchmark references and predictions for scoring (OpenKBP, GDP-HMM).

OpenKBP references (the shared ``pt_N.npz`` files or the original ``pt_N/`` CSV folders) are
read by :mod:`engine.io.openkbp`; here are the predictions, in the dataset's own layout (128³,
raveled indices unravelled in C order): ``pt_N.csv`` (the OpenKBP submission format: a header
``,data`` then ``index,dose_gy`` rows) or ``pt_N.npy`` (a dense 128³ array in Gy).

GDP-HMM reference ``.npz`` files hold one pickled dict (``arr_0``). They are read with a
restricted unpickler that only rebuilds numpy arrays, numpy scalars and plain containers, so a
malicious file cannot run code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.case import Case, Role
from engine.io.openkbp import OpenKBPFormatError, load_openkbp
from engine.io.safe_unpickle import load_npz_restricted

OPENKBP_SHAPE = (128, 128, 128)
_PATIENT = re.compile(r"^pt_(\d+)$")


class BenchmarkFileError(ValueError):
    """A benchmark file that cannot be read; the message names the file and the problem."""


def patient_sort_key(name: str) -> tuple[int, str]:
    m = _PATIENT.match(name)
    return (int(m.group(1)), name) if m else (1 << 30, name)


@dataclass(frozen=True)
class OpenKBPReference:
    """One OpenKBP patient in the dataset's own ``[i0, i1, i2]`` layout, doses in Gy.

    ``case`` is the same patient as :func:`engine.io.openkbp.load_openkbp` builds it (axial
    ``[z, y, x]`` grid, for DVHs and scorecards).
    """

    patient: str
    dose_gy: np.ndarray
    masks: dict[str, np.ndarray]
    possible_dose_mask: np.ndarray
    voxel_mm: tuple[float, float, float]
    case: Case


def _from_case_axes(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`engine.io.openkbp.to_case_axes`: ``[z, y, x]`` -> ``[i0, i1, i2]``."""
    return np.ascontiguousarray(np.asarray(array)[::-1].transpose(1, 2, 0))


def read_openkbp_reference(path: Path) -> OpenKBPReference:
    """A reference patient (``pt_N.npz`` or ``pt_N/`` folder) with its dose and masks."""
    path = Path(path)
    try:
        case = load_openkbp(path)
    except OpenKBPFormatError as exc:
        raise BenchmarkFileError(str(exc)) from exc
    if case.dose is None or case.external is None:
        raise BenchmarkFileError(f"{path}: a reference needs its dose and possible-dose mask")
    masks = {s.name: _from_case_axes(s.mask) for s in case.structures
             if s.role is not Role.EXTERNAL}
    sz, sy, sx = case.geometry.spacing
    return OpenKBPReference(case.name, _from_case_axes(case.dose.array).astype(np.float64),
                            masks, _from_case_axes(case.external.mask), (sy, sx, sz), case)


def _read_sparse_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of an OpenKBP sparse CSV file; checks the indices fit 128³."""
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline()
            if "data" not in header:
                raise BenchmarkFileError(f"{path}: expected a header ',data', got "
                                         f"{header.strip()!r}")
            table = np.loadtxt(f, delimiter=",", ndmin=2, dtype=np.float64)
    except (OSError, ValueError) as exc:
        if isinstance(exc, BenchmarkFileError):
            raise
        raise BenchmarkFileError(f"{path}: cannot read as an OpenKBP sparse CSV ({exc})") from exc
    if table.size == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    if table.shape[1] < 2:
        raise BenchmarkFileError(f"{path}: needs two columns (index, data)")
    index, values = table[:, 0], table[:, 1]
    size = int(np.prod(OPENKBP_SHAPE))
    if np.any(index != np.round(index)) or index.min() < 0 or index.max() >= size:
        raise BenchmarkFileError(f"{path}: voxel indices must be integers in [0, {size})")
    if not np.all(np.isfinite(values)):
        raise BenchmarkFileError(f"{path}: dose values must be finite numbers")
    return index.astype(np.int64), values


def read_openkbp_csv_dose(path: Path) -> np.ndarray:
    """A sparse OpenKBP dose CSV (a submission file) as a dense 128³ array, Gy."""
    index, values = _read_sparse_csv(Path(path))
    dose = np.zeros(int(np.prod(OPENKBP_SHAPE)))
    dose[index] = values
    return dose.reshape(OPENKBP_SHAPE)


def openkbp_references(ref_dir: Path) -> dict[str, Path]:
    """Patient id -> reference path (``pt_N.npz`` files or ``pt_N/`` folders) in ``ref_dir``."""
    ref_dir = Path(ref_dir)
    found = {p.stem: p for p in ref_dir.glob("pt_*.npz")}
    found.update({p.name: p for p in ref_dir.glob("pt_*") if p.is_dir()})
    return {k: found[k] for k in sorted(found, key=patient_sort_key) if _PATIENT.match(k)}


def openkbp_predictions(pred_dir: Path) -> dict[str, Path]:
    """Patient id -> prediction file in ``pred_dir``: ``pt_N.csv``, ``pt_N.npy``, or
    ``pt_N/dose.npy`` (the layout ``dosepilot predict`` writes)."""
    out: dict[str, Path] = {}
    for p in sorted(Path(pred_dir).iterdir()):
        if p.is_dir() and _PATIENT.match(p.name) and (p / "dose.npy").is_file():
            p = p / "dose.npy"
            name = p.parent.name
        else:
            name = p.stem
        if p.suffix in (".csv", ".npy") and _PATIENT.match(name):
            if name in out:
                raise BenchmarkFileError(f"{pred_dir}: both {out[name]} and {p} predict {name}")
            out[name] = p
    return out


def gdp_hmm_predictions(pred_dir: Path) -> dict[str, Path]:
    """Plan name -> prediction file in ``pred_dir``: ``{plan}_pred.npy`` (the challenge's
    layout) or ``{plan}/dose.npy`` (what ``dosepilot predict`` writes)."""
    out: dict[str, Path] = {}
    for p in sorted(Path(pred_dir).iterdir()):
        if p.is_dir() and (p / "dose.npy").is_file():
            name, p = p.name, p / "dose.npy"
        elif p.is_file() and p.name.endswith("_pred.npy"):
            name = p.name.removesuffix("_pred.npy")
        else:
            continue
        if name in out:
            raise BenchmarkFileError(f"{pred_dir}: both {out[name]} and {p} predict {name}")
        out[name] = p
    return out


def read_prediction_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A dense ``.npy`` prediction in Gy (no pickles), checked against the reference shape."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BenchmarkFileError(f"{path}: not a numeric .npy array ({exc})") from exc
    arr = np.squeeze(arr)
    if arr.shape != tuple(shape):
        raise BenchmarkFileError(f"{path}: shape {arr.shape}, expected {tuple(shape)}")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise BenchmarkFileError(f"{path}: dose must be finite numbers")
    return arr.astype(np.float64)


def read_openkbp_prediction(path: Path) -> np.ndarray:
    path = Path(path)
    if path.suffix == ".csv":
        return read_openkbp_csv_dose(path)
    return read_prediction_array(path, OPENKBP_SHAPE)


# --- GDP-HMM -------------------------------------------------------------------------------

def read_gdp_hmm_npz(path: Path) -> dict:
    """The dict stored in a GDP-HMM plan ``.npz`` (``np.savez_compressed(path, crop_dict)``)."""
    path = Path(path)
    try:
        arrays = load_npz_restricted(path)
    except ValueError as exc:  # UnsafePickleError included: nothing was executed
        raise BenchmarkFileError(f"{path}: not a GDP-HMM plan npz ({exc})") from exc
    value = arrays.get("arr_0")
    if value is None or len(arrays) != 1:
        raise BenchmarkFileError(f"{path}: expected one pickled dict in arr_0")
    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
        value = value.item()
    if not isinstance(value, dict):
        raise BenchmarkFileError(f"{path}: arr_0 holds {type(value).__name__}, expected a dict")
    return value


def read_ptv_dict(path: Path) -> dict:
    """``PTV_DICT.json``: patient id -> {"PTV_High": {"OPTName", "PDose", ...}, ...}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchmarkFileError(f"{path}: cannot read PTV_DICT.json ({exc})") from exc
    if not isinstance(data, dict):
        raise BenchmarkFileError(f"{path}: expected a JSON object keyed by patient id")
    return data
