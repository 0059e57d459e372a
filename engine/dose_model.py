"""A DiffKT3D dose model loaded from one bundle: DiT + frozen VAE + tiny preview codec.

The bundle (``engine.models.checkpoint``) holds its components — ``dit`` (DiffKT3D), ``vae``
(WanVAE) and, optionally, ``tiny_codec`` (TinyCodec) and ``refiner`` (DoseRefiner, the
correction of the decoded dose around the targets) — plus the modality normalisation that the
features were built with (``bundle.json["normalisation"]``) and the prediction type. Everything
needed to rebuild the networks travels with the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.models import checkpoint
from engine.models.checkpoint import CheckpointError, Component
from engine.models.dit import DiffKT3D, DiTConfig
from engine.models.dose_refiner import DoseRefiner, RefinerConfig
from engine.models.tiny_codec import TinyCodec, TinyCodecConfig
from engine.models.vae import VAEConfig, WanVAE

REQUIRED = ("dit", "vae")


def _build_vae(config: dict) -> WanVAE:
    return WanVAE(VAEConfig.from_dict(config))


def _build_codec(config: dict) -> TinyCodec:
    return TinyCodec(TinyCodecConfig.from_dict(config))


def _build_refiner(config: dict) -> DoseRefiner:
    return DoseRefiner(RefinerConfig.from_dict(config))


ARCHITECTURES: dict = {
    **checkpoint.ARCHITECTURES,
    "WanVAE": _build_vae,
    "TinyCodec": _build_codec,
    "DoseRefiner": _build_refiner,
}


@dataclass
class DoseModel:
    """The networks of one bundle, in eval mode on one device, and what travels with them."""

    dit: DiffKT3D
    vae: WanVAE
    codec: TinyCodec | None
    normalisation: dict
    prediction: str = "v"
    provenance: dict = field(default_factory=dict)
    path: Path | None = None
    refiner: DoseRefiner | None = None

    def to(self, device: torch.device | str) -> DoseModel:
        for module in (self.dit, self.vae, self.codec, self.refiner):
            if module is not None:
                module.to(device)
        return self

    @property
    def quality_warning(self) -> str:
        """What the trainer of this model says it must not be used for ("" when nothing)."""
        return str(self.provenance.get("quality_warning", ""))

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device


def save_dose_model(path: str | Path, dit: DiffKT3D, vae: WanVAE, codec: TinyCodec | None, *,
                    normalisation: dict, prediction: str = "v",
                    provenance: dict | None = None,
                    refiner: DoseRefiner | None = None) -> Path:
    """Write the networks and their metadata as one bundle folder (atomically)."""
    components = {
        "dit": Component("DiffKT3D", dit.config.to_dict(), dit.state_dict()),
        "vae": Component("WanVAE", vae.config.to_dict(), vae.state_dict()),
    }
    if codec is not None:
        components["tiny_codec"] = Component("TinyCodec", codec.config.to_dict(),
                                             codec.state_dict())
    if refiner is not None:
        components["refiner"] = Component("DoseRefiner", refiner.config.to_dict(),
                                          refiner.state_dict())
    return checkpoint.save_bundle(path, components, normalisation=normalisation,
                                  prediction=prediction, provenance=provenance,
                                  architectures=ARCHITECTURES)


def _load(module: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    module.load_state_dict(dict(state), strict=True)
    return module.eval().requires_grad_(False)


def load_dose_model(path: str | Path, device: torch.device | str = "cpu") -> DoseModel:
    """Load and check a bundle; :class:`CheckpointError` names what is missing or wrong."""
    document, states = checkpoint.load_bundle(path, architectures=ARCHITECTURES)
    comps = document["components"]
    missing = [name for name in REQUIRED if name not in comps]
    if missing:
        raise CheckpointError(f"bundle {path}: {checkpoint.BUNDLE_JSON}: not a dose model, it "
                              f"lacks {missing} (has {sorted(comps)})")
    expected = {"dit": "DiffKT3D", "vae": "WanVAE", "tiny_codec": "TinyCodec",
                "refiner": "DoseRefiner"}
    for name, kind in expected.items():
        if name in comps and comps[name]["kind"] != kind:
            raise CheckpointError(f"bundle {path}: {checkpoint.BUNDLE_JSON}: component {name!r} "
                                  f"is a {comps[name]['kind']}, expected {kind}")
    dit = _load(DiffKT3D(DiTConfig.from_dict(comps["dit"]["config"])), states["dit"])
    vae = _load(_build_vae(comps["vae"]["config"]), states["vae"])
    codec = None
    if "tiny_codec" in comps:
        codec = _load(_build_codec(comps["tiny_codec"]["config"]), states["tiny_codec"])
    if codec is not None and codec.config.z_dim != vae.config.z_dim:
        raise CheckpointError(f"bundle {path}: tiny codec z_dim {codec.config.z_dim} != VAE "
                              f"z_dim {vae.config.z_dim}")
    if dit.config.in_channels != vae.config.z_dim:
        raise CheckpointError(f"bundle {path}: DiT in_channels {dit.config.in_channels} != VAE "
                              f"z_dim {vae.config.z_dim}")
    refiner = None
    if "refiner" in comps:
        refiner = _load(_build_refiner(comps["refiner"]["config"]), states["refiner"])
    model = DoseModel(dit=dit, vae=vae, codec=codec,
                      normalisation=document.get("normalisation", {}),
                      prediction=document.get("prediction", "v"),
                      provenance=document.get("provenance", {}), path=Path(path),
                      refiner=refiner)
    return model.to(device)
