"""Datasets for training: a manifest of case files with a deterministic train/validation split,
model-grid modality volumes per case, and augmentation that keeps dose physically valid.

Supported folders (``--data``):

* **OpenKBP**: ``pt_*.npz`` files, either directly or in ``train/`` and ``validation/``
  subfolders (then those are the split), plus the angle-varied physics plans of
  ``dosepilot physics generate`` (``pt_N_planK.npz``, any subfolder): a patient's plans always
  fall on the same side of the split as the patient;
* **GDP-HMM**: ``PID+PlanID+*.npz`` plan files, directly or in ``train/`` / ``valid/``
  subfolders (any depth); plans of one patient always fall on the same side of the split;
* **DICOM**: one subfolder per case holding (at any depth) its CT series, RTSTRUCT, RTPLAN and
  RTDOSE.

Without an explicit split, a case (a patient, for GDP-HMM) is in validation when a hash of its
name falls below ``[data] val_fraction``: the split is stable when cases are added or removed.

Augmentation (``[data] flip_lr / flip_si / shift_voxels``) acts on all seven slots at once. A
left-right flip mirrors the patient *and* the beam and angle plates, i.e. it is the mirrored
patient treated with mirrored gantry angles (360 - angle), which is a physically valid plan; the
anatomy is never flipped without the beams. A superior-inferior flip leaves coplanar beams
unchanged. Shifts translate every slot by whole voxels, filling with each slot's background.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError

FORMATS = ("openkbp", "gdp_hmm", "dicom")
_TRAIN_DIRS = {"train", "training"}
_VAL_DIRS = {"validation", "valid", "val"}
# an OpenKBP patient (group 1) or one of its generated physics plans
_OPENKBP_NAME = re.compile(r"(pt_\d+)(?:_plan\d+)?")


@dataclass(frozen=True)
class CaseRef:
    """One case of a dataset: a unique name, its file or folder, format and split."""

    name: str
    path: Path
    format: str
    split: str          # "train" | "val"
    group: str          # cases of one group (patient) share a split


@dataclass(frozen=True)
class Manifest:
    root: Path
    format: str
    cases: tuple[CaseRef, ...]

    @property
    def train(self) -> tuple[CaseRef, ...]:
        return tuple(c for c in self.cases if c.split == "train")

    @property
    def val(self) -> tuple[CaseRef, ...]:
        return tuple(c for c in self.cases if c.split == "val")

    def to_dict(self) -> dict:
        return {"root": str(self.root), "format": self.format,
                "cases": [{"name": c.name, "path": str(c.path), "split": c.split,
                           "group": c.group} for c in self.cases]}


def hash_fraction(name: str) -> float:
    """A stable number in [0, 1) from a name."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def scan_dataset(root: Path, val_fraction: float) -> Manifest:
    """The manifest of a dataset folder; UserError naming what was expected when it is unusable."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"--data must be a folder of cases, got a file: {root}")
    npz = _npz_files(root)
    openkbp = [p for p in npz if _OPENKBP_NAME.fullmatch(p.stem)]
    gdp = [p for p in npz if p.stem.count("+") >= 2]
    if openkbp:
        cases = [_ref(p, root, "openkbp", _OPENKBP_NAME.fullmatch(p.stem)[1]) for p in openkbp]
        fmt = "openkbp"
    elif gdp:
        cases = [_ref(p, root, "gdp_hmm", p.stem.split("+")[0]) for p in gdp]
        fmt = "gdp_hmm"
    else:
        # a case is a subfolder of the dataset (DICOM files at any depth below it)
        folders = sorted(d for d in root.iterdir() if d.is_dir() and next(d.rglob("*.dcm"), None))
        if not folders and next(root.glob("*.dcm"), None):
            folders = [root]
        if not folders:
            raise UserError(f"no cases found in {root}: expected OpenKBP pt_*.npz files, GDP-HMM "
                            "PID+PlanID+*.npz plan files, or one folder of DICOM files per case")
        cases = [_ref(p, root, "dicom", p.name) for p in folders]
        fmt = "dicom"
    cases = _assign_splits(cases, val_fraction)
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"{root}: case names are not unique: {dupes[:5]}")
    return Manifest(root=root, format=fmt, cases=tuple(cases))


def _npz_files(root: Path) -> list[Path]:
    """Every ``*.npz`` below ``root``, following linked folders (a dataset is often assembled
    from links, e.g. ``train/physics -> the generated plans``) but never a folder twice."""
    seen: set[str] = set()
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(folder) / f for f in files if f.endswith(".npz")]
    return sorted(found)


def _ref(path: Path, root: Path, fmt: str, group: str) -> CaseRef:
    if fmt == "dicom":  # a case folder; DICOM datasets are split by hash
        return CaseRef(name=group, path=path, format=fmt, split="", group=group)
    rel = path.relative_to(root)
    parts = {p.lower() for p in rel.parts[:-1]}
    split = "val" if parts & _VAL_DIRS else ("train" if parts & _TRAIN_DIRS else "")
    return CaseRef(name=rel.with_suffix("").as_posix(), path=path, format=fmt, split=split,
                   group=group)


def _assign_splits(cases: list[CaseRef], val_fraction: float) -> list[CaseRef]:
    explicit = {c.split for c in cases} == {"train", "val"}
    out = []
    for c in cases:
        if explicit and c.split:
            out.append(c)
            continue
        split = "val" if hash_fraction(c.group) < val_fraction else "train"
        out.append(CaseRef(c.name, c.path, c.format, split, c.group))
    return sorted(out, key=lambda c: c.name)


def load_case(ref: CaseRef):
    """Read one case into an :class:`engine.case.Case` (UserError on unreadable input)."""
    try:
        if ref.format == "openkbp":
            from engine.io.openkbp import load_openkbp
            return load_openkbp(ref.path)
        if ref.format == "gdp_hmm":
            from engine.io.gdp_hmm import load_gdp_hmm_npz
            return load_gdp_hmm_npz(ref.path)
        from engine.io.dicom import load_dicom_case
        return load_dicom_case(ref.path, name=ref.name)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read case {ref.name} ({ref.path}): {exc}") from None


# --- augmentation --------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Dose-valid augmentation of a ``[slots, z, y, x]`` stack (see the module docstring)."""

    flip_lr: bool = False
    flip_si: bool = False
    shift_voxels: int = 0

    @property
    def active(self) -> bool:
        return self.flip_lr or self.flip_si or self.shift_voxels > 0

    def __call__(self, volumes: torch.Tensor, background: Sequence[float],
                 gen: torch.Generator) -> torch.Tensor:
        """Apply a random draw from ``gen`` to every slot together."""
        draws = torch.rand(2, generator=gen)
        shift = torch.randint(-self.shift_voxels, self.shift_voxels + 1, (3,), generator=gen)
        if self.flip_lr and draws[0] < 0.5:
            volumes = volumes.flip(-1)          # x: patient left-right; plates flip with it
        if self.flip_si and draws[1] < 0.5:
            volumes = volumes.flip(-3)          # z: superior-inferior
        if self.shift_voxels > 0 and bool(shift.any()):
            volumes = shift_volumes(volumes, tuple(int(s) for s in shift), background)
        return volumes


