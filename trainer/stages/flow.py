"""Supervised flow matching on cached latents: Stage A (Any2Any) and Stage B (dose only).

Per sample (seed §B.7, DESIGN §4): a latent stack ``x0 [7, 16, d, h, w]`` (one augmentation
variant of the cache), a target mask over the slots, a flow time ``s`` (uniform on the 1000-step
table, shifted by 3), noise ``e``; target slots get ``x_s = (1 - s) x0 + s e``, conditions stay
clean; the loss is the MSE to the parameterisation's target (v = e - x0 by default) over the
target slots only, averaged per sample, then over the batch.

Validation: the same loss with dose as the only target at fixed flow times and fixed noises
(``val_loss``, comparable across steps and runs), and, when the VAE is a fitted one, for the
10-step sampled dose: the voxel MAE in Gy inside the body (``val_mae_gy``) and the GDP-HMM
leaderboard MAE (``val_gdp_hmm_mae``), both on the training grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine import diffusion
from engine.cli import UserError
from engine.models.dit import any2any_velocity, noise_targets

from ..caches import Cache
from ..config import TrainConfig
from ..data import hash_fraction
from ..distributed import DistContext
from ..loop import Task, data_signature
from .common import DOSE_SLOT

VAL_SIGMAS = (0.2, 0.5, 0.8)
TargetSampler = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class LatentItem:
    name: str
    variants: tuple[str, ...]


def any2any_targets(cfg: TrainConfig) -> TargetSampler:
    """Stage A: each present slot is a target with ``target_prob`` (dose: ``dose_target_prob``);
    at least one target and at least one condition."""
    p = torch.full((7,), cfg.any2any.target_prob)
    p[DOSE_SLOT] = cfg.any2any.dose_target_prob

    def draw(present: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        mask = (torch.rand(7, generator=g) < p) & present
        slots = present.nonzero().flatten()
        if not mask.any():
            mask[slots[torch.randint(len(slots), (1,), generator=g)]] = True
        if mask.sum() == len(slots):
            on = mask.nonzero().flatten()
            mask[on[torch.randint(len(on), (1,), generator=g)]] = False
        return mask

    return draw


def item_generator(seed: int, name: str) -> torch.Generator:
    """A generator fixed by the run seed and a case name (validation noise, rank-independent)."""
    return torch.Generator().manual_seed(int(hash_fraction(f"{seed}/{name}") * 2 ** 62))


def dose_targets(present: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Stage B: the dose is the only target."""
    mask = torch.zeros(7, dtype=torch.bool)
    mask[DOSE_SLOT] = True
    return mask


