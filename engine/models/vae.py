"""The Wan 2.1 causal 3D VAE with a whole-volume forward pass.

Public API (the runtime and the trainer rely on these names):

- ``VAEConfig``: frozen dataclass describing one architecture (+ its latent statistics);
  ``VAEConfig.preset(name)`` for the shipped presets (``PRESETS``), ``to_json`` / ``from_json``.
- ``WanVAE(config)``: the model (an ``nn.Module``, float32).
  - ``encode(x) -> z``: ``x`` is ``[B, 1, D, H, W]`` in [-1, 1] (one modality, depth first);
    ``z`` is the *normalised* latent ``(mu - latents_mean) / latents_std``,
    ``[B, z_dim, 1 + (D - 1) // 4, H / 8, W / 8]``.
  - ``decode(z) -> x``: the inverse direction, ``[B, 1, 1 + 4 (d - 1), 8 h, 8 w]`` in [-1, 1].
  - ``encode_moments(x) -> (mu, logvar)``: raw (un-normalised) posterior, for VAE fitting.
  - ``decode_raw(mu, clamp=True) -> [B, out_channels, ...]``: the raw decoder.
  - ``normalize_latent(mu)`` / ``denormalize_latent(z)``: between the two latent spaces.
- ``latent_shape(depth, height, width, config)`` / ``decoded_depth(latent_depth)``: the grid
  arithmetic (97 x 128 x 160 -> 25 x 16 x 20).
- ``compute_latent_stats(mus)``: per-channel statistics for a small config fitted here
  (``VAEConfig.with_latent_stats``).

Depth is the VAE's causal "time" axis. The reference implementation (diffusers'
``AutoencoderKLWan``, bit-identical to the official Wan code) runs the encoder over chunks of
frames (first frame alone, then groups of 4) and the decoder one latent frame at a time,
carrying a cache of the last two frames of every causal convolution. This module computes the
same function in one pass over the whole volume:

- every causal 3x3x3 convolution is one ``conv3d`` over the whole depth with two zero frames in
  front (implemented as symmetric padding whose two trailing output frames are dropped);
- temporal downsampling (encoder) keeps frame 0 as is and applies the stride-2 temporal conv
  to the whole (unpadded) sequence: output ``[f0, conv(f0,f1,f2), conv(f2,f3,f4), ...]``;
- temporal upsampling (decoder) keeps frame 0 as is and applies the causal temporal conv, with
  two zero frames in front, to frames ``1..``, each output frame becoming two;
- per-frame 2D ops (spatial resampling convs, mid-block attention) run on all frames at once.

Depths that are not ``1 + 4k``: the reference drops the trailing ``(D - 1) % 4`` slices
(its chunk loop never reaches them); ``encode`` does the same and warns. Callers that must keep
every slice pad the volume to ``1 + 4k`` first (the model grid's 97 already is).

CPU speed (the function is unchanged): activations are channels-last-3d; inference convolutions
go straight to oneDNN (``conv3d``); norms and activations write in place where the input is a
temporary; nearest-2x-upsample + 3x3 conv runs as four 2x2 phase convolutions
(``upsample_conv``). ``engine.cpu_tuning.tune_cpu`` (allocator, threads) matters as much; see
``benchmarks/bench_vae.py`` and ``benchmarks/RESULTS.md``.

One channel in, one out: the weights keep Wan's 3 input / 3 output channels so that official
checkpoints load unchanged. A 1-channel volume is repeated to the 3 input channels (folding
``conv_in`` over its input channels is the same function, but PyTorch runs a 1-input-channel
conv3d on its slow reference kernel: the repeat is 3-5x faster here, and bit-faithful to the
reference). Decoding clamps each of the 3 output channels to [-1, 1], as the reference does, and
returns their mean (folding ``conv_out`` instead would not commute with the clamp).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

CL3D = torch.channels_last_3d
TEMPORAL_FACTOR = 4
SPATIAL_FACTOR = 8


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a Wan 2.1-style causal 3D VAE plus its latent normalisation statistics.

    Field names follow diffusers' ``AutoencoderKLWan`` (``temperal_downsample`` is spelled as
    there). ``latents_mean`` / ``latents_std`` (length ``z_dim``) map the raw posterior mean to
    the normalised latent the DiT sees; small configs trained here carry their own statistics
    (``with_latent_stats``), the defaults 0 / 1 mean "not fitted yet".
    """

    name: str = "custom"
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = field(default=(0.0,) * 16)
    latents_std: tuple[float, ...] = field(default=(1.0,) * 16)

    def __post_init__(self) -> None:
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1:
            raise ValueError(
                f"VAEConfig {self.name!r}: base_dim, z_dim, num_res_blocks must be >= 1"
            )
        if len(self.dim_mult) != 4 or tuple(self.temperal_downsample) != (False, True, True):
            raise ValueError(
                f"VAEConfig {self.name!r}: only the Wan 2.1 layout is supported (4 stages, "
                f"temperal_downsample (False, True, True): 8x spatial, 4x depth); got dim_mult "
                f"{self.dim_mult} and temperal_downsample {self.temperal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"VAEConfig {self.name!r}: latents_mean/std need {self.z_dim} values, got "
                f"{len(self.latents_mean)} / {len(self.latents_std)}"
            )
        if any(s <= 0 for s in self.latents_std):
            raise ValueError(f"VAEConfig {self.name!r}: latents_std must be positive")

    @staticmethod
    def preset(name: str) -> VAEConfig:
        """A shipped configuration by name (see ``PRESETS``)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown VAE preset {name!r}; known: {sorted(PRESETS)}") from None

    def with_latent_stats(self, mean: Any, std: Any) -> VAEConfig:
        """A copy with fitted per-channel latent statistics (sequences of ``z_dim`` floats)."""
        return replace(self, latents_mean=tuple(float(v) for v in mean),
                       latents_std=tuple(float(v) for v in std))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"VAEConfig: unknown fields {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VAEConfig:
        return cls.from_dict(json.loads(text))

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Constructor arguments for diffusers' ``AutoencoderKLWan`` with the same architecture."""
        return dict(
            base_dim=self.base_dim, z_dim=self.z_dim, dim_mult=list(self.dim_mult),
            num_res_blocks=self.num_res_blocks, temperal_downsample=list(self.temperal_downsample),
            in_channels=self.in_channels, out_channels=self.out_channels,
            latents_mean=list(self.latents_mean), latents_std=list(self.latents_std),
        )


