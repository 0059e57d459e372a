"""Training items for the stages that work on model-grid volumes (``vae``, ``distill``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..caches import Cache
from ..config import TrainConfig
from ..data import Augment, build_volume_cache, scan_dataset
from ..distributed import DistContext

BACKGROUND = (-1.0,) * 7  # every slot's value outside the patient / without structure


def volume_items(cfg: TrainConfig, data_dir: Path, cache: Cache, ctx: DistContext
                 ) -> tuple[list[str], list[str], dict]:
    """(train case names, validation case names, index) after filling the volume cache."""
    manifest = scan_dataset(data_dir, cfg.data.val_fraction)
    meta = build_volume_cache(manifest, cache, cfg, ctx)
    return ([c.name for c in manifest.train], [c.name for c in manifest.val], meta)


def augmented_stack(cache: Cache, name: str, augment: Augment,
                    g: torch.Generator | None) -> torch.Tensor:
    """A case's ``[7, D, H, W]`` stack, augmented with ``g`` (None: as cached)."""
    stack = cache.read_volumes(name).volumes
    return augment(stack, BACKGROUND, g) if g is not None and augment.active else stack


def random_crop(stack: torch.Tensor, size: tuple[int, int, int],
                g: torch.Generator) -> torch.Tensor:
    """A ``[slots, *size]`` window of a ``[slots, D, H, W]`` stack at a position drawn from ``g``
    (every slot cut at the same place); the whole stack when ``size`` is (0, 0, 0)."""
    if not any(size):
        return stack
    starts = [int(torch.randint(n - c + 1, (1,), generator=g)) for n, c in
              zip(stack.shape[1:], size)]
    return stack[:, starts[0]:starts[0] + size[0], starts[1]:starts[1] + size[1],
                 starts[2]:starts[2] + size[2]]


def augment_of(cfg: TrainConfig) -> Augment:
    return Augment(cfg.data.flip_lr, cfg.data.flip_si, cfg.data.shift_voxels)
