"""Loading Wan 2.1 VAE weights: official checkpoint keys and diffusers ``AutoencoderKLWan`` keys.

``WanVAE``'s parameter names are diffusers' names. The official Wan 2.1 code
(``Wan-Video/Wan2.1 wan/modules/vae.py``, file ``Wan2.1_VAE.pth``) names the same tensors
differently; the mapping (``official_key_map``) is the one of diffusers'
``convert_wan_vae_to_diffusers``, generalised to any number of residual blocks:

================================  ==========================================================
official                          diffusers / ours
================================  ==========================================================
``conv1`` / ``conv2``             ``quant_conv`` / ``post_quant_conv``
``{enc,dec}oder.conv1``           ``{enc,dec}oder.conv_in``
``{enc,dec}oder.head.0`` / ``.2`` ``{enc,dec}oder.norm_out`` / ``conv_out``
``*.middle.0`` / ``.1`` / ``.2``  ``*.mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``encoder.downsamples.i``         ``encoder.down_blocks.i``
``decoder.upsamples.j``           ``decoder.up_blocks.s.resnets.k`` / ``.upsamplers.0``
                                  (``j = s (R + 2) + k``, the upsampler at ``k = R + 1``)
``residual.0`` / ``2`` / ``3`` /  ``norm1`` / ``conv1`` / ``norm2`` / ``conv2``
``6``, ``shortcut``               ``conv_shortcut``
================================  ==========================================================

Files: weights are read from safetensors only. An official ``.pth`` is converted once with
``convert_official_pth`` (``torch.load(weights_only=True)``, which refuses arbitrary pickled
objects), never loaded at run time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from engine.models.vae import PRESETS, VAEConfig, WanVAE

_RESNET_PARTS = {
    "norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.",
    "conv2.": "residual.6.", "conv_shortcut.": "shortcut.",
}  # fmt: skip
OFFICIAL_MARKER = "decoder.middle.0.residual.0.gamma"
DIFFUSERS_MARKER = "decoder.mid_block.resnets.0.norm1.gamma"


def _resnet_part(rest: str) -> str:
    for ours, official in _RESNET_PARTS.items():
        if rest.startswith(ours):
            return official + rest[len(ours):]
    return rest  # resample.1.*, time_conv.*: same in both formats


def _official_name(key: str, num_res_blocks: int) -> str:
    if m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(.+)", key):
        return {"quant_conv": "conv1", "post_quant_conv": "conv2"}[m[1]] + "." + m[2]
    side, rest = key.split(".", 1)
    if rest.startswith("conv_in."):
        return f"{side}.conv1.{rest[len('conv_in.'):]}"
    if rest.startswith("norm_out."):
        return f"{side}.head.0.{rest[len('norm_out.'):]}"
    if rest.startswith("conv_out."):
        return f"{side}.head.2.{rest[len('conv_out.'):]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{side}.middle.{2 * int(m[1])}.{_resnet_part(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{side}.middle.1.{m[1]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"{side}.downsamples.{m[1]}.{_resnet_part(m[2])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        index = int(m[1]) * (num_res_blocks + 2) + int(m[2])
        return f"{side}.upsamples.{index}.{_resnet_part(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        index = int(m[1]) * (num_res_blocks + 2) + num_res_blocks + 1
        return f"{side}.upsamples.{index}.{m[2]}"
    raise ValueError(f"no official Wan name for VAE key {key!r}")


def official_key_map(config: VAEConfig) -> dict[str, str]:
    """``{diffusers key: official key}`` for every tensor of a ``WanVAE(config)``."""
    with torch.device("meta"):
        keys = list(WanVAE(config).state_dict())
    return {key: _official_name(key, config.num_res_blocks) for key in keys}


def detect_format(state_dict: Mapping[str, object]) -> str:
    """``"official"`` or ``"diffusers"``; ``ValueError`` for anything else."""
    if OFFICIAL_MARKER in state_dict:
        return "official"
    if DIFFUSERS_MARKER in state_dict:
        return "diffusers"
    sample = ", ".join(sorted(state_dict)[:3])
    raise ValueError(
        "not a Wan 2.1 VAE state dict (neither the official key "
        f"{OFFICIAL_MARKER!r} nor the diffusers key {DIFFUSERS_MARKER!r}; first keys: {sample})"
    )


def to_diffusers_keys(state_dict: Mapping[str, torch.Tensor],
                      config: VAEConfig) -> dict[str, torch.Tensor]:
    """The state dict with diffusers / ``WanVAE`` keys (converting official keys if needed)."""
    if detect_format(state_dict) == "diffusers":
        return dict(state_dict)
    inverse = {official: ours for ours, official in official_key_map(config).items()}
    unknown = sorted(set(state_dict) - set(inverse))
    if unknown:
        raise ValueError(f"official VAE checkpoint has keys this config ({config.name}) does not "
                         f"know: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return {inverse[k]: v for k, v in state_dict.items()}


def to_official_keys(state_dict: Mapping[str, torch.Tensor],
                     config: VAEConfig) -> dict[str, torch.Tensor]:
    """Diffusers-keyed state dict -> official Wan 2.1 keys (export, and the loading tests)."""
    mapping = official_key_map(config)
    unknown = sorted(set(state_dict) - set(mapping))
    if unknown:
        raise ValueError(f"diffusers VAE state dict has unknown keys: {unknown[:5]}")
    return {mapping[k]: v for k, v in state_dict.items()}


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> VAEConfig:
    """The architecture a state dict (either format) was made for.

    The official sizes give the ``wan2.1`` preset (with Wan's latent statistics); other sizes a
    ``custom`` config whose latent statistics are 0 / 1 until fitted.
    """
    fmt = detect_format(state_dict)
    if fmt == "official":
        blocks = {int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.upsamples.")}
        n_res = (max(blocks) + 1 - 3) // 4 - 1  # 4 stages of R + 1 resnets, 3 upsamplers
        conv_in, z_key = "encoder.conv1.weight", "conv2.weight"
        out_key = "decoder.head.2.weight"
        stage_out = [f"encoder.downsamples.{s * (n_res + 1) + n_res - 1}.residual.6.weight"
                     for s in range(4)]
    else:
        n_res = len({k.split(".")[4] for k in state_dict
                     if k.startswith("decoder.up_blocks.0.resnets.")}) - 1
        conv_in, z_key, out_key = "encoder.conv_in.weight", "post_quant_conv.weight", \
            "decoder.conv_out.weight"
        stage_out = [f"encoder.down_blocks.{s * (n_res + 1) + n_res - 1}.conv2.weight"
                     for s in range(4)]
    try:
        base_dim, in_channels = state_dict[conv_in].shape[:2]
        z_dim = state_dict[z_key].shape[0]
        out_channels = state_dict[out_key].shape[0]
        dim_mult = tuple(state_dict[k].shape[0] // base_dim for k in stage_out)
    except KeyError as exc:
        raise ValueError(f"incomplete Wan VAE state dict: missing {exc.args[0]!r}") from None
    candidate = VAEConfig(name="custom", base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult,
                          num_res_blocks=n_res, in_channels=in_channels, out_channels=out_channels,
                          latents_mean=(0.0,) * z_dim, latents_std=(1.0,) * z_dim)
    official = PRESETS["wan2.1"]
    same = {k: v for k, v in candidate.to_dict().items()
            if k not in ("name", "latents_mean", "latents_std")}
    if same == {k: official.to_dict()[k] for k in same}:
        return official
    return candidate


def check_state_dict(state_dict: Mapping[str, torch.Tensor],
                     config: VAEConfig) -> dict[str, torch.Tensor]:
    """Diffusers-keyed copy of ``state_dict`` after checking every key and shape against
    ``WanVAE(config)``; ``ValueError`` naming the problems otherwise."""
    converted = to_diffusers_keys(state_dict, config)
    with torch.device("meta"):
        expected = WanVAE(config).state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [f"{k}: file {tuple(converted[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in converted and converted[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            problems.append(f"{len(wrong)} with another shape (e.g. {wrong[:2]})")
        raise ValueError(f"VAE weights do not fit config {config.name!r}: " + "; ".join(problems))
    return converted


def load_state_dict_into(model: WanVAE, state_dict: Mapping[str, torch.Tensor]) -> WanVAE:
    """Load either key format into ``model``, checking every key and shape first."""
    converted = check_state_dict(state_dict, model.config)
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return model


def load_vae(path: str | Path, config: VAEConfig | None = None) -> WanVAE:
    """A ``WanVAE`` with weights from a ``.safetensors`` file (official or diffusers keys).

    ``config`` defaults to the one inferred from the weights (``infer_config``).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: VAE weights are read from .safetensors files only; "
                         "convert an official .pth once with convert_official_pth()")
    if not path.is_file():
        raise FileNotFoundError(f"VAE weights not found: {path}")
    try:
        state_dict = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    config = config or infer_config(state_dict)
    return load_state_dict_into(WanVAE(config).eval(), state_dict)


def convert_official_pth(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Convert an official ``Wan2.1_VAE.pth`` to a diffusers-keyed ``.safetensors`` file.

    The pickle is read with ``torch.load(weights_only=True)``: plain tensors and containers
    only, no code runs. ``src`` is never modified; ``dst`` is not overwritten unless asked.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if dst.suffix != ".safetensors":
        raise ValueError(f"{dst.name}: the converted file must end in .safetensors")
    if dst.exists() and (dst.resolve() == src.resolve() or not overwrite):
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
    try:
        loaded = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, zip errors, ...: all mean "not a safe weights file"
        raise ValueError(f"{src}: not a plain PyTorch weights file ({exc})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor)
                                               for v in loaded.values()):
        raise ValueError(f"{src}: expected a dict of tensors")
    config = infer_config(loaded)
    converted = check_state_dict(loaded, config)
    tmp = dst.with_name(dst.name + ".partial")
    save_file({k: v.contiguous().float() for k, v in converted.items()}, str(tmp),
              metadata={"format": "diffusers-AutoencoderKLWan", "source": src.name})
    tmp.replace(dst)
    return dst