PRESETS: dict[str, VAEConfig] = {
    # The official Wan 2.1 VAE (126.9 M parameters): what real pretrained weights load into.
    "wan2.1": VAEConfig(name="wan2.1", latents_mean=WAN21_LATENTS_MEAN,
                        latents_std=WAN21_LATENTS_STD),
    # Same architecture, sized for 2-core CPUs (notes/cpu-performance.md sizing table).
    "cpu8": VAEConfig(name="cpu8", base_dim=8, num_res_blocks=1),
    "cpu12": VAEConfig(name="cpu12", base_dim=12, num_res_blocks=1),
}


def latent_shape(depth: int, height: int, width: int, config: VAEConfig) -> tuple[int, ...]:
    """Latent shape ``(z_dim, d, h, w)`` for a ``depth x height x width`` volume (voxels)."""
    if depth < 1 or height % SPATIAL_FACTOR or width % SPATIAL_FACTOR:
        raise ValueError(
            f"volume {depth}x{height}x{width}: need depth >= 1 and height, width multiples of "
            f"{SPATIAL_FACTOR}"
        )
    return (config.z_dim, 1 + (depth - 1) // TEMPORAL_FACTOR, height // SPATIAL_FACTOR,
            width // SPATIAL_FACTOR)


def decoded_depth(latent_depth: int) -> int:
    """Depth (voxels) that ``latent_depth`` latent frames decode to."""
    return 1 + TEMPORAL_FACTOR * (latent_depth - 1)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           stride: tuple[int, int, int] = (1, 1, 1),
           padding: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """``F.conv3d``, routed to oneDNN for CPU inference.

    PyTorch's heuristic sends small volumes (the latent-level layers) and some shapes to its
    slow reference kernel, 2-3x slower than oneDNN here; the oneDNN op has no autograd
    formula, so training keeps ``F.conv3d``.
    """
    if (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available()):
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, stride, padding)


