"""Compact copies of generated physics plans, small enough to keep in the repository.

A plan file of ``dosepilot physics generate`` (:mod:`engine.physics.dataset`) repeats its
source patient's CT and structures; a packed plan keeps only what the physics run produced
plus a fingerprint of the source arrays. For a format-2 plan that is the engine's coarse dose
grid on the voxels the body's dose is read from, in cGy (``dose_grid_cgy``, about 4x fewer
voxels than the CT grid at 5 mm), the beams, the isocentre and the engine record: the CT-grid
``dose_cgy`` is left out too, because ``unpack`` recreates it bit for bit with the generator's
own :func:`engine.physics.dataset.dose_cgy_from_grid`. A format-1 plan (no dose grid) keeps its
``dose_cgy``. ``unpack`` joins a packed plan with its source case from the dataset again and
writes the full plan file, the arrays the generator wrote, refusing a source whose arrays differ
from the ones the plan was computed on.

Plans that fail the acceptance rule (their manifest record's ``rejected`` is not empty, see
:mod:`engine.physics.quality`) are neither packed nor unpacked: they stay out of every training
set made from the packed folder, while the manifest keeps their figures.

    dosepilot physics pack GENERATED_DIR PACK_DIR
    dosepilot physics unpack PACK_DIR DATASET_DIR OUT_DIR

Packed format (``<case>_plan<k>.npz``, compressed, no pickle): the generator's keys except
``ct``, ``roi_bits``, ``roi_names``, ``present``, ``voxel_mm``, plus ``source_sha256`` (str,
:func:`source_fingerprint` of those arrays); for a format-2 plan ``dose_cgy`` is left out and
``dose_grid_cgy`` is replaced by its lossless code (:func:`encode_dose_grid`:
``dose_grid_shape``, ``dose_grid_mask_lzma``, ``dose_grid_values_lzma``). The generator's
``manifest.json`` is copied along.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from engine.physics.dataset import (
    dose_cgy_from_grid,
    list_cases,
    load_arrays,
    read_dose_grid,
    write_npz_atomic,
)

SOURCE_KEYS = ("ct", "roi_bits", "roi_names", "present", "voxel_mm")
MANIFEST = "manifest.json"


class PackError(ValueError):
    """A packed plan that cannot be restored (missing or different source case, bad file)."""


def source_fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the source-case arrays a plan copies (dtype, shape and bytes of each)."""
    h = hashlib.sha256()
    for key in SOURCE_KEYS:
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def encode_dose_grid(cgy: np.ndarray) -> dict[str, np.ndarray]:
    """A stored dose grid (uint16 cGy, zero outside the voxels the restore reads) coded
    losslessly for the pack: the shape, the mask of non-zero voxels (bit-packed, LZMA) and
    their values in C order as differences from the previous one (zigzag coded: sign in the
    lowest bit), split into byte planes (LZMA). About 9 bits per kept voxel: neighbouring 5 mm
    voxels of an optimised dose differ by a few Gy, which 0.01 Gy steps resolve."""
    mask = cgy > 0
    deltas = np.diff(cgy[mask].astype(np.int64), prepend=0)
    zigzag = ((deltas << 1) ^ (deltas >> 63)).astype("<u4")  # small |d| -> small, sign in bit 0
    planes = zigzag.view(np.uint8).reshape(-1, 4).T.tobytes()
    return {"dose_grid_shape": np.asarray(cgy.shape, dtype=np.int64),
            "dose_grid_mask_lzma": np.frombuffer(
                lzma.compress(np.packbits(mask).tobytes(), preset=9), dtype=np.uint8),
            "dose_grid_values_lzma": np.frombuffer(lzma.compress(planes, preset=9),
                                                   dtype=np.uint8)}


