"""Stage ``cache``: every case's model-grid modalities, then their latents, written once to disk.

The frozen VAE encodes each of the seven modalities separately (one channel each), for every
augmentation variant the preset asks for (``[data] flip_lr`` / ``flip_si``: flipped stacks are
re-encoded, not flipped in latent space, since the causal VAE is not flip-symmetric). Work is
split over the processes of a torchrun job; a case already cached with the same VAE is skipped,
so an interrupted cache build simply continues (``--resume`` is accepted and means the same).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..caches import Cache, apply_variant, variants_for
from ..config import TrainConfig
from ..data import Manifest, build_volume_cache, scan_dataset
from ..distributed import DistContext, barrier
from ..events import EventLog
from .common import build_vae, cache_for


def run(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, ctx: DistContext) -> dict:
    manifest = scan_dataset(data_dir, cfg.data.val_fraction)
    cache = cache_for(cfg, run_dir)
    vae = build_vae(cfg).to(ctx.device).eval().requires_grad_(False)
    events = EventLog(run_dir, enabled=ctx.is_main)
    try:
        return build_latent_cache(manifest, cache, vae, cfg, ctx, events)
    except BaseException as exc:
        events.emit("error", 0, message=str(exc) or type(exc).__name__,
                    error_type=type(exc).__name__)
        exc.logged = True
        raise
    finally:
        events.close()


def build_latent_cache(manifest: Manifest, cache: Cache, vae, cfg: TrainConfig,
                       ctx: DistContext, events: EventLog) -> dict:
    """Volumes then latents for every case of ``manifest`` into ``cache``; writes the index."""
    t0 = time.time()
    n = len(manifest.cases)
    events.emit("start", 0, stage="cache", total_steps=n, world_size=ctx.world_size,
                device=str(ctx.device), resumed=False, config=cfg.to_dict(),
                train_cases=len(manifest.train), val_cases=len(manifest.val))
    volume_meta = build_volume_cache(manifest, cache, cfg, ctx)
    variants = variants_for(cfg.data.flip_lr, cfg.data.flip_si)
    vae_cfg = vae.config.to_dict()
    for i, ref in enumerate(manifest.cases):
        if i % ctx.world_size != ctx.rank:
            continue
        if not cache.has_latents(ref.name, vae_cfg, variants):
            stack = cache.read_volumes(ref.name).volumes.to(ctx.device)
            latents = {}
            with torch.no_grad():
                for variant in variants:
                    x = apply_variant(stack, variant)[:, None]          # [7, 1, D, H, W]
                    latents[variant] = vae.encode(x)                    # [7, 16, d, h, w]
            cache.write_latents(ref.name, latents, vae_cfg)
        events.emit("train", i + 1, total_steps=n, case=ref.name,
                    samples_per_s=(i + 1) / max(time.time() - t0, 1e-9))
    barrier(ctx)
    if ctx.is_main:
        cache.write_index({**volume_meta, "vae": vae_cfg, "variants": list(variants),
                           "latent_cases": [c.name for c in manifest.cases],
                           "latents_complete": True})
    barrier(ctx)
    events.emit("end", n, total_steps=n, status="completed", export=str(cache.folder),
                wall_s=time.time() - t0)
    return {"cases": n}
