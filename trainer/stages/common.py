"""What the model stages share: the VAE / DiT built from a preset, LoRA targets, exports.

Paths in a preset (``vae_weights``, ``init_from``, ``cache_dir``) are taken relative to the
working directory. ``[data] cache_dir`` defaults to ``cache/`` next to the run folder, so runs
started side by side (``runs/stage-a``, ``runs/stage-b``) share one cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.cli import UserError
from engine.models import checkpoint as bundles
from engine.models.dit import SLOT_NAMES, DiffKT3D, DiTConfig
from engine.models.dit import preset as dit_preset
from engine.models.vae import VAEConfig, WanVAE

from .. import lora
from ..caches import Cache
from ..config import TrainConfig

DOSE_SLOT = SLOT_NAMES.index("dose")
# seed §B.5: LoRA on all self-attention and FFN linears of the DiT blocks; the modulation MLPs
# (timestep embedder and its projection to the AdaLN vectors) train in full; the rest is frozen.
DIT_LORA_PATTERN = r"blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out)|ffn\.(proj_in|proj_out))"
DIT_MODULATION_PATTERN = r"time_embedder\.linear_[12]|time_proj"


def dit_lora_targets(model: DiffKT3D) -> tuple[list[str], list[str]]:
    """(LoRA target module names, fully trainable modulation module names) of a DiffKT3D."""
    return (lora.matching_modules(model, DIT_LORA_PATTERN, (nn.Linear,)),
            lora.matching_modules(model, DIT_MODULATION_PATTERN, (nn.Linear,)))


def cache_for(cfg: TrainConfig, run_dir: Path) -> Cache:
    return Cache(Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(run_dir).parent /
                 "cache")


# --- VAE ------------------------------------------------------------------------------------

def vae_config(cfg: TrainConfig) -> VAEConfig:
    """The VAE architecture: from the weights file's metadata when it has one, else the preset."""
    if cfg.model.vae_weights:
        path = Path(cfg.model.vae_weights)
        if not path.is_file():
            raise UserError(f"[model] vae_weights not found: {path}")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors has its own error types
            raise UserError(f"[model] vae_weights {path} is not a safetensors file: {exc}"
                            ) from None
        if "vae_config" in meta:
            return VAEConfig.from_json(meta["vae_config"])
    try:
        return VAEConfig.preset(cfg.model.vae)
    except ValueError as exc:
        raise UserError(f"{cfg.source}: [model] vae: {exc}") from None


def build_vae(cfg: TrainConfig) -> WanVAE:
    """The VAE of the preset with its weights (``vae_weights``) or freshly initialised."""
    config = vae_config(cfg)
    if not cfg.model.vae_weights:
        return WanVAE(config)
    from engine.models.vae_weights import load_vae
    try:
        return load_vae(cfg.model.vae_weights, config)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"[model] vae_weights {cfg.model.vae_weights} do not fit VAE "
                        f"{config.name!r}: {exc}") from None


def save_vae(vae: WanVAE, path: Path) -> Path:
    """The VAE's weights (diffusers keys) with its config in the metadata: ``vae_weights``."""
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(tmp), metadata={"vae_config": vae.config.to_json()})
    tmp.replace(path)
    return path


# --- DiT ------------------------------------------------------------------------------------

def dit_config(cfg: TrainConfig) -> DiTConfig:
    try:
        base = dit_preset(cfg.model.dit)
    except ValueError as exc:
        raise UserError(f"{cfg.source}: [model] dit: {exc}") from None
    m = cfg.model
    overrides = {k: v for k, v in (("dim", m.dit_dim), ("num_layers", m.dit_layers),
                                   ("num_heads", m.dit_heads), ("ffn_dim", m.dit_ffn_dim)) if v}
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:
        raise UserError(f"{cfg.source}: [model] DiT sizes: {exc}") from None


def build_dit(cfg: TrainConfig) -> DiffKT3D:
    """The DiT of the preset, initialised from ``init_from`` (a bundle or Wan weights) if set."""
    config = dit_config(cfg)
    model = DiffKT3D(config)
    src = cfg.model.init_from
    if not src:
        return model
    path = Path(src)
    if path.is_dir():
        try:
            document, states = bundles.load_bundle(path)
        except bundles.CheckpointError as exc:
            raise UserError(f"[model] init_from: {exc}") from None
        comp = document["components"].get("dit")
        if comp is None:
            raise UserError(f"[model] init_from {path}: the bundle has no 'dit' component")
        if DiTConfig.from_dict(comp["config"]) != config:
            raise UserError(f"[model] init_from {path}: its DiT is {comp['config']}, but the "
                            f"preset builds {config.to_dict()}")
        model.load_state_dict(states["dit"], strict=True)
        return model
    if not path.is_file():
        raise UserError(f"[model] init_from not found: {path}")
    from engine.models.dit_weights import load_wan_weights
    try:
        load_wan_weights(model, path)
    except (bundles.CheckpointError, ValueError) as exc:
        raise UserError(f"[model] init_from {path}: {exc}") from None
    return model


def export_dit(model: DiffKT3D, run_dir: Path, cfg: TrainConfig, stage: str,
               normalisation: dict, extra_provenance: dict | None = None) -> Path:
    """Write ``RUN_DIR/model`` (a model bundle: DiT weights + config, prediction, provenance)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    provenance = {"stage": stage, "steps": cfg.run.max_steps, "vae": vae_config(cfg).to_dict(),
                  "preset": cfg.source, **(extra_provenance or {})}
    return bundles.save_bundle(
        Path(run_dir) / "model",
        {"dit": bundles.Component("DiffKT3D", model.config.to_dict(), state)},
        normalisation=normalisation, prediction=cfg.diffusion.prediction,
        provenance=json.loads(json.dumps(provenance)))

