"""Beam-pair training (``[beam_pairs]``) and in-memory latents of the flow stages, on a real
latent cache folder and the tiny DiT of the test preset."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.errors import UserError
from trainer.caches import Cache
from trainer.config import load_config
from trainer.distributed import DistContext
from trainer.stages.common import build_dit
from trainer.stages.flow import LatentItem, PairItem, beam_pairs, dose_targets, flow_task

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SHAPE = (7, 16, 3, 4, 4)           # the test preset's latent stack (9 x 32 x 32 grid)


def _task(tmp_path, latents: dict[str, torch.Tensor], groups: dict[str, str], **overrides):
    """A dose task over a cache folder holding ``latents`` (identity + flip_lr per case)."""
    cache = Cache(tmp_path / "cache")
    for name, x in latents.items():
        cache.write_latents(name, {"identity": x, "flip_lr": x.flip(-1)}, {"name": "test"})
    index = {"variants": ["identity", "flip_lr"],
             "cases": [{"name": n, "split": "train"} for n in latents]}
    cfg = load_config("test-tiny")
    for section, values in overrides.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                       **values)})
    torch.manual_seed(0)
    model = build_dit(cfg)
    return flow_task("dose", model, cache, index, cfg, CPU, dose_targets, groups=groups), model


def test_pairs_join_the_plans_of_one_patient_only():
    items = [LatentItem(n, ("identity",)) for n in
             ("pt_2_plan1", "pt_1", "pt_2", "pt_1_plan0", "pt_2_plan0", "pt_3")]
    groups = {i.name: i.name.split("_plan")[0] for i in items}
    pairs = beam_pairs(items, groups)
    assert [p.name for p in pairs] == ["pt_1+pt_1_plan0", "pt_2+pt_2_plan0", "pt_2+pt_2_plan1",
                                       "pt_2_plan0+pt_2_plan1"]      # pt_3 has one plan


def test_identical_plans_have_zero_pair_loss_and_distinct_ones_add_it(tmp_path):
    """A pair shares flip, flow time and noise: two plans with the same latents get exactly the
    same prediction (pair loss 0); other doses give a pair loss that enters with its weight."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(SHAPE, generator=g)
    other = base.clone()
    other[4] += torch.randn(SHAPE[1:], generator=g)            # another dose, same anatomy
    latents = {"pt_1": base, "pt_1_plan0": base.clone(), "pt_2": base, "pt_2_plan0": other}
    groups = {"pt_1": "pt_1", "pt_1_plan0": "pt_1", "pt_2": "pt_2", "pt_2_plan0": "pt_2"}
    task, model = _task(tmp_path, latents, groups, beam_pairs={"enabled": True, "weight": 2.0})
    same, different = task.train_items
    assert isinstance(same, PairItem) and same.name == "pt_1+pt_1_plan0"
    value, stats = task.loss(model, [same], [torch.Generator().manual_seed(5)])
    assert stats["pair_loss"] == 0.0 and value.item() == pytest.approx(stats["flow_loss"])
    value, stats = task.loss(model, [different], [torch.Generator().manual_seed(5)])
    assert stats["pair_loss"] > 0.01
    assert value.item() == pytest.approx(stats["flow_loss"] + 2.0 * stats["pair_loss"], rel=1e-5)


def test_pair_loss_is_the_error_of_the_predicted_dose_difference(tmp_path):
    """For v-prediction the pair term is the MSE of (v_a - v_b) against x0_b - x0_a on the
    dose slot, recomputed here from the model's own predictions."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    task, model = _task(tmp_path, {"pt_1": a, "pt_1_plan0": b}, {"pt_1_plan0": "pt_1"},
                        beam_pairs={"enabled": True, "weight": 1.0})
    seen = []
    hook = model.register_forward_hook(lambda m, args, out: seen.append((args, out)))
    _, stats = task.loss(model, task.train_items, [torch.Generator().manual_seed(3)])
    hook.remove()
    (x, s, mask), pred = seen[0]
    assert torch.equal(s[0], s[1])
    assert torch.equal(mask, torch.stack([dose_targets(None, None)] * 2))
    variant_a = a if torch.equal(x[0, :4], a[:4]) else a.flip(-1)   # conditions are clean
    variant_b = b if torch.equal(x[1, :4], b[:4]) else b.flip(-1)
    expected = ((pred[0, 4] - pred[1, 4]) - (variant_b[4] - variant_a[4])).square().mean()
    assert stats["pair_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_pairs_need_a_patient_with_two_plans(tmp_path):
    x = torch.zeros(SHAPE)
    with pytest.raises(UserError, match="no training patient has two plans"):
        _task(tmp_path, {"pt_1": x, "pt_2": x}, {}, beam_pairs={"enabled": True})


@pytest.mark.parametrize("in_memory", [False, True])
def test_latents_in_memory_are_read_once(tmp_path, in_memory):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    task, model = _task(tmp_path, {"pt_1": x}, {}, data={"latents_in_memory": in_memory})
    item, gen = task.train_items[0], torch.Generator().manual_seed(0)
    first = task.loss(model, [item], [gen])[0].item()
    (tmp_path / "cache" / "latents" / "pt_1.safetensors").unlink()
    if not in_memory:
        with pytest.raises(UserError, match="missing from the latent cache"):
            task.loss(model, [item], [torch.Generator().manual_seed(0)])
        return
    assert task.loss(model, [item], [torch.Generator().manual_seed(0)])[0].item() == first
