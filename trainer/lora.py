"""LoRA adapters through peft: attach, save, load, merge (ScardNFT, VAE decoder LoRA).

peft wraps the chosen ``nn.Linear`` / conv leaves of any ``nn.Module`` with LoRA layers (B
initialised to zero, so the wrapped model starts equal to the base) and keeps a trainable copy
of the ``modules_to_save`` (here the modulation MLPs) next to the frozen originals. The base
stays frozen and ``disable_adapter()`` gives the base model back exactly, which is the
reference policy of the KL term. Adapters are saved as peft's ``adapter_config.json`` +
``adapter_model.safetensors`` (no pickle); ``merged_copy`` folds them into plain weights for
export and fast inference.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.errors import UserError

if TYPE_CHECKING:  # peft (and the transformers it loads) takes seconds to import: only on use
    from peft import PeftModel


def matching_modules(model: nn.Module, pattern: str, kinds: tuple[type, ...]) -> list[str]:
    """Names of the modules of the given kinds whose full name matches ``pattern`` (regex)."""
    rx = re.compile(pattern)
    return [name for name, mod in model.named_modules()
            if name and isinstance(mod, kinds) and rx.fullmatch(name)]


def attach_lora(model: nn.Module, target_modules: list[str], rank: int, alpha: float,
                trainable_modules: list[str] = ()) -> PeftModel:
    """Wrap ``model`` with a rank-``rank`` LoRA adapter ("default") on ``target_modules``.

    ``target_modules``/``trainable_modules`` are exact module names (see
    :func:`matching_modules`). Only the adapter and the copies of ``trainable_modules`` are
    trainable; everything else is frozen.
    """
    if not target_modules:
        raise UserError("LoRA: no target modules matched in the model")
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True,
                     target_modules="(" + "|".join(re.escape(n) for n in target_modules) + ")",
                     modules_to_save=list(trainable_modules) or None)
    return get_peft_model(model, cfg)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(model: PeftModel, folder: Path) -> Path:
    """Write the adapter (and trained modulation copies) to ``folder`` as safetensors + JSON."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def load_adapter(base: nn.Module, folder: Path, trainable: bool = False) -> PeftModel:
    """Attach the adapter saved in ``folder`` to ``base`` (same architecture as when saved)."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder} holds no LoRA adapter (adapter_config.json missing)")
    try:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"LoRA adapter {folder} does not fit this model: {exc}") from None


def merged_copy(model: PeftModel) -> nn.Module:
    """A plain module of the base class with the adapter folded into its weights."""
    return copy.deepcopy(model).merge_and_unload()


class ConvLoRA(nn.Module):
    """LoRA for a (causal) 3-D convolution peft cannot wrap: ``base(x) + s * B(A(x))``.

    ``A`` is a copy of the base convolution's kind with ``rank`` outputs (same kernel, stride,
    padding, causal padding), ``B`` a 1x1x1 convolution starting at zero, ``s = alpha / rank``.
    :meth:`merged` folds ``B∘A`` into one convolution of the base's kind (exact: a 1x1x1
    convolution after any convolution is a convolution with the same kernel).
    """

    def __init__(self, base: nn.Conv3d, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_A = copy.deepcopy(base)
        self.lora_A.weight = nn.Parameter(torch.empty(rank, *base.weight.shape[1:]))
        self.lora_A.bias = nn.Parameter(torch.zeros(rank))
        self.lora_A.out_channels = rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        self.lora_B = nn.Conv3d(rank, base.out_channels, 1, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))

    @torch.no_grad()
    def merged(self) -> nn.Conv3d:
        out = copy.deepcopy(self.base)
        b = self.lora_B.weight[:, :, 0, 0, 0] * self.scale                    # [out, r]
        out.weight += torch.einsum("or,rikjl->oikjl", b, self.lora_A.weight)
        if out.bias is not None:
            out.bias += b @ self.lora_A.bias
        return out.requires_grad_(True)


def attach_conv_lora(model: nn.Module, pattern: str, rank: int, alpha: float) -> list[str]:
    """Replace the Conv3d leaves of ``model`` whose names match ``pattern`` by :class:`ConvLoRA`.

    Everything else in ``model`` is frozen; returns the wrapped module names.
    """
    model.requires_grad_(False)
    names = matching_modules(model, pattern, (nn.Conv3d,))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ConvLoRA(getattr(parent, child), rank, alpha))
    return names


def merge_conv_lora(model: nn.Module) -> nn.Module:
    """Fold every :class:`ConvLoRA` of ``model`` back into a plain convolution (in place)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, ConvLoRA):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.merged())
    return model