def shift_volumes(volumes: torch.Tensor, shift: tuple[int, int, int],
                  background: Sequence[float]) -> torch.Tensor:
    """Translate ``[slots, z, y, x]`` by whole voxels, filling each slot with its background."""
    out = torch.empty_like(volumes)
    out[:] = torch.as_tensor(background, dtype=volumes.dtype).view(-1, 1, 1, 1)
    src, dst = [], []
    for axis, s in zip((1, 2, 3), shift):
        n = volumes.shape[axis]
        if abs(s) >= n:
            return out
        src.append(slice(max(-s, 0), n - max(s, 0)))
        dst.append(slice(max(s, 0), n - max(-s, 0)))
    out[:, dst[0], dst[1], dst[2]] = volumes[:, src[0], src[1], src[2]]
    return out


# --- model-grid volumes ---------------------------------------------------------------------


def build_volume_cache(manifest: Manifest, cache, cfg, ctx) -> dict:
    """Write every case's model-grid stack into ``cache`` (skipping those already there).

    Returns the index fields describing the volumes: grid, normalisation, cases and splits.
    Cases are split over the processes of a torchrun job.
    """
    from .distributed import barrier

    grid = list(cfg.data.grid)
    old = cache.read_index()
    if old.get("grid") not in (None, grid):
        raise UserError(f"the cache {cache.folder} holds volumes on the grid {old['grid']}, the "
                        f"preset asks for {grid}: set another [data] cache_dir")
    for i, ref in enumerate(manifest.cases):
        if i % ctx.world_size != ctx.rank or cache.volume_path(ref.name).is_file():
            continue
        inputs = model_inputs(load_case(ref), tuple(grid))
        cache.write_volumes(ref.name, inputs.volumes, inputs.structures, inputs.structure_info)
    barrier(ctx)
    meta = {"grid": grid, "normalisation": normalisation(), "format": manifest.format,
            "root": str(manifest.root),
            "cases": [{"name": c.name, "split": c.split} for c in manifest.cases]}
    if old.get("cases") != meta["cases"]:
        old.pop("latents_complete", None)   # new or other cases: their latents are missing
    if ctx.is_main:
        cache.write_index({**old, **meta})
    barrier(ctx)
    return meta