def decode_dose_grid(packed: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`encode_dose_grid`: the uint16 cGy grid."""
    shape = tuple(int(n) for n in packed["dose_grid_shape"])
    try:
        bits = lzma.decompress(packed["dose_grid_mask_lzma"].tobytes())
        planes = np.frombuffer(lzma.decompress(packed["dose_grid_values_lzma"].tobytes()),
                               dtype=np.uint8)
    except lzma.LZMAError as exc:
        raise PackError(f"corrupt packed dose grid: {exc}") from None
    size = int(np.prod(shape))
    mask = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=size).astype(bool)
    kept = int(mask.sum())
    if len(bits) != (size + 7) // 8 or planes.size != 4 * kept:
        raise PackError(f"corrupt packed dose grid: {kept} voxels, {planes.size} value bytes")
    zigzag = planes.reshape(4, kept).T.copy().view("<u4").ravel().astype(np.int64)
    values = np.cumsum((zigzag >> 1) ^ -(zigzag & 1))
    if kept and (values.min() < 0 or values.max() > 65535):
        raise PackError("corrupt packed dose grid: values outside 0..65535 cGy")
    out = np.zeros(size, dtype=np.uint16)
    out[mask] = values
    return out.reshape(shape)


def pack_plan(plan: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The packed arrays of one full plan file's arrays."""
    missing = [k for k in (*SOURCE_KEYS, "dose_cgy", "source_case") if k not in plan]
    if missing:
        raise PackError(f"not a generated plan file: no {', '.join(missing)}")
    derived = ("dose_cgy", "dose_grid_cgy") if "dose_grid_cgy" in plan else ()
    out = {k: v for k, v in plan.items() if k not in SOURCE_KEYS + derived}
    if derived:
        out.update(encode_dose_grid(plan["dose_grid_cgy"]))
    out["source_sha256"] = np.asarray(source_fingerprint(plan))
    return out


def unpack_plan(packed: dict[str, np.ndarray], source: dict[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
    """The full plan arrays from a packed plan and its source case's arrays."""
    name = str(packed["source_case"])
    if source_fingerprint(source) != str(packed["source_sha256"]):
        raise PackError(f"source case {name} differs from the one the plan was computed on "
                        "(CT or structures changed)")
    out = {k: source[k] for k in SOURCE_KEYS}
    coded = ("dose_grid_shape", "dose_grid_mask_lzma", "dose_grid_values_lzma")
    out.update((k, v) for k, v in packed.items() if k not in ("source_sha256", *coded))
    if "dose_grid_values_lzma" in packed:
        out["dose_grid_cgy"] = decode_dose_grid(packed)
        out["dose_cgy"] = dose_cgy_from_grid(source, read_dose_grid(out))
    return out


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_arrays(path)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise PackError(f"{path} cannot be read as an .npz: {exc}") from None


def _plans(folder: Path) -> Iterator[Path]:
    return (p for p in list_cases(folder) if "_plan" in p.stem)


def _convert_folder(src: Path, dst: Path, convert: Callable[[Path], dict[str, np.ndarray]]
                    ) -> int:
    """Write ``convert(plan)`` for every plan of ``src`` not yet in ``dst`` and not rejected by
    ``src``'s manifest, and copy the manifest along; returns how many were written."""
    dst.mkdir(parents=True, exist_ok=True)
    rejected = rejected_plans(src)
    n = 0
    for path in _plans(src):
        target = dst / path.name
        if path.stem not in rejected and not target.exists():
            write_npz_atomic(target, convert(path))
            n += 1
    if (src / MANIFEST).is_file():
        shutil.copyfile(src / MANIFEST, dst / MANIFEST)
    return n


def rejected_plans(folder: Path) -> set[str]:
    """Names (file stems) of the plans ``folder``'s manifest records as failing the acceptance
    rule."""
    path = folder / MANIFEST
    if not path.is_file():
        return set()
    try:
        plans = json.loads(path.read_text()).get("plans", {})
    except (OSError, ValueError) as exc:
        raise PackError(f"{path} cannot be read: {exc}") from None
    return {name for name, record in plans.items() if record.get("rejected")}


def _packed_file(path: Path) -> dict[str, np.ndarray]:
    try:
        return pack_plan(_read(path))
    except PackError as exc:
        raise PackError(f"{path}: {exc}") from None


def _restored_file(path: Path, dataset_dir: Path) -> dict[str, np.ndarray]:
    packed = _read(path)
    if "source_sha256" not in packed:
        raise PackError(f"{path} is not a packed plan (no source_sha256)")
    source_path = dataset_dir / f"{packed['source_case']}.npz"
    if not source_path.is_file():
        raise PackError(f"{path.name}: its source case {source_path} is missing")
    return unpack_plan(packed, _read(source_path))


def pack_folder(generated_dir: Path, pack_dir: Path) -> int:
    """Pack every plan of ``generated_dir`` not yet in ``pack_dir``; returns how many."""
    return _convert_folder(generated_dir, pack_dir, _packed_file)


def unpack_folder(pack_dir: Path, dataset_dir: Path, out_dir: Path) -> int:
    """Restore every packed plan of ``pack_dir`` not yet in ``out_dir``, reading each source
    case from ``dataset_dir/<source_case>.npz``; returns how many were written."""
    return _convert_folder(pack_dir, out_dir, lambda path: _restored_file(path, dataset_dir))
