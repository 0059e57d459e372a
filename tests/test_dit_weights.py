"""Wan 2.1 DiT weights (diffusers and official formats) load into DiffKT3D and compute the same."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from engine.models.checkpoint import CheckpointError
from engine.models.dit import DiffKT3D, DiTConfig, rope_angles
from engine.models.dit_weights import convert_wan_state_dict, detect_format, load_wan_weights

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel  # noqa: E402

HEADS, HEAD_DIM, LAYERS, FFN, CHANNELS, TEXT = 2, 24, 2, 80, 4, 32


def _wan() -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
        in_channels=CHANNELS, out_channels=CHANNELS, text_dim=TEXT, freq_dim=32, ffn_dim=FFN,
        num_layers=LAYERS, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    ).eval()
    with torch.no_grad():  # random everything, including norms, so no mapping error hides
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def _ours() -> DiffKT3D:
    config = DiTConfig(dim=HEADS * HEAD_DIM, num_layers=LAYERS, num_heads=HEADS, ffn_dim=FFN,
                       in_channels=CHANNELS, patch_size=(1, 2, 2), freq_dim=32)
    return DiffKT3D(config).eval()


# official Wan names from diffusers names: the table of notes/diffusion-stack.md §2, applied in
# reverse (official norm3 = diffusers norm2, the cross-attention norm)
_TO_OFFICIAL = [
    (r"\.attn1\.", ".self_attn."), (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^scale_shift_table$", "head.modulation"), (r"^proj_out\.", "head.head."),
]


def _official(diffusers_sd: dict) -> dict:
    out = {}
    for key, value in diffusers_sd.items():
        for pattern, repl in _TO_OFFICIAL:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def wan():
    return _wan()


@pytest.fixture(scope="module")
def checkpoints(wan, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan")
    sd = {k: v.contiguous() for k, v in wan.state_dict().items()}
    official = _official(sd)
    save_file(sd, str(folder / "diffusers.safetensors"))
    save_file({f"model.diffusion_model.{k}": v for k, v in official.items()},
              str(folder / "official.safetensors"))
    torch.save(official, folder / "official.pth")
    return folder, sd, official


def test_official_dict_is_what_diffusers_converts_from(checkpoints):
    """Guards the test's own official-format dict against diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    _, sd, official = checkpoints
    converted = convert_wan_transformer_to_diffusers(dict(official))
    assert set(converted) == set(sd)
    assert all(torch.equal(converted[k], sd[k]) for k in sd)
    assert detect_format(official) == "official" and detect_format(sd) == "diffusers"


@pytest.mark.parametrize("name", ["diffusers.safetensors", "official.safetensors", "official.pth"])
def test_all_formats_load_to_the_same_weights(checkpoints, name):
    folder, sd, _ = checkpoints
    model = _ours()
    load_wan_weights(model, folder / name)
    ours = model.state_dict()
    assert torch.equal(ours["blocks.1.attn.to_out.weight"], sd["blocks.1.attn1.to_out.0.weight"])
    assert torch.equal(ours["blocks.0.ffn.proj_in.bias"], sd["blocks.0.ffn.net.0.proj.bias"])
    assert torch.equal(ours["time_proj.weight"], sd["condition_embedder.time_proj.weight"])
    for slot in range(7):
        assert torch.equal(ours[f"patch_embeds.{slot}.weight"], sd["patch_embedding.weight"])
        assert torch.equal(ours[f"proj_outs.{slot}.bias"], sd["proj_out.bias"])
    assert not ours["role_embedding.weight"].any()


def _zero_cross_attention(wan: WanTransformer3DModel) -> None:
    with torch.no_grad():
        for block in wan.blocks:
            block.attn2.to_out[0].weight.zero_()
            block.attn2.to_out[0].bias.zero_()


@pytest.fixture(scope="module")
def pair(wan):
    reference = _wan()
    _zero_cross_attention(reference)
    model = _ours()
    load_wan_weights(model, dict(wan.state_dict()))
    return reference, model