def _silu(x: torch.Tensor) -> torch.Tensor:
    # In place when no graph is recorded: saves one full-size allocation per activation.
    return F.silu(x, inplace=not torch.is_grad_enabled())


class CausalConv3d(nn.Conv3d):
    """Conv3d, causal along depth: ``padding=(p, q, r)`` means ``2p`` zero frames in front only.

    Implemented as symmetric depth padding ``2p`` with the trailing ``2p`` outputs dropped: the
    kept outputs see exactly ``[zeros(2p), x]`` and no extra copy of the input is made.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1,
                 padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=0)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self._front = 2 * p[0]
        self._pad = (self._front, p[1], p[2])
        if self._front and self.stride[0] != 1:
            raise ValueError("causal padding with a temporal stride is not part of this model")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = conv3d(x, self.weight, self.bias, self.stride, self._pad)
        if self._front:
            y = y[:, :, : y.shape[2] - self._front]
        return y


class RMSNorm(nn.Module):
    """Wan's channel RMS norm: ``normalize(x, dim=1) * sqrt(C) * gamma``."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        # == F.normalize(x, dim=1) * scale * gamma. Channels-last: the channel reduction runs
        # over contiguous memory, and the products are written into a channels-last output
        # (a plain ``x * inv`` picks a channels-first output here, 5-8x slower).
        inv = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12).reciprocal_() \
            if not torch.is_grad_enabled() else \
            torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12).reciprocal()
        gain = (self.gamma.reshape(1, -1, 1, 1, 1) if x.ndim == 5 else self.gamma) * self.scale
        if torch.is_grad_enabled():
            return x * inv * gain
        out = x if inplace else torch.empty_like(x)
        return torch.mul(x, inv, out=out).mul_(gain)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(_silu(self.norm1(x)))
        x = self.conv2(_silu(self.norm2(x, inplace=True)))
        return x.add_(h) if not torch.is_grad_enabled() else x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention within each depth slice (over its H x W positions)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        qkv = F.linear(tokens, self.to_qkv.weight.flatten(1), self.to_qkv.bias)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = F.linear(out, self.proj.weight.flatten(1), self.proj.bias)
        return x + out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Resample(nn.Module):
    """Spatial 2x down/up-sampling, optionally with Wan's causal temporal 2x down/up-sampling.

    ``resample.1`` holds the per-slice 2D conv (index 0 was a padding / upsampling layer in
    the reference; it has no weights), ``time_conv`` the temporal conv: names match both
    checkpoint formats.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, out_dim or dim // 2, 3,
                                                                   padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.resample[1]
        weight = conv.weight.unsqueeze(2)
        if self.mode.startswith("up"):
            if self.mode == "upsample3d" and x.shape[2] > 1:
                x = torch.cat([x[:, :, :1], self._time_upsample(x[:, :, 1:])], dim=2)
            return upsample_conv(x, conv.weight, conv.bias)
        x = conv3d(F.pad(x, (0, 1, 0, 1)), weight, conv.bias, stride=(1, 2, 2))
        if self.mode == "downsample3d" and x.shape[2] > 1:
            x = torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        return x

    def _time_upsample(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.time_conv(x).reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)
        return y.reshape(b, c, 2 * t, h, w).contiguous(memory_format=CL3D)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling of H and W followed by a 3x3 conv (padding 1), per depth slice.

    Computed without materialising the upsampled volume: output pixel ``(2i + a, 2j + b)``
    only sees input rows ``i - 1 + a .. i + a`` and columns ``j - 1 + b .. j + b``, so each of
    the four phases ``(a, b)`` is a 2x2 conv on the input whose taps are sums of the 3x3 taps
    (2.25x fewer multiply-adds than convolving the upsampled volume).
    """
    w0, w1, w2 = weight.unbind(2)  # kernel rows at offsets -1, 0, +1
    kernels = []
    for rows in (torch.stack([w0, w1 + w2], 2), torch.stack([w0 + w1, w2], 2)):  # phase a
        c0, c1, c2 = rows.unbind(3)
        kernels += [torch.stack([c0, c1 + c2], 3), torch.stack([c0 + c1, c2], 3)]  # phase b
    cout = weight.shape[0]
    y = conv3d(x, torch.cat(kernels).unsqueeze(2), bias.repeat(4), padding=(0, 1, 1))
    b, _, t, h, w = x.shape
    out = torch.empty((b, cout, t, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                      memory_format=CL3D)
    for index, (pa, pb) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, :, pa::2, pb::2] = y[:, index * cout:(index + 1) * cout, :, pa:pa + h, pb:pb + w]
    return out


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.conv_in.in_channels != 1:
            x = x.expand(-1, self.conv_in.in_channels, -1, -1, -1).contiguous(memory_format=CL3D)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(_silu(self.norm_out(x, inplace=True)))


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim) for d in dims])
        self.upsamplers = nn.ModuleList([Resample(out_dim, mode)]) if mode else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsampler halves the channels
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(_silu(self.norm_out(x, inplace=True)))


