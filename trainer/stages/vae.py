"""Stage ``vae``: fit the Wan-architecture VAE on the dataset's modalities.

Needed when no pretrained Wan 2.1 VAE is at hand (or to adapt one: ``[model] vae_weights``
starts from given weights). Each sample is one modality volume of one case (the dose drawn
4x as often as each other slot: it is what the model must reproduce best), augmented as the
preset says and cut to ``[data] crop`` when one is set. Loss: L1 reconstruction through a
sample of the posterior plus a small KL term.
At the end the per-channel latent statistics are measured on training cases and stored in the
exported VAE's config (``RUN_DIR/vae.safetensors``, usable as ``[model] vae_weights``); from
then on the VAE is frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.models.vae import compute_latent_stats

from .. import loop
from ..config import TrainConfig
from ..distributed import DistContext
from .common import DOSE_SLOT, build_vae, cache_for, save_vae
from .volumes import augment_of, augmented_stack, random_crop, volume_items

KL_WEIGHT = 1e-6
SLOT_WEIGHTS = torch.tensor([1.0, 1, 1, 1, 4, 1, 1])
STATS_CASES = 16


def run(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, ctx: DistContext) -> dict:
    cache = cache_for(cfg, run_dir)
    train, val, _ = volume_items(cfg, data_dir, cache, ctx)
    vae = build_vae(cfg)
    augment = augment_of(cfg)

    def pick(g: torch.Generator) -> int:
        return int(torch.multinomial(SLOT_WEIGHTS, 1, generator=g))

    def loss(m, names, gens):
        x = torch.stack([random_crop(augmented_stack(cache, n, augment, g), cfg.data.crop, g)
                         [pick(g)] for n, g in zip(names, gens)])[:, None].to(ctx.device)
        raw = getattr(m, "module", m)
        mu, logvar = raw.encode_moments(x)
        eps = torch.stack([torch.randn(mu.shape[1:], generator=g) for g in gens]).to(mu.device)
        z = mu + (0.5 * logvar.clamp(-30, 20)).exp() * eps
        rec = raw.decode_raw(z, clamp=False).mean(dim=1, keepdim=True)
        l1 = (rec - x).abs().mean()
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()
        return l1 + KL_WEIGHT * kl, {"l1": l1.item(), "kl": kl.item()}

    def evaluate(m, names):
        errors = []
        for n in names:
            x = augmented_stack(cache, n, augment, None)[:, None].to(ctx.device)
            rec = m.decode_raw(m.encode_moments(x)[0]).mean(dim=1, keepdim=True)
            errors.append((rec - x).abs().mean(dim=(1, 2, 3, 4)))
        per_slot = torch.stack(errors).mean(0)
        return {"val_l1": per_slot.mean().item(), "val_l1_dose": per_slot[DOSE_SLOT].item()}

    def export(out_dir: Path) -> Path:
        mus = []
        with torch.no_grad():
            for n in train[:STATS_CASES]:
                x = augmented_stack(cache, n, augment, None)[:, None].to(ctx.device)
                mus.append(vae.encode_moments(x)[0].cpu())
        mean, std = compute_latent_stats(torch.cat(mus))
        fitted = type(vae)(vae.config.with_latent_stats(mean, std))
        fitted.load_state_dict(vae.state_dict())
        return save_vae(fitted, Path(out_dir) / "vae.safetensors")

    task = loop.Task(stage="vae", model=vae, params=list(vae.parameters()), train_items=train,
                     val_items=val, loss=loss, evaluate=evaluate, export=export,
                     data_signature=loop.data_signature(train))
    return loop.run(task, cfg, run_dir, ctx, resume=resume)
