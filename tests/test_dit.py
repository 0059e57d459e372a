"""DiffKT3D DiT: config, shapes, Any2Any roles, absent slots, 4D RoPE, sampling wrapper."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from engine import diffusion
from engine.models.dit import (
    LORA_TARGETS,
    PRESETS,
    DiffKT3D,
    DiTConfig,
    any2any_velocity,
    noise_targets,
    preset,
    rope_angles,
    rope_band_dims,
    strip_unreachable_noise,
    unreachable_part,
)

TINY = DiTConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, in_channels=4,
                 patch_size=(2, 2, 2), freq_dim=16)
GRID = (5, 6, 3)  # odd sizes: the patch embedding pads, the head crops


@pytest.fixture(scope="module")
def model() -> DiffKT3D:
    torch.manual_seed(0)
    m = DiffKT3D(TINY).eval()
    with torch.no_grad():  # a trained-looking role embedding (it starts at zero)
        m.role_embedding.weight.normal_()
    return m


def _x(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 7, TINY.in_channels, *GRID, generator=g)


def _mask(batch, *targets):
    m = torch.zeros(batch, 7, dtype=torch.bool)
    m[:, list(targets)] = True
    return m


def test_config_json_round_trip_and_presets():
    for config in PRESETS.values():
        assert DiTConfig.from_json(config.to_json()) == config
        assert DiTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    wan = preset("wan2.1-1.3b")
    assert (wan.dim, wan.num_layers, wan.num_heads, wan.ffn_dim, wan.patch_size, wan.in_channels) \
        == (1536, 30, 12, 8960, (1, 2, 2), 16)
    assert rope_band_dims(wan.head_dim) == (44, 42, 42)
    assert preset("cpu-small").patch_size == (2, 4, 4)
    with pytest.raises(ValueError, match="unknown DiT preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="rope_slot_dim"):
        DiTConfig(dim=32, num_heads=2, rope_slot_dim=10)
    with pytest.raises(ValueError, match="unknown DiTConfig fields: \\['depth'\\]"):
        DiTConfig.from_dict({"depth": 3})


def test_wan_preset_has_wan_1_3b_sizes_minus_text_and_cross_attention():
    """notes/diffusion-stack.md §2: 1,126,858,816 parameters without cross-attention and text;
    36,991,232 per block. DiffKT3D adds 6 more patch embeddings and heads and the roles."""
    with torch.device("meta"):
        model = DiffKT3D(preset("wan2.1-1.3b"))
    patch_embed, head = 1536 * 16 * 1 * 2 * 2 + 1536, 64 * 1536 + 64
    expected = 1_126_858_816 + 6 * (patch_embed + head) + 2 * 1536
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 36_991_232


def test_cpu_small_sequence_length_on_the_full_latent_grid():
    cfg = preset("cpu-small")
    grid = [-(-n // p) for n, p in zip((25, 16, 20), cfg.patch_size)]
    assert 7 * grid[0] * grid[1] * grid[2] == 1820
    cos, _ = rope_angles(cfg, tuple(range(7)), tuple(grid))
    assert cos.shape == (1820, cfg.head_dim // 2)


def test_output_shape_and_zeros_outside_targets(model):
    x = _x()
    with torch.no_grad():
        out = model(x, torch.tensor([0.2, 0.8]), _mask(2, 4, 6))
    assert out.shape == x.shape
    assert out[:, [4, 6]].abs().sum() > 0
    assert out[:, [0, 1, 2, 3, 5]].abs().sum() == 0
    assert torch.isfinite(out).all()


def test_changing_a_condition_changes_the_targets(model):
    x, mask, t = _x(), _mask(2, 4), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        base = model(x, t, mask)
        x2 = x.clone()
        x2[:, 0] += 1.0  # edit the CT condition
        assert (model(x2, t, mask)[:, 4] - base[:, 4]).abs().max() > 1e-3


def test_conditions_are_embedded_as_clean_whatever_t(model):
    """Condition slots get timestep 0 and the condition role; targets get 1000 s."""
    x, mask = _x(), _mask(2, 4)
    seen = []
    hook = model.time_embedder.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    try:
        with torch.no_grad():
            for t in (0.1, 0.9):
                model(x, torch.tensor([t, t]), mask)
    finally:
        hook.remove()
    first, second = seen  # [B, P, freq_dim] sinusoids per (sample, present slot)
    zero = torch.cat([torch.ones(8), torch.zeros(8)])  # [cos, sin] of timestep 0
    for slot in (0, 1, 2, 3, 5, 6):
        assert torch.equal(first[:, slot], zero.expand(2, -1))
        assert torch.equal(second[:, slot], zero.expand(2, -1))
    assert not torch.allclose(first[:, 4], second[:, 4])


def test_absent_slots_are_dropped(model):
    x, mask, t = _x(), _mask(2, 4), torch.tensor([0.3, 0.6])
    present = torch.ones(7, dtype=torch.bool)
    present[[2, 6]] = False
    with torch.no_grad():
        a = model(x, t, mask, present)
        x2 = x.clone()
        x2[:, [2, 6]] = torch.randn_like(x2[:, [2, 6]]) * 100
        b = model(x2, t, mask, present)
        full = model(x, t, mask)
    assert torch.equal(a, b)  # absent content cannot matter
    assert not torch.allclose(a, full)  # but absence is not the same as presence
    with pytest.raises(ValueError, match="slots \\[6\\] are targets but not present"):
        model(x, t, _mask(2, 4, 6), present)
    with pytest.raises(ValueError, match="no slot is present"):
        model(x, t, _mask(2), torch.zeros(7, dtype=torch.bool))


def test_per_sample_target_masks_match_single_sample_runs(model):
    x, t = _x(), torch.tensor([0.25, 0.75])
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 4] = True
    mask[1, [1, 2]] = True
    with torch.no_grad():
        batched = model(x, t, mask)
        for i in range(2):
            single = model(x[i : i + 1], t[i : i + 1], mask[i : i + 1])
            assert torch.allclose(batched[i], single[0], atol=1e-5)


def test_bad_inputs_are_rejected(model):
    x = _x()
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :6], torch.ones(2), _mask(2, 4))
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.ones(3), _mask(2, 4))
    with pytest.raises(ValueError, match="target_mask must be a bool"):
        model(x, torch.ones(2), _mask(2, 4).float())
    with pytest.raises(ValueError, match="t must be a tensor"):
        model(x, 0.5, _mask(2, 4))
    with pytest.raises(ValueError, match="x must be a .* tensor, got list"):
        model([x], torch.ones(2), _mask(2, 4))
    with pytest.raises(ValueError, match="present must be a bool tensor"):
        model(x, torch.ones(2), _mask(2, 4), [True] * 7)


def test_rope_same_slot_is_wan_3d_and_slots_differ_by_a_phase():
    cfg = DiTConfig(dim=64, num_heads=2)  # head dim 32: bands (12, 10, 10), slot pairs 2
    grid = (3, 2, 2)
    cos, sin = rope_angles(cfg, (0, 3), grid)
    n = 12
    phase = torch.atan2(sin, cos)
    delta = torch.remainder(phase[n:] - phase[:n] + torch.pi, 2 * torch.pi) - torch.pi
    d_pairs = rope_band_dims(cfg.head_dim)[0] // 2
    slot_band = slice(d_pairs - 2, d_pairs)
    expected = 3 * torch.tensor([1.0, 0.01])  # slot distance x slot frequencies theta^(-2i/4)
    assert torch.allclose(delta[:, slot_band], expected.expand(n, 2), atol=1e-5)
    delta[:, slot_band] = 0
    assert delta.abs().max() < 1e-5  # everything else is the same per slot: Wan's 3D RoPE


def test_gradients_reach_every_parameter_and_checkpointing_agrees():
    torch.manual_seed(0)
    m = DiffKT3D(TINY)
    x0, noise = _x(seed=1), _x(seed=2)
    mask, s = _mask(2, 4, 5), torch.tensor([0.4, 0.7])
    x = noise_targets(x0, noise, s, mask)
    assert torch.equal(x[:, [0, 1, 2, 3, 6]], x0[:, [0, 1, 2, 3, 6]])  # conditions stay clean
    assert torch.equal(x[:, [4, 5]], diffusion.add_noise(x0, noise, s)[:, [4, 5]])

    def grads():
        m.zero_grad()
        pred = m(x, s, mask)
        weight = mask[..., None, None, None, None]
        diffusion.flow_matching_loss(pred, x0, noise, mask=weight).backward()
        return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    plain = grads()
    m.gradient_checkpointing = True
    checkpointed = grads()
    # every condition feeds the trunk; only the output heads of non-target slots are not run
    heads_unused = {f"proj_outs.{i}.{p}" for i in (0, 1, 2, 3, 6) for p in ("weight", "bias")}
    assert set(plain) == {k for k, _ in m.named_parameters()} - heads_unused
    assert all(g.any() for g in plain.values())
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_training_after_inference_mode_use():
    """Cached RoPE tables made under inference_mode must not break a later backward."""
    cfg = DiTConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=32, in_channels=4, freq_dim=16,
                    patch_size=(1, 3, 3))  # a config no other test uses: a fresh cache entry
    m = DiffKT3D(cfg)
    x, mask, t = _x(), _mask(2, 4), torch.tensor([0.5, 0.5])
    with torch.inference_mode():
        m(x, t, mask)
    m(x, t, mask).square().mean().backward()
    assert m.blocks[0].attn.to_q.weight.grad is not None


def test_any2any_velocity_never_lets_noise_reach_conditions(model):
    clean, mask = _x(seed=3), _mask(2, 4)
    velocity = any2any_velocity(model, clean, mask)
    x_s = _x(seed=4)
    s = torch.tensor([0.6, 0.6])
    with torch.no_grad():
        v = velocity(x_s, s)
        noisy_conditions = x_s.clone()
        noisy_conditions[:, [0, 1, 2, 3, 5, 6]] += 50 * torch.randn(2, 6, 4, *GRID)
        assert torch.equal(velocity(noisy_conditions, s), v)
        assert v[:, [0, 1, 2, 3, 5, 6]].abs().sum() == 0
        # sampling moves only the target; the result differs from the initial noise there only
        noise = diffusion.initial_noise(clean.shape, torch.Generator().manual_seed(0))
        out = diffusion.sample(velocity, noise, steps=3)
    assert torch.equal(out[:, [0, 1, 2, 3, 5, 6]], noise[:, [0, 1, 2, 3, 5, 6]])
    assert not torch.allclose(out[:, 4], noise[:, 4])


@pytest.mark.parametrize("prediction", ["epsilon", "x0"])
def test_any2any_velocity_converts_other_parameterisations(model, prediction):
    clean, mask, s = _x(seed=3), _mask(2, 4), torch.tensor([0.3, 0.6])
    x_s = torch.where(mask[..., None, None, None, None], _x(seed=5), clean)
    with torch.no_grad():
        raw = model(x_s, s, mask)
        v = any2any_velocity(model, clean, mask, prediction=prediction)(x_s, s)
    expected = diffusion.to_velocity(raw, x_s, s, prediction)
    assert torch.allclose(v[:, 4], expected[:, 4])


def test_lora_targets_wrap_attention_and_ffn_and_start_as_identity():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = DiffKT3D(TINY).eval()
    x, mask, t = _x(), _mask(2, 4), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        expected = base(x, t, mask)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=4,
                                                     target_modules=list(LORA_TARGETS)))
    wrapped = {n for n, _ in lora.named_modules() if n.endswith("lora_A")}
    assert len(wrapped) == len(LORA_TARGETS) * TINY.num_layers
    with torch.no_grad():
        assert torch.equal(lora(x, t, mask), expected)


def test_bf16_autocast_keeps_the_fused_rms_norm(model):
    """Under bf16 autocast the q/k norms get bf16 input and a float32 weight: the norm must
    not fall back from the fused kernel (torch warns "Mismatch dtype between input and
    weight"), and it must agree with the float32 model to bf16 precision."""
    x, s, mask = _x(), torch.tensor([0.3, 0.7]), _mask(2, 4)
    with torch.inference_mode():
        reference = model(x, s, mask)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fast = model(x, s, mask)
    torch.testing.assert_close(fast.float(), reference, atol=0.05, rtol=0.05)


NARROW = DiTConfig(dim=16, num_layers=1, num_heads=2, ffn_dim=32, in_channels=4,
                   patch_size=(2, 2, 2), freq_dim=16)  # 16 features -> 32 values per token


@pytest.mark.parametrize("solver", ["euler", "dpm++2m"])
def test_the_noise_a_head_cannot_reach_survives_sampling_and_is_stripped(solver):
    torch.manual_seed(0)
    narrow = DiffKT3D(NARROW).eval()
    with torch.no_grad():
        for p in narrow.parameters():
            p.add_(0.05 * torch.randn_like(p))
        narrow.proj_outs[4].bias.zero_()  # then the sampler moves that part by nothing at all
    clean, mask = _x(seed=3), _mask(2, 4)
    noise = diffusion.initial_noise(clean.shape, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = diffusion.sample(any2any_velocity(narrow, clean, mask), noise, steps=3,
                               solver=solver)
    assert (out[:, 4] - noise[:, 4]).abs().mean() > 0.01  # the sampler did move the dose
    leak = unreachable_part(narrow, 4, noise[:, 4])
    torch.testing.assert_close(unreachable_part(narrow, 4, out[:, 4]), leak, atol=1e-5, rtol=0)
    # a 16-wide head spans 16 of each token's 32 directions; the cut last depth patch
    # (5 = 2 x 2 + 1) is left alone
    assert 0.5 < leak[:, :, :4].norm() / noise[:, 4, :, :4, :6, :2].norm() < 0.9
    assert leak[:, :, 4:].abs().max() == 0 and leak[..., 2:].abs().max() == 0

    stripped = strip_unreachable_noise(narrow, out, noise, mask)
    assert unreachable_part(narrow, 4, stripped[:, 4]).abs().max() < 1e-5
    torch.testing.assert_close(stripped[:, 4], out[:, 4] - leak)
    assert torch.equal(stripped[:, [0, 1, 2, 3, 5, 6]], out[:, [0, 1, 2, 3, 5, 6]])
    # other parameterisations reach the noise through x_s: nothing to strip
    assert torch.equal(strip_unreachable_noise(narrow, out, noise, mask, "epsilon"), out)


def test_a_head_of_full_rank_or_of_zeros_reaches_everything_or_nothing(model):
    latent = _x(seed=6)[:, 4, :, :4, :6, :2]
    assert unreachable_part(model, 4, latent).abs().max() < 1e-5  # 32 features, 32 values
    zero = DiffKT3D(TINY)
    assert unreachable_part(zero, 4, latent).abs().max() < 1e-5
    with torch.no_grad():  # the cached basis must follow an in-place change of the weights
        zero.proj_outs[4].weight.zero_()
    torch.testing.assert_close(unreachable_part(zero, 4, latent), latent)
