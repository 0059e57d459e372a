"""What the model stages share: building the VAE / DiT from a preset, LoRA targets, exports."""

from __future__ import annotations

from torch import nn

from engine.models.dit import DiffKT3D

from .. import lora

# seed §B.5: LoRA on all self-attention and FFN linears of the DiT blocks; the modulation MLPs
# (timestep embedder and its projection to the AdaLN vectors) train in full; the rest is frozen.
DIT_LORA_PATTERN = r"blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out)|ffn\.(proj_in|proj_out))"
DIT_MODULATION_PATTERN = r"time_embedder\.linear_[12]|time_proj"


def dit_lora_targets(model: DiffKT3D) -> tuple[list[str], list[str]]:
    """(LoRA target module names, fully trainable modulation module names) of a DiffKT3D."""
    return (lora.matching_modules(model, DIT_LORA_PATTERN, (nn.Linear,)),
            lora.matching_modules(model, DIT_MODULATION_PATTERN, (nn.Linear,)))