def test_blocks_match_diffusers_blocks_without_cross_attention(pair):
    reference, model = pair
    torch.manual_seed(1)
    batch, grid = 2, (3, 2, 3)  # patch grid (depth, height, width)
    n = grid[0] * grid[1] * grid[2]
    dim = HEADS * HEAD_DIM
    hidden = torch.randn(batch, 2 * n, dim)
    text = torch.randn(batch, 5, dim)
    latents = torch.zeros(1, CHANNELS, grid[0], 2 * grid[1], 2 * grid[2])
    freqs_cos, freqs_sin = reference.rope(latents)
    cos, sin = rope_angles(model.config, (0,), grid)
    assert torch.allclose(cos, freqs_cos[0, :, 0, 0::2])
    assert torch.allclose(sin, freqs_sin[0, :, 0, 1::2])
    rope2 = (freqs_cos.repeat(1, 2, 1, 1), freqs_sin.repeat(1, 2, 1, 1))
    cos2, sin2 = cos.repeat(2, 1), sin.repeat(2, 1)
    # two slots with different modulation: diffusers' per-token (Wan 2.2) path vs ours per slot
    modulation = torch.randn(batch, 2, 6, dim)
    per_token = modulation.repeat_interleave(n, dim=1)  # [B, 2n, 6, dim]
    with torch.no_grad():
        for ref_block, block in zip(reference.blocks, model.blocks):
            expected = ref_block(hidden, text, per_token, rope2)
            got = block(hidden.view(batch, 2, n, dim), modulation, cos2, sin2).flatten(1, 2)
            assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())
            # the shared (B, 6, dim) modulation path of Wan 2.1 as well
            shared = modulation[:, 0]
            expected = ref_block(hidden[:, :n], text, shared, (freqs_cos, freqs_sin))
            got = block(hidden[:, None, :n], shared[:, None], cos, sin)[:, 0]
            assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())


def test_whole_model_equals_wan_without_cross_attention_at_start(pair):
    """One slot, all target: the pretrained Wan path is undisturbed by the new parts."""
    reference, model = pair
    torch.manual_seed(2)
    latent = torch.randn(2, CHANNELS, 3, 4, 6)
    s = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        expected = reference(latent, s * 1000, torch.randn(2, 5, TEXT), return_dict=False)[0]
        for slot in (0, 4):  # any slot: the slot RoPE phase cancels within a slot
            x = torch.zeros(2, 7, CHANNELS, 3, 4, 6)
            x[:, slot] = latent
            present = torch.zeros(7, dtype=torch.bool)
            present[slot] = True
            out = model(x, s, present.expand(2, 7).clone(), present)
            assert (out[:, slot] - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_sharded_diffusers_folder_and_bf16_weights_load(checkpoints, tmp_path):
    import json

    _, sd, _ = checkpoints
    folder = tmp_path / "Wan2.1-T2V-1.3B-Diffusers" / "transformer"
    folder.mkdir(parents=True)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: sd[k].to(torch.bfloat16) for k in part}, str(folder / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    model = _ours()
    load_wan_weights(model, folder.parent)
    got = model.state_dict()["blocks.0.attn.to_q.weight"]
    assert got.dtype == torch.float32
    assert torch.equal(got, sd["blocks.0.attn1.to_q.weight"].to(torch.bfloat16).float())


def test_mismatched_or_foreign_checkpoints_fail_clearly(checkpoints, tmp_path):
    folder, sd, _ = checkpoints
    small = DiffKT3D(DiTConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=64, in_channels=4))
    with pytest.raises(CheckpointError, match="does not fit this DiTConfig.*shape mismatches"):
        load_wan_weights(small, folder / "diffusers.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan 2.1 DiT state dict"):
        load_wan_weights(small, {"encoder.conv1.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected key.*img_emb"):
        convert_wan_state_dict({**sd, "img_emb.proj.0.weight": torch.zeros(1)}, 7)
    with pytest.raises(CheckpointError, match="not found"):
        load_wan_weights(small, tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_wan_weights(small, bad)
