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

Stage ``codec-decoder`` (``trainer.stages.codec_decoder``) runs the same on the bundle's tiny
preview codec instead: its decoder, distilled to imitate the VAE's decoder, learns the true dose
too (the preview's own floor), the codec's encoder (the preview's plates) and the VAE stay.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from engine.errors import UserError
from engine.features import Slot

from .. import loop
from ..config import TrainConfig
from ..data import scan_dataset
from ..distributed import DistContext
from .common import DOSE_SLOT, build_codec, build_dit, build_vae, cache_for, export_model
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


Decoder = Literal["vae", "codec"]


def decoder_l1(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor,
               dose: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """Body-weighted L1 between ``decode(latent)`` ``[B, 1, D, H, W]`` and ``dose`` ``[B, D, H, W]``
    (both in [-1, 1] dose units)."""
    decoded = decode(latent)[:, 0]
    weight = torch.where(body, 1.0, OUTSIDE_WEIGHT)
    return ((decoded - dose).abs() * weight).sum() / weight.sum()


def run(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, ctx: DistContext) -> dict:
    return refine_decoder(cfg, data_dir, run_dir, resume, ctx, "vae")


def refine_decoder(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool,
                   ctx: DistContext, which: Decoder) -> dict:
    """Fine-tune the decoder of the ``init_from`` bundle's VAE (``which="vae"``) or preview
    codec (``"codec"``) on the cached dose latents; export the bundle with it."""
    stage = "dose-decoder" if which == "vae" else "codec-decoder"
    if not cfg.model.init_from:
        raise UserError(f"{stage} refines a model bundle's decoder: set [model] init_from")
    cache = cache_for(cfg, run_dir)
    manifest = scan_dataset(data_dir, cfg.data.val_fraction)
    vae = build_vae(cfg).to(ctx.device)
    index = cache.require_latents(vae.config.to_dict())
    vae.requires_grad_(False)
    codec = build_codec(cfg)
    if which == "vae":
        model: nn.Module = vae
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)
    else:
        if codec is None:
            raise UserError(f"[model] init_from {cfg.model.init_from} has no preview codec to "
                            "refine")
        model = codec.to(ctx.device).requires_grad_(False)
        codec.decoder.requires_grad_(True)
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
        raw = getattr(m, "module", m)
        # the codec unclamped while training, so that out-of-range voxels keep a gradient
        decode = raw.decode if which == "vae" else functools.partial(raw.decode, clamp=False)
        value = decoder_l1(decode, torch.stack(latents).to(ctx.device),
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
        return export_model(build_dit(cfg), vae.eval(), out_dir, cfg, stage,
                            index["normalisation"], {"data": str(data_dir)},
                            codec=codec.eval() if codec is not None else None)

    task = loop.Task(stage=stage, model=model,
                     params=[p for p in model.parameters() if p.requires_grad],
                     train_items=train, val_items=val, loss=loss, evaluate=evaluate,
                     export=export, data_signature=loop.data_signature(train))
    return loop.run(task, cfg, run_dir, ctx, resume=resume)
