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

from engine.dose_model import ARCHITECTURES, save_dose_model
from engine.durable import replacing
from engine.errors import UserError
from engine.models import checkpoint as bundles
from engine.models.dit import SLOT_NAMES, DiffKT3D, DiTConfig
from engine.models.dit import preset as dit_preset
from engine.models.dose_refiner import DoseRefiner
from engine.models.tiny_codec import TinyCodec, TinyCodecConfig
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

def _init_bundle(cfg: TrainConfig) -> Path | None:
    path = Path(cfg.model.init_from) if cfg.model.init_from else None
    return path if path is not None and path.is_dir() else None


def _read_bundle(path: Path) -> tuple[dict, dict]:
    try:
        return bundles.load_bundle(path, architectures=ARCHITECTURES)
    except bundles.CheckpointError as exc:
        raise UserError(f"[model] init_from: {exc}") from None


def vae_config(cfg: TrainConfig) -> VAEConfig:
    """The VAE architecture: from ``vae_weights`` (its metadata), else from the ``init_from``
    bundle's VAE, else the preset."""
    bundle = _init_bundle(cfg)
    if not cfg.model.vae_weights and bundle is not None:
        bundled = _bundle_vae_config(bundle)
        if bundled is not None:
            return bundled
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
        if (path.parent / bundles.BUNDLE_JSON).is_file():
            # a bundle's vae.safetensors carries no metadata: its configuration, latent
            # statistics included, is in the bundle.json beside it
            bundled = _bundle_vae_config(path.parent, weights=path.name)
            if bundled is not None:
                return bundled
    try:
        return VAEConfig.preset(cfg.model.vae)
    except ValueError as exc:
        raise UserError(f"{cfg.source}: [model] vae: {exc}") from None


def _bundle_vae_config(bundle: Path, weights: str | None = None) -> VAEConfig | None:
    """The VAE configuration in ``bundle``'s bundle.json (None without a VAE component, or when
    ``weights`` is given and is not that component's file)."""
    comp = bundles.read_bundle_config(bundle)["components"].get("vae")
    if comp is None or (weights is not None and comp["weights"] != weights):
        return None
    return VAEConfig.from_dict(comp["config"])


def vae_is_fitted(cfg: TrainConfig) -> bool:
    """Whether the VAE has real weights (``vae_weights`` or the ``init_from`` bundle's)."""
    bundle = _init_bundle(cfg)
    return bool(cfg.model.vae_weights) or (
        bundle is not None and "vae" in bundles.read_bundle_config(bundle)["components"])


def build_vae(cfg: TrainConfig) -> WanVAE:
    """The VAE: ``vae_weights``, else the ``init_from`` bundle's, else freshly initialised."""
    config = vae_config(cfg)
    bundle = _init_bundle(cfg)
    if not cfg.model.vae_weights:
        vae = WanVAE(config)
        if bundle is not None and vae_is_fitted(cfg):
            vae.load_state_dict(_read_bundle(bundle)[1]["vae"], strict=True)
        return vae
    from engine.models.vae_weights import load_vae
    try:
        return load_vae(cfg.model.vae_weights, config)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"[model] vae_weights {cfg.model.vae_weights} do not fit VAE "
                        f"{config.name!r}: {exc}") from None


def save_vae(vae: WanVAE, path: Path) -> Path:
    """The VAE's weights (diffusers keys) with its config in the metadata: ``vae_weights``."""
    state = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    with replacing(path) as tmp:
        save_file(state, str(tmp), metadata={"vae_config": vae.config.to_json()})
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
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    src = cfg.model.init_from
    if not src:
        return model
    path = Path(src)
    if path.is_dir():
        document, states = _read_bundle(path)
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


def _bundle_component(cfg: TrainConfig, name: str) -> nn.Module | None:
    """Component ``name`` of the ``init_from`` bundle, or None (no bundle, or none in it)."""
    bundle = _init_bundle(cfg)
    if bundle is None:
        return None
    document, states = _read_bundle(bundle)
    if name not in document["components"]:
        return None
    return bundles.build_component(document, states, name, ARCHITECTURES)


def build_codec(cfg: TrainConfig) -> TinyCodec | None:
    """The distilled preview codec: ``codec_weights``, else the ``init_from`` bundle's, else
    None (a bundle without one)."""
    if not cfg.model.codec_weights:
        return _bundle_component(cfg, "tiny_codec")
    path = Path(cfg.model.codec_weights)
    try:
        with safe_open(str(path), "pt") as f:
            config = TinyCodecConfig.from_json((f.metadata() or {})["codec_config"])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise UserError(f"[model] codec_weights not found: {path}") from None
    except Exception as exc:  # safetensors' own errors, missing metadata
        raise UserError(f"[model] codec_weights {path} is not a distilled codec: {exc}") from None
    codec = TinyCodec(config)
    codec.load_state_dict(state, strict=True)
    return codec


def build_refiner(cfg: TrainConfig) -> DoseRefiner | None:
    """The ``init_from`` bundle's dose refiner, else None."""
    refiner = _bundle_component(cfg, "refiner")
    return refiner.eval() if refiner is not None else None


def export_model(dit: DiffKT3D, vae: WanVAE, run_dir: Path, cfg: TrainConfig, stage: str,
                 normalisation: dict, extra_provenance: dict | None = None,
                 codec: TinyCodec | None = None, refiner: DoseRefiner | None = None) -> Path:
    """Write ``RUN_DIR/model``: the bundle the engine runtime loads (DiT + VAE + codec, and
    ``refiner`` when given; the codec is ``codec``, else the configured one of
    :func:`build_codec`)."""
    provenance = {"stage": stage, "steps": cfg.run.max_steps, "preset": cfg.source,
                  "init_from": cfg.model.init_from, **(extra_provenance or {})}
    cpu = {k: v.detach().cpu().contiguous() for k, v in dit.state_dict().items()}
    plain = DiffKT3D(dit.config)
    plain.load_state_dict(cpu)
    codec = codec.cpu() if codec is not None else build_codec(cfg)
    return save_dose_model(Path(run_dir) / "model", plain, vae.cpu(), codec,
                           normalisation=normalisation, prediction=cfg.diffusion.prediction,
                           provenance=json.loads(json.dumps(provenance)),
                           refiner=refiner.cpu() if refiner is not None else None)
