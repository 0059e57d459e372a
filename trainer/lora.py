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

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from engine.cli import UserError


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
        return PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"LoRA adapter {folder} does not fit this model: {exc}") from None


def merged_copy(model: PeftModel) -> nn.Module:
    """A plain module of the base class with the adapter folded into its weights."""
    return copy.deepcopy(model).merge_and_unload()