class WanVAE(nn.Module):
    """Wan 2.1 causal 3D VAE (see the module docstring for the API and conventions).

    Parameter names equal diffusers' ``AutoencoderKLWan`` state-dict keys, so a diffusers state
    dict loads with ``load_state_dict(strict=True)``; official Wan checkpoints load through
    ``engine.models.vae_weights``.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std).view(1, -1, 1, 1, 1),
                             persistent=False)

    # -- checks ---------------------------------------------------------------------------
    def _check_volume(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            raise ValueError(f"expected a [B, C, D, H, W] tensor, got {_describe(x)}")
        if x.shape[1] not in (1, self.config.in_channels):
            raise ValueError(f"expected 1 or {self.config.in_channels} channels, got {x.shape[1]}")
        _, _, depth, height, width = x.shape
        if height % SPATIAL_FACTOR or width % SPATIAL_FACTOR:
            raise ValueError(f"height and width must be multiples of {SPATIAL_FACTOR}, got "
                             f"{height}x{width}")
        usable = decoded_depth(1 + (depth - 1) // TEMPORAL_FACTOR)
        if usable != depth:
            warnings.warn(
                f"depth {depth} is not 1 + 4k: the last {depth - usable} slice(s) are dropped, as "
                f"in the reference Wan VAE; pad to {usable + TEMPORAL_FACTOR} to keep them",
                stacklevel=3,
            )
            x = x[:, :, :usable]
        return x.to(dtype=torch.float32, memory_format=CL3D)

    def _check_latent(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"expected a [B, {self.config.z_dim}, d, h, w] latent, got "
                             f"{_describe(z)}")
        return z.to(dtype=torch.float32, memory_format=CL3D)

    # -- raw model ------------------------------------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw posterior ``(mu, logvar)`` of a ``[B, 1 or 3, D, H, W]`` volume in [-1, 1]."""
        h = self.quant_conv(self.encoder(self._check_volume(x)))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def decode_raw(self, mu: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Raw decoder: un-normalised latent -> ``[B, out_channels, D, H, W]`` (clamped)."""
        out = self.decoder(self.post_quant_conv(self._check_latent(mu)))
        return out.clamp(-1.0, 1.0) if clamp else out

    # -- normalised latents (what the DiT sees) -------------------------------------------
    def normalize_latent(self, mu: torch.Tensor) -> torch.Tensor:
        return (mu - self.latents_mean) / self.latents_std

    def denormalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latents_std + self.latents_mean

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """One-modality volume ``[B, 1, D, H, W]`` in [-1, 1] -> normalised latent (mu)."""
        x = self._check_volume(x)
        if x.shape[1] != 1:
            raise ValueError(f"encode takes one-channel volumes, got {x.shape[1]} channels")
        h = self.encoder(x)
        weight = self.quant_conv.weight[: self.config.z_dim]
        mu = conv3d(h, weight, self.quant_conv.bias[: self.config.z_dim])
        return self.normalize_latent(mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> ``[B, 1, D, H, W]`` in [-1, 1] (mean of the clamped channels)."""
        z = self._check_latent(z)
        return self.decode_raw(self.denormalize_latent(z)).mean(dim=1, keepdim=True)


def compute_latent_stats(mus: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of raw latents ``[N, z_dim, ...]`` (for small-config stats)."""
    flat = mus.transpose(0, 1).reshape(mus.shape[1], -1).double()
    return flat.mean(1).tolist(), flat.std(1).clamp_min(1e-6).tolist()


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
