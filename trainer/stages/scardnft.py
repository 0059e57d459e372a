"""ScardNFT post-training (seed §B.5): DiffusionNFT with a scorecard + MAE reward, LoRA via peft.

One optimizer step, for each case of this rank's share of the global batch:

1. rollouts: ``group_size`` deterministic 10-step samples from different initial noises, with
   the *old* policy (a soft copy of the trainable parameters);
2. rewards ``R = w_s * scorecard total - w_m * MAE`` on the dose the engine would show: the
   rollout without the starting noise the dose head cannot reach, decoded and, when the bundle
   has one, corrected by its dose refiner (decoded by the codec then, as
   ``DoseEngine.codec_decode``, else by the VAE); advantages normalised within each case's
   group (std over the global batch: gathered across ranks);
3. the DiffusionNFT loss (:mod:`trainer.nft`) on ``train_timesteps`` of the sampler's
   timesteps per rollout, with fresh noise, against the old policy and the frozen base (KL);
4. after the optimizer step the old policy moves towards the trained one (soft update).

Only the LoRA adapters (attention and FFN linears) and the modulation MLPs train; the base is
frozen. The run exports the adapter and the merged model, with the start bundle's codec and
refiner: post-training is the recipe's last stage, and the refiner it was scored with ships
with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from engine import diffusion
from engine.errors import UserError
from engine.features import Normalization, Slot
from engine.models.dose_refiner import DoseRefiner, TargetGeometry, beam_fraction, target_geometry

from .. import lora, nft
from ..config import TrainConfig
from ..data import hash_fraction
from ..distributed import DistContext, all_gather_tensor
from ..loop import Task

# velocity(model, x_t [N, ...], sigma [N], items (one per sample)) -> v [N, ...]
Velocity = Callable[[nn.Module, torch.Tensor, torch.Tensor, list[Any]], torch.Tensor]
# reward(x0 [K, ...] samples of one case, item) -> (reward [K], mae_gy [K])
Reward = Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]
# finish(sample [K, ...], noise [K, ...]) -> sample: the sampler's post-processing
Finish = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def nft_task(policy: PeftModel, velocity: Velocity, reward: Reward,
             sample_shape: tuple[int, ...], train_items: Sequence[Any],
             val_items: Sequence[Any], cfg: TrainConfig, ctx: DistContext,
             export: Callable[[Path], Path] | None = None, data_signature: str = "",
             finish: Finish | None = None) -> Task:
    """The ScardNFT task for a LoRA-wrapped ``policy`` (see the module docstring); ``finish``
    post-processes every rollout as inference does (rewards and the loss see the result)."""
    sc = cfg.scardnft
    policy.to(ctx.device)  # before the old-policy snapshot copies the trainable values
    params = lora.trainable_parameters(policy)
    old = nft.PolicySnapshot(params)
    sigmas = diffusion.sampling_sigmas(cfg.diffusion.sample_steps, cfg.diffusion.shift).float()
    k = sc.group_size

    def rollout(model: nn.Module, item: Any, noise: torch.Tensor) -> torch.Tensor:
        reps = [item] * noise.shape[0]
        x0 = diffusion.sample(lambda x, s: velocity(model, x, s, reps), noise,
                              solver=cfg.diffusion.solver, sigmas=sigmas)
        return finish(x0, noise) if finish is not None else x0

    def loss(model: nn.Module, items: list[Any], gens: list[torch.Generator]):
        raw = getattr(model, "module", model)
        dev = ctx.device
        noises = [torch.randn((k, *sample_shape), generator=g).to(dev) for g in gens]
        with torch.no_grad(), old.swapped():
            x0s = [rollout(raw, it, n) for it, n in zip(items, noises)]
        rewards, maes = zip(*(reward(x0, it) for x0, it in zip(x0s, items)))
        local_r = torch.stack(rewards).to(dev, torch.float32)           # [cases, K]
        all_r = torch.cat(all_gather_tensor(local_r, ctx))
        adv = nft.group_advantages(all_r)[ctx.rank * len(items):(ctx.rank + 1) * len(items)]
        r = nft.advantage_weight(adv, sc.adv_clip_max).reshape(-1)      # [cases*K]

        x0 = torch.cat(x0s)                                              # [cases*K, ...]
        owners = [it for it in items for _ in range(k)]
        picks, eps = [], []
        for g in gens:
            for _ in range(k):
                picks.append(torch.randperm(len(sigmas) - 1, generator=g)[:sc.train_timesteps])
                eps.append(torch.randn((sc.train_timesteps, *sample_shape), generator=g))
        t_idx = torch.stack(picks)                                       # [cases*K, T]
        sigma = sigmas[t_idx].reshape(-1).to(dev)                        # [N]
        x0_n = x0.repeat_interleave(sc.train_timesteps, dim=0)
        r_n = r.repeat_interleave(sc.train_timesteps)
        who = [it for it in owners for _ in range(sc.train_timesteps)]
        s = sigma.reshape(-1, *([1] * len(sample_shape)))
        x_t = (1 - s) * x0_n + s * torch.cat(eps).to(dev)
        with torch.no_grad():
            with old.swapped():
                v_old = velocity(raw, x_t, sigma, who)
            with raw.disable_adapter():
                v_ref = velocity(raw, x_t, sigma, who)
        v_theta = velocity(model, x_t, sigma, who)
        value, stats = nft.nft_loss(v_theta, v_old, v_ref, x_t, x0_n, sigma, r_n, sc.beta,
                                    sc.kl_weight, sc.adv_clip_max)
        mae = torch.cat([m.float() for m in maes])
        return value, {**stats, "reward": local_r.mean().item(),
                       "reward_std": local_r.std(unbiased=False).item(),
                       "mae_gy": mae.mean().item()}

    def evaluate(model: nn.Module, items: list[Any]) -> dict[str, float]:
        rewards, maes = [], []
        for it in items:
            g = torch.Generator().manual_seed(
                int(hash_fraction(f"{cfg.run.seed}/{it!r}") * 2 ** 62))
            noise = torch.randn((k, *sample_shape), generator=g).to(ctx.device)
            rew, mae = reward(rollout(model, it, noise), it)
            rewards.append(rew.float().mean())
            maes.append(mae.float().mean())
        return {"val_reward": torch.stack(rewards).mean().item(),
                "val_mae_gy": torch.stack(maes).mean().item()}

    def after_step(step: int) -> None:
        old.soft_update(nft.old_policy_decay(step, sc.decay_type))

    return Task(stage="scardnft", model=policy, params=params, train_items=train_items,
                val_items=val_items, loss=loss, evaluate=evaluate, after_step=after_step,
                extra_state=old.state, load_extra_state=old.load_state, export=export,
                data_signature=data_signature, use_ddp=True)


# --- the stage on DiffKT3D ------------------------------------------------------------------


def grid_geometry(grid: tuple[int, int, int]):
    """The training grid's geometry: the model grid's field of view at ``grid`` voxels."""
    from engine.case import Geometry
    from engine.features import MODEL_SHAPE, MODEL_SPACING
    spacing = tuple(s * n / g for s, n, g in zip(MODEL_SPACING, MODEL_SHAPE, grid))
    return Geometry(shape=grid, origin=(0.0, 0.0, 0.0), spacing=spacing)


def scorecard_template(name: str):
    from engine.metrics.scorecard import ScorecardError, builtin_template, load_template
    try:
        return load_template(name) if Path(name).suffix == ".toml" else builtin_template(name)
    except (ScorecardError, OSError) as exc:
        raise UserError(f"[scardnft] scorecard {name!r}: {exc}") from None


def refiner_case(refiner: DoseRefiner, volumes: np.ndarray, spacing_mm: tuple[float, ...],
                 norm: Normalization) -> tuple[TargetGeometry, np.ndarray | None]:
    """The target geometry and beam values ``refiner.refine`` takes, from a case's cached
    model-grid stack ``[7, z, y, x]`` (``spacing_mm`` along z, y, x): what the engine builds
    from the case itself (the cached beam plate is clipped at the normalisation's maximum,
    which only voxels crossed by more than twice the plan's beams reach)."""
    if refiner.config.quick_plan:
        raise UserError("scardnft scores the refined dose from cached volumes, and this bundle's "
                        "refiner reads the quick plan, which needs the case itself: post-train "
                        "the bundle before its quick-plan refiner is fitted")
    geometry = target_geometry(norm.ptv_to_gy(volumes[Slot.PTV]), volumes[Slot.BODY] > 0.0,
                               tuple(spacing_mm), refiner.config)
    beam = None
    if refiner.config.beam_plate:
        beam = beam_fraction(norm.beam_plate_per_angle(volumes[Slot.BEAM_PLATE]), 1.0, geometry)
    return geometry, beam


def run(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, ctx: DistContext) -> dict:
    """ScardNFT on a Stage B model (``[model] init_from``) over the latent cache of ``data_dir``."""
    from functools import lru_cache

    from engine.case import Structure
    from engine.metrics.scorecard import BoundScorecard
    from engine.models.dit import DiffKT3D, unreachable_part

    from .. import loop
    from ..data import scan_dataset
    from .common import (
        DOSE_SLOT,
        build_codec,
        build_dit,
        build_refiner,
        build_vae,
        cache_for,
        dit_lora_targets,
        export_model,
        vae_is_fitted,
    )
    from .flow import LatentItem, dose_to_gy

    if not cfg.model.init_from:
        raise UserError("scardnft post-trains a dose model: set [model] init_from to the Stage B "
                        "model bundle (e.g. runs/stage-b/model)")
    if not Path(cfg.model.init_from).exists():
        raise UserError(f"[model] init_from not found: {cfg.model.init_from}")
    if not vae_is_fitted(cfg):
        raise UserError("scardnft scores decoded doses and needs a fitted VAE: start from a "
                        "model bundle that holds one, or set [model] vae_weights")
    template = scorecard_template(cfg.scardnft.scorecard)
    manifest = scan_dataset(data_dir, cfg.data.val_fraction)
    cache = cache_for(cfg, run_dir)
    vae = build_vae(cfg).to(ctx.device).eval().requires_grad_(False)
    index = cache.require_latents(vae.config.to_dict())
    if {c["name"] for c in index["cases"]} != {c.name for c in manifest.cases}:
        raise UserError(f"the latent cache {cache.folder} was built from other cases than "
                        f"{data_dir}; run `dosepilot train cache` for this dataset")
    dit: DiffKT3D = build_dit(cfg).requires_grad_(False)
    refiner = build_refiner(cfg)
    decoder = vae    # what the engine decodes a prediction with (DoseEngine.codec_decode)
    codec = build_codec(cfg) if refiner is not None else None
    if codec is not None:
        decoder = codec.to(ctx.device).eval().requires_grad_(False)
    targets, modulation = dit_lora_targets(dit)
    policy = lora.attach_lora(dit, targets, cfg.lora.rank, cfg.lora.alpha, modulation)
    geometry = grid_geometry(tuple(index["grid"]))
    norm = index["normalisation"]
    prediction = cfg.diffusion.prediction

    @lru_cache(maxsize=64)
    def conditions(name: str) -> torch.Tensor:
        return cache.read_latents(name)["identity"].to(ctx.device)

    @lru_cache(maxsize=64)
    def case_scoring(name: str):
        vols = cache.read_volumes(name)
        structures = [Structure(s["name"], s["role"], vols.mask(k).numpy(),
                                prescription_gy=s["prescription_gy"])
                      for k, s in enumerate(vols.structure_info)]
        body = vols.volumes[3] > 0
        refine = None
        if refiner is not None:
            try:
                refine = refiner_case(refiner, vols.volumes.numpy(), geometry.spacing,
                                      Normalization.from_dict(norm))
            except ValueError as exc:
                raise UserError(f"case {name}: {exc}") from None
        return (BoundScorecard(template, structures, geometry),
                dose_to_gy(vols.volumes[DOSE_SLOT], norm), body, refine)

    def velocity(model, x_t, sigma, items):
        x = torch.stack([conditions(it.name) for it in items]).clone()
        x[:, DOSE_SLOT] = x_t
        mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        mask[:, DOSE_SLOT] = True
        pred = model(x, sigma, mask)[:, DOSE_SLOT]
        return diffusion.to_velocity(pred.float(), x_t, sigma, prediction)

    def finish(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # as the engine's strip_unreachable_noise: LoRA leaves the heads alone, so the part
        # of the noise they cannot reach is the base model's
        return x0 - unreachable_part(dit, DOSE_SLOT, noise) if prediction == "v" else x0

    def reward(x0, item):
        card, ref, body, refine = case_scoring(item.name)
        with torch.no_grad():
            doses = dose_to_gy(decoder.decode(x0.float())[:, 0], norm)
        if refine is not None:
            doses = torch.from_numpy(refiner.refine(doses.numpy(), *refine))
        totals = torch.tensor([card.score(d.numpy()).total for d in doses])
        mae = torch.stack([(d - ref).abs()[body].mean() for d in doses])
        sc = cfg.scardnft
        return sc.scorecard_weight * totals - sc.mae_weight * mae, mae

    train = [LatentItem(c["name"], ("identity",)) for c in index["cases"]
             if c["split"] == "train"]
    val = [LatentItem(c["name"], ("identity",)) for c in index["cases"] if c["split"] == "val"]
    latent_shape = tuple(conditions(train[0].name).shape[1:]) if train else ()

    def export(out_dir: Path) -> Path:
        lora.save_adapter(policy, Path(out_dir) / "lora")
        merged = lora.merged_copy(policy)
        return export_model(merged, vae, out_dir, cfg, "scardnft", norm,
                            {"data": str(data_dir), "lora_rank": cfg.lora.rank},
                            refiner=refiner)

    task = nft_task(policy, velocity, reward, latent_shape, train, val, cfg, ctx,
                    export=export, data_signature=loop.data_signature([t.name for t in train]),
                    finish=finish)
    return loop.run(task, cfg, run_dir, ctx, resume=resume)
