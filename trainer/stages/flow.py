"""Supervised flow matching on cached latents: Stage A (Any2Any) and Stage B (dose only).

Per sample (seed §B.7, DESIGN §4): a latent stack ``x0 [7, 16, d, h, w]`` (one augmentation
variant of the cache), a target mask over the slots, a flow time ``s`` (uniform on the 1000-step
table, shifted by 3), noise ``e``; target slots get ``x_s = (1 - s) x0 + s e``, conditions stay
clean; the loss is the MSE to the parameterisation's target (v = e - x0 by default) over the
target slots only, averaged per sample, then over the batch.

Beam pairs (``[beam_pairs]``): each batch element is two plans of one patient (the same
anatomy under other beams) drawn with the same flip, flow time and noise, so that the difference
of their targets is the difference of their doses (for v: ``v_a - v_b = x0_b - x0_a``); the loss
adds ``weight`` times the MSE between the predicted and the true difference. Only the beams differ
within a pair, so this term is about what a beam does to the dose.

Validation: the same loss with dose as the only target at fixed flow times and fixed noises
(``val_loss``, comparable across steps and runs), and, when the VAE is a fitted one, for the
10-step sampled dose: the voxel MAE in Gy inside the body (``val_mae_gy``) and the GDP-HMM
leaderboard MAE (``val_gdp_hmm_mae``), both on the training grid.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine import diffusion
from engine.errors import UserError
from engine.models.dit import any2any_velocity, noise_targets, strip_unreachable_noise

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


@dataclass(frozen=True)
class PairItem:
    """Two plans of one patient, trained with the same flip, flow time and noise."""

    first: LatentItem
    second: LatentItem

    @property
    def name(self) -> str:
        return f"{self.first.name}+{self.second.name}"


def beam_pairs(items: list[LatentItem], groups: dict[str, str]) -> list[PairItem]:
    """Every unordered pair of ``items`` of one patient (``groups``: case name -> patient),
    in a fixed order (patients, then names, sorted)."""
    by_patient: dict[str, list[LatentItem]] = defaultdict(list)
    for item in items:
        by_patient[groups.get(item.name, item.name)].append(item)
    return [PairItem(a, b) for patient in sorted(by_patient)
            for a, b in itertools.combinations(sorted(by_patient[patient],
                                                      key=lambda i: i.name), 2)]


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
              decoder_loss: Callable | None = None,
              groups: dict[str, str] | None = None) -> Task:
    """The Any2Any / dose task over the latent cache ``index`` (see the module docstring).

    ``decode_dose(latent [B, 16, d, h, w]) -> Gy [B, D, H, W]`` enables ``val_mae_gy``;
    ``groups`` (case name -> patient) joins the plans of a patient into beam pairs.
    """
    variants = tuple(index["variants"])
    train = [LatentItem(c["name"], variants) for c in index["cases"] if c["split"] == "train"]
    val = [LatentItem(c["name"], ("identity",)) for c in index["cases"] if c["split"] == "val"]
    prediction = cfg.diffusion.prediction
    pairs = cfg.beam_pairs.enabled
    if pairs:
        if decoder_loss is not None:
            raise UserError("[beam_pairs] cannot be combined with [vae_adapt]; use one of them")
        train = beam_pairs(train, groups or {})
        if not train:
            raise UserError("[beam_pairs] enabled, but no training patient has two plans: add "
                            "angle-varied plans (`dosepilot physics generate`) to the dataset")
    in_memory: dict[str, dict[str, torch.Tensor]] = {}

    def read(name: str) -> dict[str, torch.Tensor]:
        if not cfg.data.latents_in_memory:
            return cache.read_latents(name)
        if name not in in_memory:
            in_memory[name] = cache.read_latents(name)
        return in_memory[name]

    def load(item: LatentItem, g: torch.Generator | None) -> tuple[torch.Tensor, str]:
        pick = 0 if g is None else int(torch.randint(len(item.variants), (1,), generator=g))
        return read(item.name)[item.variants[pick]], item.variants[pick]

    def draw(item: LatentItem | PairItem, g: torch.Generator) -> list[tuple]:
        """(x0, noise, sigma, target mask, variant) of each sample of a batch element."""
        x0, variant = load(item.first if pairs else item, g)
        mask = targets(torch.ones(7, dtype=torch.bool), g)
        sigma = diffusion.sample_training_sigmas(1, g, cfg.diffusion.shift,
                                                 cfg.diffusion.timesteps)
        noise = torch.randn(x0.shape, generator=g)
        out = [(x0, noise, sigma, mask, variant)]
        if pairs:
            out.append((read(item.second.name)[variant], noise, sigma, mask, variant))
        return out

    def loss(m: nn.Module, items: list, gens: list[torch.Generator]):
        samples = [s for item, g in zip(items, gens) for s in draw(item, g)]
        dev = ctx.device
        x0 = torch.stack([s[0] for s in samples]).to(dev)
        noise = torch.stack([s[1] for s in samples]).to(dev)
        s = torch.cat([s[2] for s in samples]).to(dev)
        mask = torch.stack([s[3] for s in samples]).to(dev)
        x = noise_targets(x0, noise, s, mask)
        pred = m(x, s, mask)
        slots = mask[:, :, None, None, None, None]
        # each sample weighs the same whatever its number of target slots, so that a global
        # batch gives the same loss however it is split over processes
        value = torch.stack([
            diffusion.flow_matching_loss(pred[i:i + 1].float(), x0[i:i + 1], noise[i:i + 1],
                                         prediction, mask=slots[i:i + 1])
            for i in range(len(samples))]).mean()
        stats = {"flow_loss": value.item(),
                 "targets_per_sample": mask.float().sum(1).mean().item()}
        if pairs:
            target = diffusion.training_target(x0, noise, prediction)
            diff = (pred[0::2].float() - pred[1::2].float()) - (target[0::2] - target[1::2])
            weight = slots[0::2].to(diff.dtype).expand_as(diff)
            pair_loss = ((diff.square() * weight).flatten(1).sum(1)
                         / weight.flatten(1).sum(1)).mean()
            stats["pair_loss"] = pair_loss.item()
            value = value + cfg.beam_pairs.weight * pair_loss
        if decoder_loss is not None:
            picked = [sample[4] for sample in samples]
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
                sample = strip_unreachable_noise(getattr(m, "dit", m), sample, noise, mask,
                                                 prediction)
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
                info={"variants": list(variants), "beam_pairs": pairs})


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
                     if adapting else None,
                     groups={c.name: c.group for c in manifest.cases})
    return loop.run(task, cfg, run_dir, ctx, resume=resume)
