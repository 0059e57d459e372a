"""Load Wan 2.1 T2V DiT weights (official or diffusers format) into :class:`DiffKT3D`.

Key tables follow notes/diffusion-stack.md §2 (official <-> diffusers, from diffusers'
``convert_wan_transformer_to_diffusers``). Text and cross-attention parts are dropped: official
``cross_attn.*``, ``norm3.*`` (the cross-attention norm in official naming) and
``text_embedding.*``; diffusers ``attn2.*``, ``norm2.*`` and ``condition_embedder.text_embedder.*``.

New DiffKT3D parts start neutral so the pretrained path is undisturbed: every slot's patch
embedding and output head is a copy of Wan's single one, the role embedding is zero, and the slot
RoPE phase vanishes between tokens of the same slot (see ``dit.py``). With one slot present, all
of it a target, DiffKT3D then computes exactly Wan's transformer without cross-attention.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from engine.models.checkpoint import CheckpointError, read_pth_weights_only
from engine.models.dit import DiffKT3D

_PREFIXES = ("model.diffusion_model.", "transformer.")

# (pattern, replacement) on official keys -> ours; None drops the key.
_OFFICIAL: list[tuple[str, str | None]] = [
    (r"^blocks\.(\d+)\.self_attn\.q\.", r"blocks.\1.attn.to_q."),
    (r"^blocks\.(\d+)\.self_attn\.k\.", r"blocks.\1.attn.to_k."),
    (r"^blocks\.(\d+)\.self_attn\.v\.", r"blocks.\1.attn.to_v."),
    (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn.to_out."),
    (r"^blocks\.(\d+)\.self_attn\.norm_(q|k)\.", r"blocks.\1.attn.norm_\2."),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.proj_in."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.proj_out."),
    (r"^blocks\.\d+\.cross_attn\.", None),
    (r"^blocks\.\d+\.norm3\.", None),
    (r"^time_embedding\.0\.", "time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "time_embedder.linear_2."),
    (r"^time_projection\.1\.", "time_proj."),
    (r"^text_embedding\.", None),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^patch_embedding\.", "patch_embedding."),
]

_DIFFUSERS: list[tuple[str, str | None]] = [
    (r"^blocks\.(\d+)\.attn1\.to_(q|k|v)\.", r"blocks.\1.attn.to_\2."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.attn.to_out."),
    (r"^blocks\.(\d+)\.attn1\.norm_(q|k)\.", r"blocks.\1.attn.norm_\2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.proj_in."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.proj_out."),
    (r"^blocks\.\d+\.attn2\.", None),
    (r"^blocks\.\d+\.norm2\.", None),
    (r"^condition_embedder\.time_embedder\.(linear_[12])\.", r"time_embedder.\1."),
    (r"^condition_embedder\.time_proj\.", "time_proj."),
    (r"^condition_embedder\.text_embedder\.", None),
    (r"^scale_shift_table$", "scale_shift_table"),
    (r"^proj_out\.", "proj_out."),
    (r"^patch_embedding\.", "patch_embedding."),
]


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """``"official"`` or ``"diffusers"``, from characteristic key names."""
    keys = [_strip(k) for k in state_dict]
    if any(".self_attn." in k or k.startswith("head.head.") for k in keys):
        return "official"
    if any(".attn1." in k or k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    raise CheckpointError(
        "not a Wan 2.1 DiT state dict: found neither official keys (blocks.N.self_attn.*, "
        "head.head.*) nor diffusers keys (blocks.N.attn1.*, condition_embedder.*)"
    )


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _rename(key: str, table: list[tuple[str, str | None]]) -> str | None:
    for pattern, replacement in table:
        if re.match(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key)
    raise CheckpointError(f"unexpected key in a Wan 2.1 T2V DiT checkpoint: {key!r}")


def convert_wan_state_dict(state_dict: Mapping[str, Tensor], num_slots: int) -> dict[str, Tensor]:
    """Map a Wan 2.1 T2V DiT state dict (official or diffusers keys) to DiffKT3D keys.

    The single patch embedding and output head are copied to each of ``num_slots`` slots and a
    zero role embedding is added, so the result is a complete DiffKT3D state dict.
    """
    table = _OFFICIAL if detect_format(state_dict) == "official" else _DIFFUSERS
    renamed: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = _rename(_strip(key), table)
        if new is not None:
            renamed[new] = value
    for shared in ("patch_embedding.weight", "patch_embedding.bias", "proj_out.weight",
                   "proj_out.bias", "time_proj.weight", "scale_shift_table"):
        if shared not in renamed:
            raise CheckpointError(f"Wan 2.1 DiT checkpoint is missing {shared!r}")
    out = {k: v for k, v in renamed.items() if not k.startswith(("patch_embedding.", "proj_out."))}
    for slot in range(num_slots):
        for part in ("weight", "bias"):
            out[f"patch_embeds.{slot}.{part}"] = renamed[f"patch_embedding.{part}"].clone()
            out[f"proj_outs.{slot}.{part}"] = renamed[f"proj_out.{part}"].clone()
    dim = renamed["time_proj.weight"].shape[1]
    out["role_embedding.weight"] = torch.zeros(2, dim, dtype=renamed["time_proj.weight"].dtype)
    return out


def read_wan_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a Wan DiT checkpoint: a ``.safetensors`` file, an official ``.pth`` (read with
    ``weights_only=True``), or a folder of (possibly sharded) ``.safetensors`` files; for a
    diffusers pipeline folder, its ``transformer/`` subfolder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Wan DiT checkpoint not found: {path}")
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no .safetensors files in {path}")
        index = path / "diffusion_pytorch_model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / n for n in names]
        state: dict[str, Tensor] = {}
        for f in files:
            state.update(_read_safetensors(f))
        return state
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        return read_pth_weights_only(path)
    raise CheckpointError(f"unsupported checkpoint type {path.suffix!r} ({path})")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc


def load_wan_weights(model: DiffKT3D, source: str | Path | Mapping[str, Tensor]) -> None:
    """Load Wan 2.1 T2V DiT weights into ``model`` (a path or a state dict, either format).

    Fails with a message naming the mismatched tensors when the checkpoint does not fit the
    model's configuration (e.g. a 1.3B checkpoint into a CPU preset).
    """
    state = read_wan_checkpoint(source) if isinstance(source, (str, Path)) else source
    converted = convert_wan_state_dict(state, model.config.num_slots)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(converted))
        if converted[k].shape != expected[k].shape
    ]
    if missing or extra or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches, e.g. {wrong[:3]}")
        if missing:
            parts.append(f"{len(missing)} tensors missing, e.g. {missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors, e.g. {extra[:3]}")
        raise CheckpointError(
            "Wan DiT checkpoint does not fit this DiTConfig "
            f"(dim {model.config.dim}, {model.config.num_layers} layers, patch "
            f"{model.config.patch_size}): " + "; ".join(parts)
        )
    model.load_state_dict(converted, strict=True)
