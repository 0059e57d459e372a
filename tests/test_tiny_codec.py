"""The tiny preview codec: grid, layout helpers, distillation objective, a training smoke test."""

from __future__ import annotations

import pytest
import torch

from engine.models.tiny_codec import (
    DEFAULT_MODALITY_WEIGHTS,
    TinyCodec,
    TinyCodecConfig,
    depth_to_space,
    distillation_loss,
    distillation_targets,
    space_to_depth,
)
from engine.models.vae import VAEConfig, WanVAE

TINY = TinyCodecConfig(name="tiny", hidden=16, encoder_blocks=1, decoder_blocks=1, mid=8)


def test_model_grid_shapes_match_the_vae_latent_grid():
    codec = TinyCodec().eval()
    with torch.inference_mode():
        z = codec.encode(torch.rand(1, 1, 97, 128, 160) * 2 - 1)
        assert z.shape == (1, 16, 25, 16, 20)
        out = codec.decode(z * 10)
    assert out.shape == (1, 1, 97, 128, 160)
    assert float(out.abs().max()) <= 1.0


def test_space_to_depth_round_trip_and_block_layout():
    x = torch.randn(2, 3, 8, 16, 24)
    y = space_to_depth(x, (4, 8, 8))
    assert y.shape == (2, 3 * 256, 2, 2, 3)
    assert torch.equal(y[1, :256, 1, 0, 2].reshape(4, 8, 8), x[1, 0, 4:8, 0:8, 16:24])
    assert torch.equal(depth_to_space(y, (4, 8, 8)), x)


def test_first_latent_frame_block_holds_only_the_first_slice():
    """Front padding repeats slice 0, so latent frame 0's voxel block is slice 0 (VAE grouping)."""
    codec = TinyCodec(TINY).eval()
    x = torch.rand(1, 1, 9, 8, 8)
    changed = x.clone()
    changed[:, :, 1] += 1.0
    with torch.no_grad():
        first = codec.encoder.conv_in(space_to_depth(
            torch.cat([x[:, :, :1].expand(-1, -1, 3, -1, -1), x], 2), (4, 8, 8)))
        again = codec.encoder.conv_in(space_to_depth(
            torch.cat([changed[:, :, :1].expand(-1, -1, 3, -1, -1), changed], 2), (4, 8, 8)))
    assert torch.equal(first[:, :, 0], again[:, :, 0])
    assert not torch.equal(first[:, :, 1], again[:, :, 1])


def test_training_and_inference_paths_agree():
    torch.manual_seed(4)
    codec = TinyCodec(TINY)
    for block in [*codec.encoder.blocks, *codec.decoder.blocks]:
        torch.nn.init.normal_(block.depth.weight, std=0.1)  # leave the zero init
    x = torch.rand(2, 1, 9, 16, 24) * 2 - 1
    with torch.inference_mode():
        z_fast = codec.encode(x)
        out_fast = codec.decode(z_fast)
    z = codec.encode(x).detach()
    assert torch.allclose(z, z_fast, atol=1e-5)
    assert torch.allclose(codec.decode(z_fast.clone()).detach(), out_fast, atol=1e-5)


def test_bad_shapes_get_clear_errors():
    codec = TinyCodec(TINY)
    with pytest.raises(ValueError, match="depth 1 \\+ 4k"):
        codec.encode(torch.zeros(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 1, D, H, W\]"):
        codec.encode(torch.zeros(1, 2, 5, 16, 16))
    with pytest.raises(ValueError, match="latent"):
        codec.decode(torch.zeros(1, 4, 2, 2, 2))


def test_config_json_round_trip_and_presets():
    assert TinyCodecConfig.from_json(TINY.to_json()) == TINY
    assert TinyCodecConfig.preset("preview").hidden == 64
    with pytest.raises(ValueError, match="unknown tiny codec preset"):
        TinyCodecConfig.preset("nope")



def test_latent_affine_maps_the_distilled_space_to_the_served_one():
    """latent_scale/shift: encode serves z * scale + shift, decode undoes it first, so the
    same weights give the same volumes in another latent normalisation."""
    import dataclasses

    torch.manual_seed(0)
    base = TinyCodec(TINY).eval()
    scale = tuple(0.5 + 0.1 * i for i in range(16))
    shift = tuple(-1.0 + 0.2 * i for i in range(16))
    mapped = TinyCodec(dataclasses.replace(TINY, latent_scale=scale, latent_shift=shift)).eval()
    mapped.load_state_dict(base.state_dict())
    x = torch.rand(1, 1, 9, 16, 16) * 2 - 1
    with torch.inference_mode():
        z, z_mapped = base.encode(x), mapped.encode(x)
        torch.testing.assert_close(z_mapped, z * torch.tensor(scale).view(1, -1, 1, 1, 1)
                                   + torch.tensor(shift).view(1, -1, 1, 1, 1))
        torch.testing.assert_close(mapped.decode(z_mapped), base.decode(z), atol=1e-5, rtol=0)
    assert TinyCodecConfig.from_json(mapped.config.to_json()) == mapped.config
    with pytest.raises(ValueError, match="latent_scale"):
        dataclasses.replace(TINY, latent_scale=(1.0,) * 3, latent_shift=(0.0,) * 3)
    with pytest.raises(ValueError, match="latent_scale"):
        dataclasses.replace(TINY, latent_scale=(0.0,) * 16, latent_shift=(0.0,) * 16)


@pytest.fixture(scope="module")
def frozen_vae():
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(name="t", base_dim=4, num_res_blocks=1)).eval()
    return vae.requires_grad_(False)


def test_loss_is_the_modality_weighted_mean(frozen_vae):
    torch.manual_seed(1)
    codec = TinyCodec(TINY)
    volumes = torch.rand(2, 7, 5, 16, 16) * 2 - 1
    targets = distillation_targets(frozen_vae, volumes)
    assert targets.latents.shape == (2, 7, 16, 2, 2, 2)
    assert targets.decoded.shape == (2, 7, 5, 16, 16)
    loss = distillation_loss(codec, frozen_vae, volumes)
    cached = distillation_loss(codec, None, volumes, targets=targets)
    assert torch.allclose(loss.total, cached.total)
    w = torch.tensor(DEFAULT_MODALITY_WEIGHTS)
    assert w.argmax() == 4  # dose slot weighs most
    expected = ((loss.encoder + loss.decoder) * w).sum() / w.sum()
    assert torch.allclose(loss.total, expected)
    dose_only = distillation_loss(codec, None, volumes, weights=(0, 0, 0, 0, 1, 0, 0),
                                  targets=targets)
    assert torch.allclose(dose_only.total, loss.encoder[4] + loss.decoder[4])
    with pytest.raises(ValueError, match="needs the frozen VAE"):
        distillation_loss(codec, None, volumes)
    with pytest.raises(ValueError, match=r"\[B, 7, D, H, W\]"):
        distillation_loss(codec, frozen_vae, volumes[:, :3])


def test_a_few_distillation_steps_reduce_the_loss(frozen_vae):
    torch.manual_seed(2)
    codec = TinyCodec(TINY)
    volumes = torch.rand(2, 7, 5, 16, 16) * 2 - 1
    targets = distillation_targets(frozen_vae, volumes)
    optimiser = torch.optim.Adam(codec.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = distillation_loss(codec, None, volumes, targets=targets).total
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert not any(p.grad is not None for p in frozen_vae.parameters())
