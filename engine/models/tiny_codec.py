"""A tiny preview codec into the Wan VAE's normalised latent space (the TAESD / TAEHV idea).

Public API (the runtime and the trainer rely on these names):

- ``TinyCodecConfig``: frozen dataclass (JSON round trip), ``TinyCodecConfig.preset(name)``.
- ``TinyCodec(config)``: ``encode(x) -> z`` with ``x`` ``[B, 1, D, H, W]`` in [-1, 1] and ``z``
  ``[B, 16, 1 + (D - 1) // 4, H / 8, W / 8]`` on the VAE's grid and in its *normalised* latent
  space; ``decode(z) -> [B, 1, 1 + 4 (d - 1), 8 h, 8 w]`` in [-1, 1] (``clamp=False`` for
  training). D must be ``1 + 4k``; H, W multiples of 8.
- ``distillation_targets(vae, volumes)`` and ``distillation_loss(codec, vae, volumes, ...)``:
  the distillation objective against a frozen ``WanVAE``.

Layout. The full-resolution volume is never convolved: the encoder regroups each 4 x 8 x 8 block
of voxels into 256 channels of one latent voxel (space-to-depth; the depth is first padded in
front with 3 copies of slice 0, so the block of latent frame 0 holds slice 0 only and that of
frame i slices 4i-3..4i, the VAE's causal grouping), then mixes channels and neighbouring
blocks at latent resolution (not causally: the codec only has to agree with the VAE). The
decoder mirrors it with two depth-to-space steps (2x2x2, then 2x4x4) and one convolution at
the intermediate scale to smooth block edges. The residual blocks separate spatial (1x3x3) and
depth (3x1x1) convolutions. Cost and speed against the VAE: ``benchmarks/bench_vae.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.models.vae import CL3D, SPATIAL_FACTOR, TEMPORAL_FACTOR, WanVAE, conv3d

FRONT_PAD = TEMPORAL_FACTOR - 1
BLOCK = TEMPORAL_FACTOR * SPATIAL_FACTOR * SPATIAL_FACTOR  # voxels per latent voxel
# Model slots (DESIGN §3): CT, PTV, OAR, body, dose, beam plate, angle plate. The dose is what
# the preview shows, so its reconstruction weighs most.
DEFAULT_MODALITY_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 4.0, 1.0, 1.0)


@dataclass(frozen=True)
class TinyCodecConfig:
    """Sizes of the tiny codec. ``hidden``: channels at latent resolution; ``mid``: channels
    at the decoder's intermediate (2x) scale; ``*_blocks``: residual blocks."""

    name: str = "custom"
    z_dim: int = 16
    hidden: int = 64
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    mid: int = 16
    # Per-channel map from the latent space the weights were distilled in to the one the codec
    # serves, ``z_served = z_distilled * latent_scale + latent_shift`` (empty = identity): lets a
    # distilled codec serve a DiT trained on the same VAE with other latent statistics.
    latent_scale: tuple[float, ...] = ()
    latent_shift: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_scale", tuple(float(v) for v in self.latent_scale))
        object.__setattr__(self, "latent_shift", tuple(float(v) for v in self.latent_shift))
        if min(self.z_dim, self.hidden, self.mid) < 1 or min(self.encoder_blocks,
                                                             self.decoder_blocks) < 0:
            raise ValueError(f"TinyCodecConfig {self.name!r}: sizes must be positive")
        if len(self.latent_scale) != len(self.latent_shift) or (
                self.latent_scale and (len(self.latent_scale) != self.z_dim
                                       or min(self.latent_scale) <= 0)):
            raise ValueError(f"TinyCodecConfig {self.name!r}: latent_scale and latent_shift "
                             f"must both be empty or hold {self.z_dim} values (scales > 0)")

    @staticmethod
    def preset(name: str) -> TinyCodecConfig:
        try:
            return CODEC_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown tiny codec preset {name!r}; known: "
                             f"{sorted(CODEC_PRESETS)}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyCodecConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"TinyCodecConfig: unknown fields {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TinyCodecConfig:
        return cls.from_dict(json.loads(text))


CODEC_PRESETS: dict[str, TinyCodecConfig] = {
    "preview": TinyCodecConfig(name="preview"),
}


class _Conv(nn.Conv3d):
    """A same-size conv3d (odd kernels, zero padding) through the fast inference path."""

    def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int]) -> None:
        super().__init__(in_dim, out_dim, kernel, padding=tuple(k // 2 for k in kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(x, self.weight, self.bias, self.stride, self.padding)


class _Block(nn.Module):
    """Residual block: SiLU, 1x3x3 conv, SiLU, 3x1x1 conv (the last one starts at zero)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.spatial = _Conv(dim, dim, (1, 3, 3))
        self.depth = _Conv(dim, dim, (3, 1, 1))
        nn.init.zeros_(self.depth.weight)
        nn.init.zeros_(self.depth.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.depth(F.silu(self.spatial(F.silu(x))))


def space_to_depth(x: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    """``[B, C, D, H, W] -> [B, C * fd * fh * fw, D / fd, H / fh, W / fw]`` (channels-last)."""
    b, c, d, h, w = x.shape
    fd, fh, fw = factors
    y = x.reshape(b, c, d // fd, fd, h // fh, fh, w // fw, fw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return y.reshape(b, d // fd, h // fh, w // fw, c * fd * fh * fw).permute(0, 4, 1, 2, 3)


def depth_to_space(x: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of ``space_to_depth``."""
    b, c, d, h, w = x.shape
    fd, fh, fw = factors
    out = c // (fd * fh * fw)
    y = x.permute(0, 2, 3, 4, 1).reshape(b, d, h, w, out, fd, fh, fw)
    y = y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, d * fd, h * fh, w * fw, out)
    return y.permute(0, 4, 1, 2, 3)


class TinyEncoder(nn.Module):
    def __init__(self, cfg: TinyCodecConfig) -> None:
        super().__init__()
        self.conv_in = _Conv(BLOCK, cfg.hidden, (1, 1, 1))
        self.blocks = nn.ModuleList([_Block(cfg.hidden) for _ in range(cfg.encoder_blocks)])
        self.conv_out = _Conv(cfg.hidden, cfg.z_dim, (3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, :, :1].expand(-1, -1, FRONT_PAD, -1, -1), x], dim=2)
        x = space_to_depth(x, (TEMPORAL_FACTOR, SPATIAL_FACTOR, SPATIAL_FACTOR))
        x = self.conv_in(x.contiguous(memory_format=CL3D))
        for block in self.blocks:
            x = block(x)
        return self.conv_out(F.silu(x))


