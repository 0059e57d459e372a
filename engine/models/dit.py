"""DiffKT3D diffusion transformer: Wan 2.1 blocks without cross-attention, Any2Any over 7 slots.

Spec: seed §A, §B.3; DESIGN §4; notes/diffusion-stack.md §2. Self-contained (no diffusers import),
written in diffusers' single-file style; state-dict names follow diffusers where a part exists
there, so ``engine.models.dit_weights`` maps Wan 2.1 checkpoints with a plain key table.

Public interface
----------------
``DiTConfig`` (frozen, JSON via ``to_dict``/``from_dict``; presets in ``PRESETS``) and
``DiffKT3D(config)`` with

    forward(x, t, target_mask, present=None) -> prediction

- ``x``: [B, S, C, D, H, W] float, S = ``config.num_slots`` (7) latents in the fixed slot order
  of DESIGN §3 (0 CT, 1 PTV, 2 OAR, 3 body, 4 dose, 5 beam plate, 6 angle plate), C =
  ``in_channels`` (16), (D, H, W) the latent grid (16 x 25 x 16 x 20 for the 97 x 128 x 160 ROI).
  Entries of target slots hold the noisy ``x_s``; entries of condition slots hold clean latents.
- ``t``: [B] flow time ``s`` in [0, 1] of the targets (the network sees ``1000 * s``).
- ``target_mask``: [B, S] bool, True where the slot is a target (may differ per sample).
- ``present``: [S] bool, shared by the batch; absent slots produce no tokens at all (e.g. no dose
  at inference, a modality a dataset lacks). Default: all present. Targets must be present.
- returns [B, S, C, D, H, W]: the prediction (``v`` for a v-prediction model) at target slots,
  zeros at condition and absent slots.

Conditions are clean by construction: condition tokens always get timestep 0 and the
"condition" role, whatever ``t`` is. :func:`any2any_velocity` wraps a model into the
``velocity(x_s, s)`` callable of ``engine.diffusion.sample``; it reads only the target entries of
``x_s`` and takes condition entries from the clean latents it was given, so sampler noise can
never reach a condition slot. For training, :func:`noise_targets` noises the targets only; restrict
the loss to target slots (``engine.diffusion.flow_matching_loss(mask=...)``).

Architecture (numbered as the forward runs)
--------------------------------------------
1. Patch embedding: one Conv3d per slot (Wan's ``patch_embedding``, kernel = stride = patch
   size); the latent grid is zero-padded at the far end up to a multiple of the patch.
2. 4D RoPE over (slot, depth, height, width): Wan's 3D split of the head dim (depth
   ``hd - 4*(hd//6)``, height and width ``2*(hd//6)`` each, theta 10000, interleaved pairs), and the
   slot axis on its own ``rope_slot_dim`` dims taken at the low-frequency end of the depth band
   (rotations < 0.006 rad over 25 latent depths in Wan's band). The slot phase is added there to
   the depth phase, so two tokens of the same slot see exactly Wan's 3D RoPE (pretrained path
   undisturbed) and tokens of different slots get an extra relative phase ``dslot * w_slot``.
3. Timestep + role embedding, per slot: sinusoidal(1000 s) -> MLP (Wan's time_embedder), plus a
   learnable 2-row role embedding (0 = condition, 1 = target; zero at init), -> SiLU -> Linear to
   6 modulation vectors per block (Wan's time_proj). Targets use ``s``, conditions 0.
4. Blocks (Wan 2.1 minus cross-attention): x += gate1 * Attn(LN(x) (1 + scale1) + shift1) and
   x += gate2 * FFN(LN(x) (1 + scale2) + shift2), with the per-block learned ``scale_shift_table``
   added to the modulation; attention has RMSNorm on q and k across heads, RoPE on q and k; the FFN
   is Linear -> GELU(tanh) -> Linear.
5. Head: LN(x) (1 + scale) + shift (head ``scale_shift_table`` + embedding of step 3), then a
   per-slot Linear and un-patchify back to the latent grid (cropping the padding).

Module names for LoRA (peft ``target_modules`` suffixes, :data:`LORA_TARGETS`): ``attn.to_q``,
``attn.to_k``, ``attn.to_v``, ``attn.to_out``, ``ffn.proj_in``, ``ffn.proj_out``; the
modulation MLP is ``time_embedder`` + ``time_proj``.

All slots share the latent grid, so tokens are kept as [B, P, N, dim] (P present slots, N tokens
per slot) and modulation broadcasts per slot rather than being materialised per token.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from engine import diffusion

NUM_SLOTS = 7
SLOT_NAMES: tuple[str, ...] = ("ct", "ptv", "oar", "body", "dose", "beam_plate", "angle_plate")
ROLE_CONDITION, ROLE_TARGET = 0, 1
LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "ffn.proj_in", "ffn.proj_out",
)


def rope_band_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's head-dim split into (depth, height, width) bands, e.g. 128 -> (44, 42, 42)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiffKT3D DiT (JSON via ``to_dict``/``from_dict``).

    ``dim`` hidden size (= ``num_heads`` x head dim), ``ffn_dim`` FFN inner size, ``in_channels``
    latent channels per slot (16 for the Wan VAE; outputs have the same), ``patch_size`` tokens per
    (depth, height, width) latent cells, ``num_slots`` modalities, ``freq_dim`` sinusoidal timestep
    size, ``eps`` of the norms, ``rope_theta`` RoPE base, ``rope_slot_dim`` head dims carrying the
    slot phase (even, within the depth band; 0 disables slot RoPE).
    """

    dim: int = 256
    num_layers: int = 6
    num_heads: int = 4
    ffn_dim: int = 1024
    in_channels: int = 16
    patch_size: tuple[int, int, int] = (2, 4, 4)
    num_slots: int = NUM_SLOTS
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_slot_dim: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        problems = []
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            problems.append(f"patch_size must be 3 positive ints, got {self.patch_size}")
        for name in ("dim", "num_layers", "num_heads", "ffn_dim", "in_channels", "num_slots"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.freq_dim < 2 or self.freq_dim % 2:
            problems.append(f"freq_dim must be even and >= 2, got {self.freq_dim}")
        if self.num_heads >= 1 and self.dim % self.num_heads:
            problems.append(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        elif self.num_heads >= 1:
            hd = self.dim // self.num_heads
            if hd % 2 or hd < 6:
                problems.append(f"head dim {hd} must be even and >= 6 for the RoPE split")
            elif self.rope_slot_dim % 2 or not 0 <= self.rope_slot_dim <= rope_band_dims(hd)[0]:
                problems.append(
                    f"rope_slot_dim must be even and within the depth band "
                    f"({rope_band_dims(hd)[0]}), got {self.rope_slot_dim}"
                )
        if problems:
            raise ValueError("invalid DiTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> DiTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig fields: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DiTConfig:
        return cls.from_dict(json.loads(text))


PRESETS: dict[str, DiTConfig] = {
    # Wan 2.1 T2V-1.3B sizes (wan/configs/wan_t2v_1_3B.py): loads its weights via dit_weights.
    "wan2.1-1.3b": DiTConfig(
        dim=1536, num_layers=30, num_heads=12, ffn_dim=8960, patch_size=(1, 2, 2)
    ),
    # CPU configs: 7 x 13 x 4 x 5 = 1,820 tokens on the 16 x 25 x 16 x 20 latent grid.
    "cpu-small": DiTConfig(dim=256, num_layers=6, num_heads=4, ffn_dim=1024, patch_size=(2, 4, 4)),
    "cpu-base": DiTConfig(dim=384, num_layers=6, num_heads=6, ffn_dim=1536, patch_size=(2, 4, 4)),
}


def preset(name: str) -> DiTConfig:
    """A named configuration from :data:`PRESETS`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown DiT preset {name!r}; known: {sorted(PRESETS)}") from None


# --- 2. RoPE ------------------------------------------------------------------------------------


def _band_frequencies(dims: int, theta: float) -> Tensor:
    """Per-pair angular frequencies ``theta^(-2i/dims)`` of a RoPE band, float64 [dims // 2]."""
    return 1.0 / theta ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims)


@functools.lru_cache(maxsize=32)
def rope_angles(
    config: DiTConfig, slots: tuple[int, ...], grid: tuple[int, int, int]
) -> tuple[Tensor, Tensor]:
    """cos and sin of the 4D RoPE phases, float32 [P * N, head_dim // 2] each (cached; read-only).

    Tokens are ordered slot-major, then (depth, height, width) row-major over the patch ``grid``.
    Built outside inference mode so that cached tables also serve training forwards.
    """
    with torch.inference_mode(False):
        return _rope_angles(config, slots, grid)


def _rope_angles(
    config: DiTConfig, slots: tuple[int, ...], grid: tuple[int, int, int]
) -> tuple[Tensor, Tensor]:
    d_dim, h_dim, w_dim = rope_band_dims(config.head_dim)
    theta = config.rope_theta
    gd, gh, gw = grid
    pos_d = torch.arange(gd, dtype=torch.float64)
    pos_h = torch.arange(gh, dtype=torch.float64)
    pos_w = torch.arange(gw, dtype=torch.float64)
    ang_d = (pos_d[:, None] * _band_frequencies(d_dim, theta))[:, None, None, :]
    ang_h = (pos_h[:, None] * _band_frequencies(h_dim, theta))[None, :, None, :]
    ang_w = (pos_w[:, None] * _band_frequencies(w_dim, theta))[None, None, :, :]
    spatial = torch.cat(
        [
            ang_d.expand(gd, gh, gw, -1),
            ang_h.expand(gd, gh, gw, -1),
            ang_w.expand(gd, gh, gw, -1),
        ],
        dim=-1,
    ).reshape(1, gd * gh * gw, -1)
    slot_pairs = config.rope_slot_dim // 2
    slot_phase = torch.zeros(len(slots), 1, config.head_dim // 2, dtype=torch.float64)
    if slot_pairs:
        freqs = _band_frequencies(config.rope_slot_dim, theta)
        start = d_dim // 2 - slot_pairs
        slot_ids = torch.tensor(slots, dtype=torch.float64)
        slot_phase[:, 0, start : start + slot_pairs] = slot_ids[:, None] * freqs
    angles = (spatial + slot_phase).reshape(-1, config.head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of ``x`` [B, heads, L, hd] by the given phases."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


# --- 3. timestep embedding ----------------------------------------------------------------------


def timestep_sinusoid(timesteps: Tensor, dim: int) -> Tensor:
    """Wan's sinusoidal timestep embedding [cos, sin] (diffusers ``Timesteps(dim, True, 0)``).

    ``timesteps`` on the 0..1000 scale, any shape; returns float32 [..., dim].
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half
    args = timesteps.float()[..., None] * exponent.exp().to(timesteps.device)
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    """sinusoid -> Linear -> SiLU -> Linear (diffusers ``TimestepEmbedding``)."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# --- 4. blocks ----------------------------------------------------------------------------------


def _layer_norm(x: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine parameters, computed in float32 (Wan's FP32LayerNorm)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose weight follows the input's dtype.

    Under bf16 autocast the q/k projections come out in bf16 while the weight stays float32;
    ``F.rms_norm`` then refuses its fused kernel ("Mismatch dtype between input and weight") and
    falls back to a slower composite. Same parameter name (``weight``) as ``nn.RMSNorm``, so
    Wan checkpoints and our bundles load unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class SelfAttention(nn.Module):
    """Wan self-attention: q/k/v/out projections, RMSNorm on q and k across heads, RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps=eps)
        self.norm_k = RMSNorm(dim, eps=eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B, L, dim], cos/sin [L, head_dim // 2] -> [B, L, dim]."""
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.num_heads, -1)).transpose(1, 2)
        k = self.norm_k(self.to_k(x)).unflatten(2, (self.num_heads, -1)).transpose(1, 2)
        v = self.to_v(x).unflatten(2, (self.num_heads, -1)).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear (Wan's ffn)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, ffn_dim)
        self.proj_out = nn.Linear(ffn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A Wan 2.1 transformer block without cross-attention, AdaLN-modulated per slot."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.eps = config.eps
        self.attn = SelfAttention(config.dim, config.num_heads, config.eps)
        self.ffn = FeedForward(config.dim, config.ffn_dim)
        self.scale_shift_table = nn.Parameter(
            torch.randn(1, 6, config.dim) / config.dim**0.5
        )

    def forward(self, x: Tensor, modulation: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B, P, N, dim], modulation [B, P, 6, dim] (float32) -> [B, P, N, dim]."""
        mods = (self.scale_shift_table.unsqueeze(0) + modulation.float()).unsqueeze(3)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods.unbind(2)  # each [B, P, 1, dim]
        h = (_layer_norm(x, self.eps) * (1 + scale1) + shift1).type_as(x)
        attn = self.attn(h.flatten(1, 2), cos, sin).view_as(x)
        x = (x.float() + attn.float() * gate1).type_as(x)
        h = (_layer_norm(x, self.eps) * (1 + scale2) + shift2).type_as(x)
        return (x.float() + self.ffn(h).float() * gate2).type_as(x)


# --- the model ----------------------------------------------------------------------------------


class DiffKT3D(nn.Module):
    """The Any2Any DiT of DiffKT3D; see the module docstring for the forward contract."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embeds = nn.ModuleList(
            nn.Conv3d(c.in_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
            for _ in range(c.num_slots)
        )
        self.time_embedder = TimestepEmbedding(c.freq_dim, c.dim)
        self.time_proj = nn.Linear(c.dim, 6 * c.dim)
        self.role_embedding = nn.Embedding(2, c.dim)
        nn.init.zeros_(self.role_embedding.weight)
        self.blocks = nn.ModuleList(DiTBlock(c) for _ in range(c.num_layers))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, c.dim) / c.dim**0.5)
        self.proj_outs = nn.ModuleList(
            nn.Linear(c.dim, c.in_channels * math.prod(c.patch_size)) for _ in range(c.num_slots)
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        target_mask: Tensor,
        present: Tensor | None = None,
    ) -> Tensor:
        """[B, S, C, D, H, W] latents -> prediction at target slots (module docstring)."""
        c = self.config
        slots, target_slots = self._check_inputs(x, t, target_mask, present)
        batch, _, _, depth, height, width = x.shape
        pt, ph, pw = c.patch_size
        pads = (-width % pw, -height % ph, -depth % pt)
        grid = ((depth + pads[2]) // pt, (height + pads[1]) // ph, (width + pads[0]) // pw)

        # 1. patch embedding per present slot -> [B, P, N, dim]
        tokens = []
        for slot in slots:
            latent = F.pad(x[:, slot], (0, pads[0], 0, pads[1], 0, pads[2]))
            tokens.append(self.patch_embeds[slot](latent).flatten(2).transpose(1, 2))
        h = torch.stack(tokens, dim=1).contiguous()

        # 2. 4D RoPE tables [P * N, head_dim // 2]
        cos, sin = (a.to(x.device) for a in rope_angles(c, tuple(slots), grid))

        # 3. timestep + role embedding per (sample, slot): targets at s, conditions clean (s = 0)
        is_target = target_mask[:, slots]  # [B, P]
        roles = torch.where(is_target, ROLE_TARGET, ROLE_CONDITION)
        s = t.to(torch.float32).reshape(batch, 1) * is_target
        temb = self.time_embedder(timestep_sinusoid(diffusion.model_timestep(s), c.freq_dim))
        temb = temb + self.role_embedding(roles)
        modulation = self.time_proj(F.silu(temb)).unflatten(2, (6, c.dim))  # [B, P, 6, dim]

        # 4. transformer blocks
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, modulation, cos, sin, use_reentrant=False)
            else:
                h = block(h, modulation, cos, sin)

        # 5. head and un-patchify per slot that is a target somewhere in the batch (cropping the
        #    patch padding)
        head_mod = self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)  # [B, P, 2, dim]
        shift, scale = head_mod.unsqueeze(3).unbind(2)
        h = (_layer_norm(h, c.eps) * (1 + scale) + shift).type_as(h)
        out = x.new_zeros(x.shape)
        for i, slot in enumerate(slots):
            if slot not in target_slots:
                continue
            patches = self.proj_outs[slot](h[:, i]).reshape(batch, *grid, pt, ph, pw, c.in_channels)
            volume = patches.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
                batch, c.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw
            )
            out[:, slot] = volume[:, :, :depth, :height, :width]
        return out * target_mask.reshape(batch, c.num_slots, 1, 1, 1, 1).to(out.dtype)

    def _check_inputs(
        self, x: Tensor, t: Tensor, target_mask: Tensor, present: Tensor | None
    ) -> tuple[list[int], set[int]]:
        """Validate shapes and masks; return the present slots (in order) and the target slots."""
        c = self.config
        if (not isinstance(x, Tensor) or x.ndim != 6 or x.shape[1] != c.num_slots
                or x.shape[2] != c.in_channels):
            raise ValueError(
                f"x must be a [B, {c.num_slots}, {c.in_channels}, D, H, W] tensor, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        batch = x.shape[0]
        if not isinstance(t, Tensor) or t.shape != (batch,):
            raise ValueError(f"t must be a tensor [B] = [{batch}] of flow times, got {t!r:.80}")
        if (not isinstance(target_mask, Tensor) or target_mask.dtype != torch.bool
                or target_mask.shape != (batch, c.num_slots)):
            raise ValueError(
                f"target_mask must be a bool tensor [{batch}, {c.num_slots}], "
                f"got {target_mask!r:.80}"
            )
        if present is None:
            present = torch.ones(c.num_slots, dtype=torch.bool)
        if (not isinstance(present, Tensor) or present.dtype != torch.bool
                or present.shape != (c.num_slots,)):
            raise ValueError(f"present must be a bool tensor [{c.num_slots}], got {present!r:.80}")
        present = present.cpu()
        targeted = target_mask.cpu().any(dim=0)
        stray = (targeted & ~present).nonzero().flatten().tolist()
        if stray:
            raise ValueError(f"slots {stray} are targets but not present")
        slots = present.nonzero().flatten().tolist()
        if not slots:
            raise ValueError("no slot is present: nothing to attend to")
        return slots, set(targeted.nonzero().flatten().tolist())


_BASES: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def _column_basis(weight: Tensor) -> Tensor:
    """An orthonormal basis (float64, CPU) of ``weight``'s column space, cached per weight and
    its in-place version (an SVD costs ~20 ms, a preview's budget is 1 s). SVD, not QR: a
    rank-deficient head, e.g. an all-zero one, spans fewer directions than it has columns."""
    key = id(weight)
    cached = _BASES.get(key)
    if cached is not None and cached[0]() is weight and cached[1] == weight._version:
        return cached[2]
    u, sv, _ = torch.linalg.svd(weight.detach().double().cpu(), full_matrices=False)
    rank = int((sv > sv.max() * 1e-9 * max(u.shape)).sum()) if sv.numel() else 0
    _BASES[key] = (weakref.ref(weight, lambda _: _BASES.pop(key, None)), weight._version,
                   u[:, :rank])
    return u[:, :rank]


def unreachable_part(model: DiffKT3D, slot: int, latent: Tensor) -> Tensor:
    """The part of slot ``slot``'s latents ``[B, C, D, H, W]`` that the slot's head can never
    produce: per whole token patch, the latent minus its projection onto the column space of
    ``proj_outs[slot].weight`` (``C * prod(patch)`` rows, at most ``dim`` of them independent).

    A v-prediction sample is ``noise - sum(ds * v)``, so this part of the starting noise passes to
    the result untouched by the model; :func:`strip_unreachable_noise` removes it. Patches cut by
    the grid's far end are left at zero (their few real rows are spanned).
    """
    c = model.config
    pt, ph, pw = c.patch_size
    batch, channels, d, h, w = latent.shape
    g = (d // pt, h // ph, w // pw)
    basis = _column_basis(model.proj_outs[slot].weight).to(latent.device)
    whole = latent[:, :, :g[0] * pt, :g[1] * ph, :g[2] * pw].double()
    # the head's patch order per token: (pt, ph, pw, channels), as in forward step 5
    tokens = whole.reshape(batch, channels, g[0], pt, g[1], ph, g[2], pw).permute(
        0, 2, 4, 6, 3, 5, 7, 1)
    flat = tokens.reshape(-1, basis.shape[0])
    rest = (flat - (flat @ basis) @ basis.T).reshape(tokens.shape)
    out = torch.zeros(latent.shape, dtype=torch.float64, device=latent.device)
    out[:, :, :g[0] * pt, :g[1] * ph, :g[2] * pw] = rest.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
        whole.shape)
    return out.to(latent.dtype)


def strip_unreachable_noise(model: DiffKT3D, sample: Tensor, noise: Tensor, target_mask: Tensor,
                            prediction: diffusion.Prediction = "v") -> Tensor:
    """``sample`` [B, S, C, D, H, W] (a v-prediction model's ODE result from ``noise``) without
    the starting noise its heads cannot reach (:func:`unreachable_part`), at the target slots.

    The network never sees that noise leave: an Euler or DPM step adds ``ds * v`` and ``v`` lies
    in the head's column space plus its bias, so the unreachable part of ``noise`` is still in the
    result and the VAE decodes it as dose. Removing it leaves the head bias's learnt mean there.
    Other parameterisations convert through ``x_s`` and are returned unchanged.
    """
    if prediction != "v":
        return sample
    out = sample.clone()
    for slot in target_mask.any(dim=0).nonzero().flatten().tolist():
        rows = target_mask[:, slot]
        out[rows, slot] -= unreachable_part(model, slot, noise[rows, slot])
    return out


def noise_targets(x0: Tensor, noise: Tensor, s: Tensor, target_mask: Tensor) -> Tensor:
    """The training input of an Any2Any step: target slots at ``x_s``, every other slot clean.

    ``x0``, ``noise`` [B, S, C, D, H, W], ``s`` [B] flow times, ``target_mask`` [B, S] bool.
    Pair it with ``diffusion.flow_matching_loss(model(x, s, target_mask), x0, noise,
    mask=target_mask[..., None, None, None, None])``.
    """
    mask = target_mask.reshape(*target_mask.shape, 1, 1, 1, 1)
    return torch.where(mask, diffusion.add_noise(x0, noise, s), x0)


def any2any_velocity(
    model: DiffKT3D,
    clean: Tensor,
    target_mask: Tensor,
    present: Tensor | None = None,
    prediction: diffusion.Prediction = "v",
) -> Callable[[Tensor, Tensor], Tensor]:
    """The ``velocity(x_s, s)`` of ``engine.diffusion.sample`` for one Any2Any problem.

    ``clean`` [B, S, C, D, H, W] holds the clean condition latents (target entries are ignored).
    The returned callable reads only the target entries of ``x_s``, fills every other entry from
    ``clean``, converts the model output to a velocity and returns zeros outside the targets, so
    the sampler moves targets only and conditions stay clean. Take the sample's target entries
    as the result (``torch.where(mask, sample, clean)``).
    """
    mask = target_mask.reshape(*target_mask.shape, 1, 1, 1, 1)

    def velocity(x_s: Tensor, s: Tensor) -> Tensor:
        x = torch.where(mask, x_s, clean)
        v = diffusion.to_velocity(model(x, s, target_mask, present), x, s, prediction)
        return torch.where(mask, v, torch.zeros_like(v))

    return velocity
