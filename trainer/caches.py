"""On-disk caches shared by the stages (safetensors per case, JSON index; never pickle).

``CACHE/volumes/<case>.safetensors``: the seven model-grid modalities of a case
(``volumes`` float16 ``[7, D, H, W]`` in [-1, 1]) and its structures on the model grid
(``structures`` int64 ``[D, H, W]``, bit ``k`` = structure ``k`` of the metadata list), so
rewards and metrics need not reload the patient.

``CACHE/latents/<case>.safetensors``: the frozen VAE's normalised latents of every modality,
one tensor per augmentation variant (``identity``, ``flip_lr``, ``flip_si``, ``flip_lr_si``),
float32 ``[7, 16, d, h, w]``.

``CACHE/index.json``: the cases with their split, the grid, the normalisation, and (once the
``cache`` stage ran) the VAE configuration the latents belong to; a cache built with another
VAE is refused instead of silently mixing latent spaces.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.errors import UserError

VARIANTS = ("identity", "flip_lr", "flip_si", "flip_lr_si")


def _config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def case_key(name: str) -> str:
    """A file-name-safe key for a case name."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name.replace("/", "__"))


def variants_for(flip_lr: bool, flip_si: bool) -> tuple[str, ...]:
    out = ["identity"]
    if flip_lr:
        out.append("flip_lr")
    if flip_si:
        out.append("flip_si")
    if flip_lr and flip_si:
        out.append("flip_lr_si")
    return tuple(out)


def apply_variant(volumes: torch.Tensor, variant: str) -> torch.Tensor:
    """``[slots, z, y, x]`` flipped as the variant says (all slots together, see trainer.data)."""
    if "lr" in variant:
        volumes = volumes.flip(-1)
    if "si" in variant:
        volumes = volumes.flip(-3)
    return volumes


@dataclass(frozen=True)
class CaseVolumes:
    """One case's model-grid stack and structures (see the module docstring)."""

    name: str
    volumes: torch.Tensor           # float32 [7, D, H, W]
    structures: torch.Tensor        # int64 [D, H, W] bit masks
    structure_info: list[dict]      # [{name, role, prescription_gy}], index = bit

    def mask(self, index: int) -> torch.Tensor:
        return (self.structures >> index) & 1 == 1


class Cache:
    """A cache folder (module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    # -- index ----------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.folder / "index.json"

    def read_index(self) -> dict:
        if not self.index_path.is_file():
            return {}
        try:
            return json.loads(self.index_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.index_path} is damaged ({exc}); delete the cache folder and "
                            "rebuild it with `dosepilot train cache`") from None

    def write_index(self, index: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_name(f"index.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
        os.replace(tmp, self.index_path)

    # -- volumes --------------------------------------------------------------------------
    def volume_path(self, name: str) -> Path:
        return self.folder / "volumes" / f"{case_key(name)}.safetensors"

    def write_volumes(self, name: str, volumes: np.ndarray, structures: np.ndarray,
                      structure_info: list[dict]) -> None:
        path = self.volume_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        save_file({"volumes": torch.from_numpy(np.ascontiguousarray(volumes, np.float16)),
                   "structures": torch.from_numpy(np.ascontiguousarray(structures, np.int64))},
                  str(tmp), metadata={"case": name, "structures": json.dumps(structure_info)})
        os.replace(tmp, path)

    def read_volumes(self, name: str) -> CaseVolumes:
        from safetensors import safe_open
        path = self.volume_path(name)
        if not path.is_file():
            raise UserError(f"case {name} is missing from the volume cache {self.folder}; run "
                            "`dosepilot train cache` on this dataset first")
        with safe_open(str(path), "pt") as f:
            info = json.loads(f.metadata()["structures"])
            return CaseVolumes(name, f.get_tensor("volumes").float(),
                               f.get_tensor("structures"), info)

    # -- latents --------------------------------------------------------------------------
    def latent_path(self, name: str) -> Path:
        return self.folder / "latents" / f"{case_key(name)}.safetensors"

    def write_latents(self, name: str, latents: dict[str, torch.Tensor],
                      vae_config: dict) -> None:
        """Writes one case's latents, recording the VAE they belong to (see ``has_latents``)."""
        path = self.latent_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        save_file({k: v.detach().float().contiguous().cpu() for k, v in latents.items()},
                  str(tmp), metadata={"case": name, "vae": _config_key(vae_config)})
        os.replace(tmp, path)

    def has_latents(self, name: str, vae_config: dict, variants: tuple[str, ...]) -> bool:
        """Whether the case's latents are on disk for exactly this VAE and these variants.

        Read from the file's own metadata, not the index, so that a build interrupted before
        it wrote the index continues where it stopped."""
        from safetensors import SafetensorError, safe_open
        path = self.latent_path(name)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as f:
                return ((f.metadata() or {}).get("vae") == _config_key(vae_config)
                        and set(f.keys()) == set(variants))
        except (OSError, SafetensorError):  # a damaged file is rebuilt
            return False

    def read_latents(self, name: str) -> dict[str, torch.Tensor]:
        path = self.latent_path(name)
        if not path.is_file():
            raise UserError(f"case {name} is missing from the latent cache {self.folder}; run "
                            "`dosepilot train cache` first")
        return load_file(str(path))

    def require_latents(self, vae_config: dict) -> dict:
        """The index, checked to hold latents of ``vae_config``; UserError otherwise."""
        index = self.read_index()
        if not index.get("latents_complete"):
            raise UserError(f"no complete latent cache in {self.folder}: run `dosepilot train "
                            "cache` with the same --config and --data first")
        if index.get("vae") != vae_config:
            raise UserError(f"the latent cache in {self.folder} was built with another VAE "
                            f"({index.get('vae', {}).get('name')!r}); rebuild it with "
                            "`dosepilot train cache` or point [data] cache_dir elsewhere")
        return index
