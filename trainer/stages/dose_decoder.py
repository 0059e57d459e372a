"""Stage ``dose-decoder``: the VAE's decoder learns to decode dose latents into the true dose.

The ``vae`` stage fits one VAE to all seven modalities, but at inference its decoder only ever
decodes doses, and it is the accuracy floor of every prediction: the shipped VAE's round trip of
the *reference* dose alone scores 9.6 Gy on the OpenKBP validation set
(``benchmarks/dose_codec_ceiling.py``). This stage keeps the encoder (and so every cached latent
and the DiT trained on them) as it is and fine-tunes ``post_quant_conv`` + decoder on the cached
dose latents against the cached dose volumes (L1 in [-1, 1] units; body voxels weigh 1, the rest
``OUTSIDE_WEIGHT``). Unlike ``[vae_adapt]`` in the ``dose`` stage it needs no DiT step, so it runs
on a CPU. ``[data] crop`` cuts an in-plane window (the causal decoder always sees the whole
depth). Needs ``[model] init_from`` (the bundle whose decoder is refined) and a latent cache of
that bundle's VAE; exports ``RUN_DIR/model`` with the bundle's DiT and codec and the new VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import UserError
from engine.features import Slot

from .. import loop
from ..config import TrainConfig
from ..data import scan_dataset
from ..distributed import DistContext
from .common import DOSE_SLOT, build_dit, build_vae, cache_for, export_model
from .flow import dose_to_gy

OUTSIDE_WEIGHT = 0.1
LATENT_STRIDE = 8  # in-plane voxels per latent pixel of the Wan VAE


def _window(cfg: TrainConfig, latent_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The in-plane latent window of ``[data] crop``, None for whole slices."""
    crop = cfg.data.crop
    if not any(crop):
        return None
    if crop[0] != cfg.data.grid[0]:
        raise UserError(f"{cfg.source}: dose-decoder crops in-plane only: set [data] crop to "
                        f"[{cfg.data.grid[0]}, H, W] (got {list(crop)})")
    window = (crop[1] // LATENT_STRIDE, crop[2] // LATENT_STRIDE)
    if any(w > n for w, n in zip(window, latent_hw)):
        raise UserError(f"{cfg.source}: [data] crop {list(crop)} is larger than the grid")
    return window


def decoder_l1(vae, latent: torch.Tensor, dose: torch.Tensor, body: torch.Tensor
               ) -> torch.Tensor:
    """Body-weighted L1 between ``vae.decode(latent)`` ``[B, D, H, W]`` and ``dose``."""
    decoded = vae.decode(latent)[:, 0]
    weight = torch.where(body, 1.0, OUTSIDE_WEIGHT)
    return ((decoded - dose).abs() * weight).sum() / weight.sum()


def run(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, ctx: DistContext) -> dict:
    if not cfg.model.init_from:
        raise UserError("dose-decoder refines a model bundle's decoder: set [model] init_from")
    cache = cache_for(cfg, run_dir)
    manifest = scan_dataset(data_dir, cfg.data.val_fraction)
    vae = build_vae(cfg).to(ctx.device)
    index = cache.require_latents(vae.config.to_dict())
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    train = [c.name for c in manifest.train]
    val = [c.name for c in manifest.val]
    latent_hw = tuple(cache.read_latents(train[0])["identity"].shape[-2:])
    window = _window(cfg, latent_hw)

    def sample(name: str, g: torch.Generator | None):
        latent = cache.read_latents(name)["identity"][DOSE_SLOT]
        volumes = cache.read_volumes(name).volumes
        dose, body = volumes[DOSE_SLOT], volumes[Slot.BODY] > 0
        if window is not None and g is not None:
            i, j = (int(torch.randint(n - w + 1, (1,), generator=g))
                    for n, w in zip(latent_hw, window))
            latent = latent[..., i:i + window[0], j:j + window[1]]
            ys, xs = (slice(LATENT_STRIDE * i, LATENT_STRIDE * (i + window[0])),
                      slice(LATENT_STRIDE * j, LATENT_STRIDE * (j + window[1])))
            dose, body = dose[:, ys, xs], body[:, ys, xs]
        return latent, dose, body

    def loss(m, names, gens):
        latents, doses, bodies = zip(*(sample(n, g) for n, g in zip(names, gens)))
        value = decoder_l1(getattr(m, "module", m), torch.stack(latents).to(ctx.device),
                           torch.stack(doses).to(ctx.device), torch.stack(bodies).to(ctx.device))
        return value, {"l1": value.item()}

    def evaluate(m, names):
        maes = []
        with torch.no_grad():
            for n in names:
                latent, dose, body = sample(n, None)
                decoded = m.decode(latent[None].to(ctx.device))[0, 0]
                error = dose_to_gy(decoded, index["normalisation"]) - dose_to_gy(
                    dose, index["normalisation"])
                maes.append(float(error.abs()[body].mean()))
        return {"val_body_mae_gy": sum(maes) / len(maes)}

    def export(out_dir: Path) -> Path:
        return export_model(build_dit(cfg), vae.eval(), out_dir, cfg, "dose-decoder",
                            index["normalisation"], {"data": str(data_dir)})

    task = loop.Task(stage="dose-decoder", model=vae,
                     params=[p for p in vae.parameters() if p.requires_grad],
                     train_items=train, val_items=val, loss=loss, evaluate=evaluate,
                     export=export, data_signature=loop.data_signature(train))
    return loop.run(task, cfg, run_dir, ctx, resume=resume)