def flow_task(stage: str, model: nn.Module, cache: Cache, index: dict, cfg: TrainConfig,
              ctx: DistContext, targets: TargetSampler,
              decode_dose: Callable[[torch.Tensor], torch.Tensor] | None = None,
              export: Callable[[Path], Path] | None = None,
              decoder_loss: Callable | None = None) -> Task:
    """The Any2Any / dose task over the latent cache ``index`` (see the module docstring).

    ``decode_dose(latent [B, 16, d, h, w]) -> Gy [B, D, H, W]`` enables ``val_mae_gy``.
    """
    variants = tuple(index["variants"])
    train = [LatentItem(c["name"], variants) for c in index["cases"] if c["split"] == "train"]
    val = [LatentItem(c["name"], ("identity",)) for c in index["cases"] if c["split"] == "val"]
    prediction = cfg.diffusion.prediction

    def load(item: LatentItem, g: torch.Generator | None) -> tuple[torch.Tensor, str]:
        latents = cache.read_latents(item.name)
        pick = 0 if g is None else int(torch.randint(len(item.variants), (1,), generator=g))
        return latents[item.variants[pick]], item.variants[pick]

    def loss(m: nn.Module, items: list[LatentItem], gens: list[torch.Generator]):
        x0s, noises, sigmas, masks, picked = [], [], [], [], []
        present = torch.ones(7, dtype=torch.bool)
        for item, g in zip(items, gens):
            x0, variant = load(item, g)
            picked.append(variant)
            masks.append(targets(present, g))
            sigmas.append(diffusion.sample_training_sigmas(1, g, cfg.diffusion.shift,
                                                           cfg.diffusion.timesteps))
            noises.append(torch.randn(x0.shape, generator=g))
            x0s.append(x0)
        dev = ctx.device
        x0, noise = torch.stack(x0s).to(dev), torch.stack(noises).to(dev)
        s, mask = torch.cat(sigmas).to(dev), torch.stack(masks).to(dev)
        x = noise_targets(x0, noise, s, mask)
        pred = m(x, s, mask)
        # each sample weighs the same whatever its number of target slots, so that a global
        # batch gives the same loss however it is split over processes
        value = torch.stack([
            diffusion.flow_matching_loss(pred[i:i + 1].float(), x0[i:i + 1], noise[i:i + 1],
                                         prediction, mask=mask[i:i + 1, :, None, None, None, None])
            for i in range(len(items))]).mean()
        stats = {"flow_loss": value.item(),
                 "targets_per_sample": mask.float().sum(1).mean().item()}
        if decoder_loss is not None:
            dec = decoder_loss(getattr(m, "module", m), pred, x, s, mask, items, picked)
            stats["decoder_l1"] = dec.item()
            value = value + dec
        return value, stats

    def evaluate(m: nn.Module, items: list[LatentItem]) -> dict[str, float]:
        losses, maes, gdp = [], [], []
        for item in items:
            x0 = load(item, None)[0][None].to(ctx.device)
            g = item_generator(cfg.run.seed, item.name)
            mask = dose_targets(torch.ones(7, dtype=torch.bool), g)[None].to(ctx.device)
            for s_val in VAL_SIGMAS:
                noise = torch.randn(x0.shape, generator=g).to(ctx.device)
                s = torch.full((1,), s_val, device=ctx.device)
                pred = m(noise_targets(x0, noise, s, mask), s, mask)
                losses.append(diffusion.flow_matching_loss(
                    pred.float(), x0, noise, prediction,
                    mask=mask[..., None, None, None, None]).item())
            if decode_dose is not None:
                volumes = cache.read_volumes(item.name)
                noise = torch.randn(x0.shape, generator=g).to(ctx.device)
                velocity = any2any_velocity(getattr(m, "dit", m), x0, mask,
                                            prediction=prediction)
                sample = diffusion.sample(velocity, noise, steps=cfg.diffusion.sample_steps,
                                          solver=cfg.diffusion.solver, shift=cfg.diffusion.shift)
                dose = decode_dose(sample[:, DOSE_SLOT])[0].float().cpu()
                maes.append(body_mae_gy(dose, volumes, index["normalisation"]))
                score = gdp_hmm_mae_on_grid(dose, volumes, index["normalisation"])
                if score is not None:
                    gdp.append(score)
        out = {"val_loss": sum(losses) / len(losses)}
        if maes:
            out["val_mae_gy"] = sum(maes) / len(maes)
        if gdp:
            out["val_gdp_hmm_mae"] = sum(gdp) / len(gdp)
        return out

    return Task(stage=stage, model=model, params=[p for p in model.parameters()
                                                  if p.requires_grad],
                train_items=train, val_items=val, loss=loss, evaluate=evaluate, export=export,
                data_signature=data_signature([t.name for t in train]),
                use_ddp=decoder_loss is None, find_unused=True,
                info={"variants": list(variants)})


def dose_to_gy(unit: torch.Tensor, normalisation: dict) -> torch.Tensor:
    """A model-grid dose in [-1, 1] as Gy, with the cache's normalisation constants."""
    from engine.features import Normalization
    gy = Normalization.from_dict(normalisation).dose_to_gy(unit.detach().float().cpu().numpy())
    return torch.from_numpy(gy)


def body_mae_gy(dose_gy: torch.Tensor, volumes, normalisation: dict) -> float:
    """Mean |predicted - reference| dose in Gy over the body voxels of the model grid."""
    from engine.features import Slot
    ref = dose_to_gy(volumes.volumes[DOSE_SLOT], normalisation)
    body = volumes.volumes[Slot.BODY] > 0
    return float((dose_gy - ref).abs()[body].mean())


def gdp_hmm_mae_on_grid(dose_gy: torch.Tensor, volumes, normalisation: dict) -> float | None:
    """The GDP-HMM leaderboard MAE (``engine.metrics.scores.gdp_hmm_mae``) on the training grid,
    with the highest-prescription target as the high PTV; None when it is not defined."""
    from engine.features import Slot
    from engine.metrics.scores import gdp_hmm_mae
    targets = [(k, s["prescription_gy"]) for k, s in enumerate(volumes.structure_info)
               if s.get("role") == "target" and s.get("prescription_gy")]
    if not targets:
        return None
    k, rx = max(targets, key=lambda t: t[1])
    ref = dose_to_gy(volumes.volumes[DOSE_SLOT], normalisation).numpy()
    try:
        return gdp_hmm_mae(dose_gy.numpy(), ref, (volumes.volumes[Slot.BODY] > 0).numpy(),
                           volumes.mask(k).numpy(), rx)
    except ValueError:  # e.g. the PTV vanished on a coarse grid
        return None


