"""LoRA on the real DiffKT3D: rank-64 adapters on attention + FFN, modulation MLPs trainable,
base frozen; adapters save, load and merge (merged output equals adapter output)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.models.dit import DiffKT3D, DiTConfig
from trainer import lora
from trainer.stages.common import dit_lora_targets

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _tiny_dit() -> DiffKT3D:
    torch.manual_seed(0)
    return DiffKT3D(DiTConfig(dim=64, num_layers=2, num_heads=2, ffn_dim=128,
                              patch_size=(1, 2, 2), rope_slot_dim=2)).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 16, 2, 4, 4, generator=g)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, 4] = True
    return x, torch.tensor([0.3, 0.8]), mask


def _train_a_little(model, steps=3):
    opt = torch.optim.Adam(lora.trainable_parameters(model), lr=1e-2)
    x, t, mask = _inputs()
    for _ in range(steps):
        loss = model(x, t, mask).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_targets_trainables_and_identity_at_init():
    base = _tiny_dit()
    x, t, mask = _inputs()
    ref = base(x, t, mask)
    targets, trainable = dit_lora_targets(base)
    assert len(targets) == 2 * 6 and all(isinstance(base.get_submodule(n), nn.Linear)
                                         for n in targets)
    assert set(trainable) == {"time_embedder.linear_1", "time_embedder.linear_2", "time_proj"}
    model = lora.attach_lora(base, targets, rank=64, alpha=64, trainable_modules=trainable)
    assert torch.equal(model(x, t, mask), ref)                   # B = 0 at init
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)
    assert any("attn.to_q.lora_A" in n for n in names) and any("ffn.proj_out.lora_B" in n
                                                                for n in names)
    assert any("time_proj.modules_to_save" in n for n in names)
    a = model.get_submodule("base_model.model.blocks.0.attn.to_q").lora_A["default"]
    assert a.weight.shape == (64, 64)


def test_save_load_merge_give_the_adapter_output(tmp_path):
    targets, trainable = dit_lora_targets(_tiny_dit())
    model = lora.attach_lora(_tiny_dit(), targets, rank=64, alpha=64,
                             trainable_modules=trainable)
    _train_a_little(model)
    x, t, mask = _inputs()
    with torch.no_grad():
        out = model(x, t, mask)
        with model.disable_adapter():
            base_out = model(x, t, mask)
    assert (out - base_out).abs().max() > 1e-3                   # the adapter changed something
    folder = lora.save_adapter(model, tmp_path / "adapter")
    assert (folder / "adapter_model.safetensors").is_file()
    loaded = lora.load_adapter(_tiny_dit(), folder)
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, mask), out, atol=1e-6)
        merged = lora.merged_copy(loaded)
        assert type(merged) is DiffKT3D
        assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(x, t, mask), out, atol=1e-5)
        # merging worked on a copy: the adapter model is unchanged
        assert torch.allclose(loaded(x, t, mask), out, atol=1e-6)


def test_loading_an_adapter_into_another_architecture_is_refused(tmp_path):
    from engine.errors import UserError
    targets, trainable = dit_lora_targets(_tiny_dit())
    model = lora.attach_lora(_tiny_dit(), targets, rank=8, alpha=8, trainable_modules=trainable)
    lora.save_adapter(model, tmp_path / "adapter")
    other = DiffKT3D(DiTConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64,
                               patch_size=(1, 2, 2), rope_slot_dim=2))
    with pytest.raises(UserError, match="does not fit"):
        lora.load_adapter(other, tmp_path / "adapter")
    with pytest.raises(UserError, match="no LoRA adapter"):
        lora.load_adapter(other, tmp_path)