class TinyDecoder(nn.Module):
    def __init__(self, cfg: TinyCodecConfig) -> None:
        super().__init__()
        self.conv_in = _Conv(cfg.z_dim, cfg.hidden, (3, 3, 3))
        self.blocks = nn.ModuleList([_Block(cfg.hidden) for _ in range(cfg.decoder_blocks)])
        self.to_mid = _Conv(cfg.hidden, cfg.mid * 8, (1, 1, 1))
        self.mid_conv = _Conv(cfg.mid, cfg.mid, (3, 3, 3))
        self.conv_out = _Conv(cfg.mid, BLOCK // 8, (1, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in self.blocks:
            x = block(x)
        x = depth_to_space(self.to_mid(F.silu(x)), (2, 2, 2)).contiguous(memory_format=CL3D)
        x = self.conv_out(F.silu(self.mid_conv(F.silu(x))))
        x = depth_to_space(x, (TEMPORAL_FACTOR // 2, SPATIAL_FACTOR // 2, SPATIAL_FACTOR // 2))
        return x[:, :, FRONT_PAD:]


class TinyCodec(nn.Module):
    """Tiny encoder + decoder to and from the VAE's normalised latents (module docstring)."""

    def __init__(self, config: TinyCodecConfig | None = None) -> None:
        super().__init__()
        self.config = config or TinyCodecConfig.preset("preview")
        self.encoder = TinyEncoder(self.config)
        self.decoder = TinyDecoder(self.config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 1 + 4k, H, W]`` in [-1, 1] -> normalised latent ``[B, z, 1 + k, H/8, W/8]``."""
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected a [B, 1, D, H, W] volume, got {_describe(x)}")
        depth, height, width = x.shape[2:]
        if (depth - 1) % TEMPORAL_FACTOR or height % SPATIAL_FACTOR or width % SPATIAL_FACTOR:
            raise ValueError(f"volume {depth}x{height}x{width}: the tiny codec needs depth 1 + 4k "
                             f"and height, width multiples of {SPATIAL_FACTOR}")
        z = self.encoder(x.float())
        if self.config.latent_scale:
            scale, shift = self._affine(z)
            z = z * scale + shift
        return z

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latent ``[B, z, d, h, w]`` -> ``[B, 1, 1 + 4 (d - 1), 8 h, 8 w]``."""
        if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"expected a [B, {self.config.z_dim}, d, h, w] latent, got "
                             f"{_describe(z)}")
        z = z.float()
        if self.config.latent_scale:
            scale, shift = self._affine(z)
            z = (z - shift) / scale
        out = self.decoder(z.contiguous(memory_format=CL3D))
        return out.clamp(-1.0, 1.0) if clamp else out

    def _affine(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        return (torch.tensor(self.config.latent_scale, device=z.device).view(shape),
                torch.tensor(self.config.latent_shift, device=z.device).view(shape))


class DistillationTargets(NamedTuple):
    """What the frozen VAE makes of a batch: per modality, normalised latents
    ``[B, M, z, d, h, w]`` and the VAE's decoding of them ``[B, M, D, H, W]``."""

    latents: torch.Tensor
    decoded: torch.Tensor


class DistillationLoss(NamedTuple):
    total: torch.Tensor  # scalar: weighted mean of encoder + decoder terms
    encoder: torch.Tensor  # [M] per-modality latent MSE
    decoder: torch.Tensor  # [M] per-modality volume MSE


@torch.no_grad()
def distillation_targets(vae: WanVAE, volumes: torch.Tensor) -> DistillationTargets:
    """Run the frozen VAE on every modality of ``volumes`` ``[B, M, D, H, W]`` (in [-1, 1])."""
    b, m = volumes.shape[:2]
    flat = volumes.reshape(b * m, 1, *volumes.shape[2:])
    latents = vae.encode(flat)
    decoded = vae.decode(latents)
    return DistillationTargets(latents.reshape(b, m, *latents.shape[1:]),
                               decoded.reshape(b, m, *decoded.shape[2:]))


def distillation_loss(codec: TinyCodec, vae: WanVAE | None, volumes: torch.Tensor,
                      weights: tuple[float, ...] = DEFAULT_MODALITY_WEIGHTS,
                      targets: DistillationTargets | None = None) -> DistillationLoss:
    """Distillation objective of the tiny codec against a frozen VAE.

    ``volumes``: ``[B, M, D, H, W]`` in [-1, 1], ``M == len(weights)`` modalities in slot
    order. The encoder regresses the VAE's normalised latents (MSE) and the decoder, fed those
    same latents, the VAE's decoded volumes (MSE); both terms are averaged over modalities with
    ``weights``. ``targets`` (from ``distillation_targets``, e.g. cached) skips the VAE, which
    may then be ``None``. No parameter is updated here; the VAE is never differentiated.
    """
    if volumes.ndim != 5 or volumes.shape[1] != len(weights):
        raise ValueError(f"expected volumes [B, {len(weights)}, D, H, W], got "
                         f"{tuple(volumes.shape)}")
    if targets is None:
        if vae is None:
            raise ValueError("distillation_loss needs the frozen VAE or precomputed targets")
        targets = distillation_targets(vae, volumes)
    b, m = volumes.shape[:2]
    z = codec.encode(volumes.reshape(b * m, 1, *volumes.shape[2:]))
    z = z.reshape(b, m, *z.shape[1:])
    rec = codec.decode(targets.latents.reshape(b * m, *targets.latents.shape[2:]), clamp=False)
    rec = rec.reshape(b, m, *rec.shape[2:])
    enc = (z - targets.latents).square().mean(dim=(0, 2, 3, 4, 5))
    dec = (rec - targets.decoded).square().mean(dim=(0, 2, 3, 4))
    w = torch.tensor(weights, dtype=enc.dtype, device=enc.device)
    total = ((enc + dec) * w).sum() / w.sum()
    return DistillationLoss(total, enc, dec)


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
