"""Stage ``distill``: the tiny preview codec learns the frozen VAE (DESIGN §4).

Encoder to the VAE's normalised latents, decoder to the VAE's decoding of those latents, dose
weighted most (``engine.models.tiny_codec.distillation_loss``). Exports
``RUN_DIR/tiny_codec.safetensors`` with its config in the metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.durable import replacing
from engine.models.tiny_codec import TinyCodec, TinyCodecConfig, distillation_loss

from .. import loop
from ..config import TrainConfig
from ..distributed import DistContext
from .common import DOSE_SLOT, build_vae, cache_for
from .volumes import augment_of, augmented_stack, random_crop, volume_items


def run(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, ctx: DistContext) -> dict:
    from engine.errors import UserError
    cache = cache_for(cfg, run_dir)
    try:
        codec = TinyCodec(TinyCodecConfig.preset(cfg.model.codec))
    except ValueError as exc:
        raise UserError(f"{cfg.source}: [model] codec: {exc}") from None
    vae = build_vae(cfg).to(ctx.device).eval().requires_grad_(False)
    train, val, _ = volume_items(cfg, data_dir, cache, ctx)
    augment = augment_of(cfg)

    def loss(m, names, gens):
        volumes = torch.stack([random_crop(augmented_stack(cache, n, augment, g),
                                           cfg.data.crop, g)
                               for n, g in zip(names, gens)]).to(ctx.device)
        out = distillation_loss(getattr(m, "module", m), vae, volumes)
        return out.total, {"encoder_mse": out.encoder.mean().item(),
                           "decoder_mse": out.decoder.mean().item(),
                           "decoder_mse_dose": out.decoder[DOSE_SLOT].item()}

    def evaluate(m, names):
        totals = [distillation_loss(m, vae, augmented_stack(cache, n, augment, None)[None]
                                    .to(ctx.device)) for n in names]
        return {"val_loss": sum(t.total.item() for t in totals) / len(totals),
                "val_decoder_mse_dose": sum(t.decoder[DOSE_SLOT].item() for t in totals)
                / len(totals)}

    def export(out_dir: Path) -> Path:
        path = Path(out_dir) / "tiny_codec.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in codec.state_dict().items()}
        with replacing(path) as tmp:
            save_file(state, str(tmp), metadata={"codec_config": codec.config.to_json(),
                                                 "vae_config": vae.config.to_json()})
        return path

    task = loop.Task(stage="distill", model=codec, params=list(codec.parameters()),
                     train_items=train, val_items=val, loss=loss, evaluate=evaluate,
                     export=export, data_signature=loop.data_signature(train))
    return loop.run(task, cfg, run_dir, ctx, resume=resume)
