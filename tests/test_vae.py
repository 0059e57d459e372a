"""The whole-volume Wan VAE against diffusers' chunked ``AutoencoderKLWan`` (the reference)."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine.models.vae import (
    PRESETS,
    VAEConfig,
    WanVAE,
    compute_latent_stats,
    decoded_depth,
    latent_shape,
    upsample_conv,
)

diffusers = pytest.importorskip("diffusers")

SMALL = VAEConfig(
    name="test", base_dim=8, num_res_blocks=1,
    latents_mean=tuple(torch.linspace(-1.0, 1.0, 16).tolist()),
    latents_std=tuple(torch.linspace(0.5, 2.0, 16).tolist()),
)  # fmt: skip


def random_reference(config: VAEConfig, seed: int = 0):
    """A diffusers AutoencoderKLWan with random weights (norm gains randomised too)."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKLWan(**config.diffusers_kwargs()).eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
    return ref


@pytest.fixture(scope="module")
def pair():
    ref = random_reference(SMALL)
    ours = WanVAE(SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("depth", [1, 5, 13])
def test_encode_and_decode_match_diffusers(pair, depth):
    ref, ours = pair
    torch.manual_seed(depth)
    x = torch.rand(1, 1, depth, 16, 24) * 2 - 1
    with torch.no_grad():
        mu_ref = ref.encode(x.repeat(1, 3, 1, 1, 1)).latent_dist.mode()
        z = ours.encode(x)
        assert z.shape == mu_ref.shape == (1, 16, 1 + (depth - 1) // 4, 2, 3)
        assert rel_err(ours.denormalize_latent(z), mu_ref) <= 1e-4
        # decode a latent spread wider than the encoder's, so that the clamp is exercised
        mu = torch.randn_like(mu_ref) * 3
        out_ref = ref.decode(mu).sample
        out = ours.decode(ours.normalize_latent(mu))
        assert out.shape == (1, 1, depth, 16, 24)
        assert rel_err(out, out_ref.mean(dim=1, keepdim=True)) <= 1e-4
        assert rel_err(ours.decode_raw(mu), out_ref) <= 1e-4


def test_batch_of_two_matches_diffusers(pair):
    ref, ours = pair
    x = torch.rand(2, 1, 5, 8, 16) * 2 - 1
    with torch.no_grad():
        mu_ref = ref.encode(x.repeat(1, 3, 1, 1, 1)).latent_dist.mode()
        assert rel_err(ours.denormalize_latent(ours.encode(x)), mu_ref) <= 1e-4


@pytest.mark.parametrize("depth", [7, 12])
def test_non_multiple_depth_drops_trailing_slices_like_diffusers(pair, depth):
    ref, ours = pair
    x = torch.rand(1, 1, depth, 8, 16) * 2 - 1
    usable = 1 + 4 * ((depth - 1) // 4)
    with torch.no_grad():
        mu_ref = ref.encode(x.repeat(1, 3, 1, 1, 1)).latent_dist.mode()
        with pytest.warns(UserWarning, match=f"last {depth - usable} slice"):
            z = ours.encode(x)
        assert rel_err(ours.denormalize_latent(z), mu_ref) <= 1e-4
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(ours.encode(x[:, :, :usable]), z)
        assert ours.decode(z).shape[2] == usable


def test_encode_moments_match_diffusers_posterior(pair):
    ref, ours = pair
    x = torch.rand(1, 3, 5, 8, 16) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mu, logvar = ours.encode_moments(x)
    assert rel_err(mu, dist.mean) <= 1e-4
    assert rel_err(logvar, dist.logvar) <= 1e-4


def test_gradients_flow_for_training(pair):
    _, ours = pair
    x = torch.rand(1, 1, 5, 8, 16) * 2 - 1
    loss = ours.decode(ours.encode(x)).square().mean()
    loss.backward()
    grad = ours.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    ours.zero_grad(set_to_none=True)


def test_training_path_computes_the_same_function(pair):
    """Grad mode uses F.conv3d and out-of-place ops; inference uses oneDNN and in-place ops."""
    _, ours = pair
    x = torch.rand(1, 1, 5, 8, 8) * 2 - 1
    with torch.inference_mode():
        z_fast = ours.encode(x)
        out_fast = ours.decode(z_fast)
    z = ours.encode(x)
    out = ours.decode(z_fast.clone())
    assert rel_err(z.detach(), z_fast) <= 1e-5
    assert rel_err(out.detach(), out_fast) <= 1e-5


@pytest.mark.parametrize("size", [(3, 5), (4, 4)])
def test_upsample_conv_equals_nearest_upsample_then_conv(size):
    torch.manual_seed(3)
    x = torch.randn(2, 6, 3, *size)
    weight, bias = torch.randn(4, 6, 3, 3), torch.randn(4)
    frames = x.permute(0, 2, 1, 3, 4).reshape(6, 6, *size)
    up = torch.nn.functional.interpolate(frames, scale_factor=2.0, mode="nearest-exact")
    ref = torch.nn.functional.conv2d(up, weight, bias, padding=1)
    ref = ref.reshape(2, 3, 4, 2 * size[0], 2 * size[1]).permute(0, 2, 1, 3, 4)
    with torch.inference_mode():
        assert torch.allclose(upsample_conv(x, weight, bias), ref, atol=1e-5)
    assert torch.allclose(upsample_conv(x, weight, bias), ref, atol=1e-5)


def test_normalisation_round_trip_and_stats(pair):
    _, ours = pair
    mu = torch.randn(2, 16, 3, 2, 2)
    assert torch.allclose(ours.denormalize_latent(ours.normalize_latent(mu)), mu, atol=1e-6)
    z = ours.normalize_latent(mu)
    expected = (mu[:, 3] - SMALL.latents_mean[3]) / SMALL.latents_std[3]
    assert torch.allclose(z[:, 3], expected, atol=1e-6)
    shifted = mu * torch.arange(1, 17).view(1, -1, 1, 1, 1) + 5
    mean, std = compute_latent_stats(shifted)
    assert mean == pytest.approx(shifted.transpose(0, 1).reshape(16, -1).mean(1).tolist(),
                                 abs=1e-5)
    assert std[15] > std[0]


def test_presets_and_json_round_trip():
    wan = VAEConfig.preset("wan2.1")
    assert (wan.base_dim, wan.num_res_blocks, wan.dim_mult) == (96, 2, (1, 2, 4, 4))
    assert wan.latents_mean[0] == -0.7571 and wan.latents_std[-1] == 1.9160
    for name, config in PRESETS.items():
        assert VAEConfig.from_json(config.to_json()) == config, name
    small = VAEConfig.preset("cpu8").with_latent_stats([0.5] * 16, [2.0] * 16)
    assert VAEConfig.from_json(small.to_json()).latents_std == (2.0,) * 16
    with pytest.raises(ValueError, match="unknown VAE preset"):
        VAEConfig.preset("nope")
    with pytest.raises(ValueError, match="latents_mean/std need 16"):
        VAEConfig(latents_mean=(0.0,) * 3)
    with pytest.raises(ValueError, match="Wan 2.1 layout"):
        VAEConfig(temperal_downsample=(True, True, False))


def test_parameter_count_of_official_config_matches_diffusers():
    with torch.device("meta"):
        ours = WanVAE(VAEConfig.preset("wan2.1"))
    assert sum(p.numel() for p in ours.parameters()) == 126_892_531  # diffusers, measured


def test_latent_grid_arithmetic_for_model_grid():
    assert latent_shape(97, 128, 160, PRESETS["cpu8"]) == (16, 25, 16, 20)
    assert decoded_depth(25) == 97
    with pytest.raises(ValueError, match="multiples of 8"):
        latent_shape(97, 100, 160, PRESETS["cpu8"])


def test_full_model_grid_shapes_on_smallest_preset():
    vae = WanVAE(VAEConfig.preset("cpu8")).eval()
    with torch.inference_mode():
        z = vae.encode(torch.zeros(1, 1, 97, 128, 160))
        assert z.shape == (1, 16, 25, 16, 20)
        out = vae.decode(z)
    assert out.shape == (1, 1, 97, 128, 160)
    assert float(out.abs().max()) <= 1.0


def test_bad_inputs_get_clear_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        ours.encode(torch.zeros(1, 5, 8, 8))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 1, 5, 12, 16))
    with pytest.raises(ValueError, match="one-channel"):
        ours.encode(torch.zeros(1, 3, 5, 8, 8))
    with pytest.raises(ValueError, match="latent"):
        ours.decode(torch.zeros(1, 4, 2, 1, 1))


@pytest.mark.slow
def test_official_size_config_matches_diffusers():
    """The real Wan 2.1 sizes (127 M parameters), on a small volume: about 1 GB and 30 s."""
    config = VAEConfig.preset("wan2.1")
    ref = random_reference(config)
    ours = WanVAE(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(1, 1, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        mu_ref = ref.encode(x.repeat(1, 3, 1, 1, 1)).latent_dist.mode()
        z = ours.encode(x)
        assert rel_err(ours.denormalize_latent(z), mu_ref) <= 1e-4
        z_ref = (mu_ref - torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)) / \
            torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
        assert rel_err(z, z_ref) <= 1e-4
        out_ref = ref.decode(mu_ref).sample.mean(dim=1, keepdim=True)
        assert rel_err(ours.decode(z), out_ref) <= 1e-4
