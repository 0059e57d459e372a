"""Official Wan 2.1 and diffusers VAE state dicts load into ``WanVAE`` and give the same model."""

from __future__ import annotations

import datetime

import pytest
import torch
from safetensors.torch import save_file

from engine.models.vae import VAEConfig, WanVAE
from engine.models.vae_weights import (
    convert_official_pth,
    detect_format,
    infer_config,
    load_state_dict_into,
    load_vae,
    official_key_map,
    to_diffusers_keys,
    to_official_keys,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

SMALL = VAEConfig(name="test", base_dim=8, num_res_blocks=1)
TWO_RES = VAEConfig(name="test2", base_dim=4, num_res_blocks=2)  # the layout diffusers hardcodes


def random_reference(config: VAEConfig, seed: int = 1):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLWan(**config.diffusers_kwargs()).eval()


def test_reverse_mapping_is_the_documented_one():
    """diffusers' own official->diffusers converter undoes our diffusers->official mapping."""
    ref = random_reference(TWO_RES)
    official = to_official_keys(ref.state_dict(), TWO_RES)
    assert detect_format(official) == "official"
    assert "decoder.upsamples.4.shortcut.weight" in official
    assert "decoder.upsamples.7.time_conv.weight" in official
    assert "decoder.upsamples.11.resample.1.weight" in official
    back = convert_wan_vae_to_diffusers(official)
    expected = ref.state_dict()
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_key_map_counts_and_is_one_to_one():
    mapping = official_key_map(VAEConfig.preset("wan2.1"))
    assert len(mapping) == 194  # tensors in the official Wan2.1_VAE.pth
    assert len(set(mapping.values())) == len(mapping)


@pytest.mark.parametrize("fmt", ["diffusers", "official"])
def test_both_formats_load_and_give_reference_outputs(tmp_path, fmt):
    ref = random_reference(SMALL)
    state = ref.state_dict()
    if fmt == "official":
        state = to_official_keys(state, SMALL)
    path = tmp_path / f"vae-{fmt}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    vae = load_vae(path, SMALL)
    x = torch.rand(1, 1, 5, 8, 16) * 2 - 1
    with torch.no_grad():
        mu_ref = ref.encode(x.repeat(1, 3, 1, 1, 1)).latent_dist.mode()
        mu = vae.denormalize_latent(vae.encode(x))
        out_ref = ref.decode(mu_ref).sample.mean(1, keepdim=True)
        out = vae.decode(vae.normalize_latent(mu_ref))
    assert float((mu - mu_ref).abs().max() / mu_ref.abs().max()) <= 1e-4
    assert float((out - out_ref).abs().max() / out_ref.abs().max()) <= 1e-4


@pytest.mark.parametrize("fmt", ["diffusers", "official"])
def test_infer_config_from_either_format(fmt):
    state = WanVAE(SMALL).state_dict()
    if fmt == "official":
        state = to_official_keys(state, SMALL)
    config = infer_config(state)
    assert (config.base_dim, config.num_res_blocks, config.dim_mult, config.z_dim) == \
        (8, 1, (1, 2, 4, 4), 16)
    with torch.device("meta"):
        official = WanVAE(VAEConfig.preset("wan2.1")).state_dict()
    assert infer_config(to_official_keys(official, VAEConfig.preset("wan2.1"))).name == "wan2.1"


def test_convert_official_pth_round_trip(tmp_path):
    ref = random_reference(SMALL)
    official = to_official_keys(ref.state_dict(), SMALL)
    src = tmp_path / "Wan2.1_VAE.pth"
    torch.save(official, src)
    before = src.read_bytes()
    dst = convert_official_pth(src, tmp_path / "vae.safetensors")
    assert src.read_bytes() == before
    vae = load_vae(dst)
    assert vae.config.base_dim == 8
    loaded = vae.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ref.state_dict().items())
    with pytest.raises(FileExistsError):
        convert_official_pth(src, dst)


def test_pickled_objects_are_refused(tmp_path):
    src = tmp_path / "evil.pth"
    torch.save({"x": datetime.datetime(2026, 1, 1)}, src)  # any non-tensor object: refused
    with pytest.raises(ValueError, match="not a plain PyTorch weights file"):
        convert_official_pth(src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_mismatched_weights_get_a_clear_error(tmp_path):
    state = WanVAE(SMALL).state_dict()
    with pytest.raises(ValueError, match="another shape"):
        load_state_dict_into(WanVAE(VAEConfig(name="wide", base_dim=12, num_res_blocks=1)), state)
    del state["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match="1 missing"):
        load_state_dict_into(WanVAE(SMALL), state)
    with pytest.raises(ValueError, match="not a Wan 2.1 VAE state dict"):
        to_diffusers_keys({"foo": torch.zeros(1)}, SMALL)
    with pytest.raises(ValueError, match=r"\.safetensors files only"):
        load_vae(tmp_path / "vae.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_vae(bad)