@dataclass(frozen=True)
class GridInputs:
    """A case on the training grid: the seven slots, its structures as bits, their names."""

    volumes: np.ndarray             # float32 [7, D, H, W] in [-1, 1]
    structures: np.ndarray          # int64 [D, H, W]: bit k = structure_info[k]
    structure_info: list[dict]      # [{name, role, prescription_gy}]


MAX_STRUCTURES = 63   # bits of the int64 structure map
# slots resampled by nearest neighbour on a smaller grid (codes must not blend)
_LABEL_SLOTS = (2,)


def normalisation() -> dict:
    from engine.features import Normalization
    return Normalization().to_dict()


def model_inputs(case, grid: tuple[int, int, int]) -> GridInputs:
    """``engine.features.build_modalities`` of the case's plan, on ``grid``.

    The model grid is 97 x 128 x 160 voxels of (2.0, 2.5, 2.5) mm (DESIGN §3). A smaller
    ``[data] grid`` (CPU presets) resamples that stack over the same field of view: linearly for
    every slot except the index-coded OAR slot, which, like the structure bits, takes the nearest
    voxel.
    """
    import torch.nn.functional as F

    from engine.features import build_modalities
    try:
        inputs = build_modalities(case)
    except ValueError as exc:
        raise UserError(f"case {case.name}: {exc}") from None
    if 4 < len(inputs.present) and not inputs.present[4]:
        raise UserError(f"case {case.name} has no reference dose: it cannot be used to train")
    structures = [s for s in case.structures if s.mask.any()][:MAX_STRUCTURES]
    bits = np.zeros(case.geometry.shape, dtype=np.int64)
    for k, s in enumerate(structures):
        bits[s.mask] |= np.int64(1) << k
    bits = inputs.transform.to_model(bits, order=0, fill=0)   # nearest: bits stay exact
    info = [{"name": s.name, "role": s.role.value, "prescription_gy": s.prescription_gy}
            for s in structures]
    volumes = np.array(inputs.volumes, dtype=np.float32)  # writable copy
    if tuple(volumes.shape[1:]) != tuple(grid):
        t = torch.from_numpy(volumes)[None]
        linear = F.interpolate(t, size=grid, mode="trilinear", align_corners=False)[0]
        nearest = F.interpolate(t, size=grid, mode="nearest-exact")[0]
        for slot in _LABEL_SLOTS:
            linear[slot] = nearest[slot]
        volumes = linear.numpy()
        z, y, x = (np.floor((np.arange(n) + 0.5) * (m / n)).astype(int)
                   for n, m in zip(grid, bits.shape))
        bits = bits[np.ix_(z, y, x)]        # nearest-exact, as the OAR slot
    return GridInputs(volumes=volumes, structures=bits, structure_info=info)