class DiTWithDecoder(nn.Module):
    """The DiT plus the VAE decoder being adapted (seed §E.2); ``forward`` is the DiT's."""

    def __init__(self, dit: nn.Module, vae: nn.Module) -> None:
        super().__init__()
        self.dit, self.vae = dit, vae

    def forward(self, x, s, mask):
        return self.dit(x, s, mask)


def adapt_decoder(vae, cfg: TrainConfig) -> None:
    """Make the decoder trainable as ``[vae_adapt] mode`` says (the encoder stays frozen)."""
    from .. import lora
    vae.requires_grad_(False)
    if cfg.vae_adapt.mode == "decoder_finetune":
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)
    elif cfg.vae_adapt.mode == "decoder_lora":
        lora.attach_conv_lora(vae.decoder, r".*", cfg.vae_adapt.lora_rank,
                              float(cfg.vae_adapt.lora_rank))


def decoder_loss_fn(cache: Cache, cfg: TrainConfig, prediction: str):
    """L1 between the adapted decoder's decoding of the DiT's clean dose estimate (detached)
    and the reference dose volume: the decoder learns to decode what the DiT predicts."""
    from ..caches import apply_variant

    def decoder_loss(model: DiTWithDecoder, pred, x, s, mask, items, variants) -> torch.Tensor:
        rows = mask[:, DOSE_SLOT].nonzero().flatten().tolist()
        if not rows:
            return pred.new_zeros(())
        x0_hat = diffusion.to_x0(pred[rows, DOSE_SLOT].float(), x[rows, DOSE_SLOT], s[rows],
                                 prediction).detach()
        ref = torch.stack([apply_variant(cache.read_volumes(items[i].name).volumes,
                                         variants[i])[DOSE_SLOT] for i in rows]).to(x.device)
        decoded = model.vae.decode(x0_hat)[:, 0]
        return (decoded - ref).abs().mean() * cfg.vae_adapt.loss_weight

    return decoder_loss


def run_stage(stage: str, targets: TargetSampler, cfg: TrainConfig, data_dir: Path,
              run_dir: Path, resume: bool, ctx: DistContext) -> dict:
    """Any2Any / dose training on the latent cache of ``data_dir`` (checked before compute)."""
    from .. import loop
    from ..data import scan_dataset
    from .common import build_dit, build_vae, cache_for, export_model, save_vae, vae_is_fitted

    manifest = scan_dataset(data_dir, cfg.data.val_fraction)
    cache = cache_for(cfg, run_dir)
    vae = build_vae(cfg).to(ctx.device).eval()
    index = cache.require_latents(vae.config.to_dict())
    if {c["name"] for c in index["cases"]} != {c.name for c in manifest.cases}:
        raise UserError(f"the latent cache {cache.folder} was built from other cases than "
                        f"{data_dir}; run `dosepilot train cache` for this dataset")
    dit = build_dit(cfg)
    adapting = cfg.vae_adapt.mode != "frozen"
    if adapting:
        adapt_decoder(vae, cfg)
        model = DiTWithDecoder(dit, vae)
    else:
        vae.requires_grad_(False)
        model = dit
    decode = None
    if vae_is_fitted(cfg):  # a decoder that was never fitted would give meaningless Gy
        def decode(z: torch.Tensor) -> torch.Tensor:
            return dose_to_gy(vae.decode(z.float())[:, 0], index["normalisation"])

    def export(out_dir: Path) -> Path:
        if adapting:
            from ..lora import merge_conv_lora
            merge_conv_lora(vae.decoder)
            save_vae(vae, Path(out_dir) / "vae.safetensors")
        return export_model(dit, vae, out_dir, cfg, stage, index["normalisation"],
                            {"data": str(data_dir), "vae_adapt": cfg.vae_adapt.mode})

    task = flow_task(stage, model, cache, index, cfg, ctx, targets, decode_dose=decode,
                     export=export,
                     decoder_loss=decoder_loss_fn(cache, cfg, cfg.diffusion.prediction)
                     if adapting else None)
    return loop.run(task, cfg, run_dir, ctx, resume=resume)
