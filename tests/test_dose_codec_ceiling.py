"""The dose-path ceiling benchmark: held-out physics doses through the model grid, the VAE, the
preview codec and the sampler's noise leak, judged like a model."""

from __future__ import annotations

import json

import torch

from benchmarks import dose_codec_ceiling as dc
from engine import diffusion
from engine.features.modalities import N_SLOTS, Slot
from engine.models.dit import DiffKT3D, DiTConfig, any2any_velocity
from tests.test_heldout_beam_sensitivity import _heldout

LATENT = (16, 25, 16, 20)  # the VAE latent of the 97 x 128 x 160 model grid


def test_the_noise_the_dose_head_cannot_reach_is_still_in_the_sample():
    torch.manual_seed(0)
    dit = DiffKT3D(DiTConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=64)).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
        dit.proj_outs[Slot.DOSE].bias.zero_()  # then the sampler moves that part by nothing
    clean = torch.randn(1, N_SLOTS, *LATENT)
    target = torch.zeros(1, N_SLOTS, dtype=torch.bool)
    target[:, Slot.DOSE] = True
    noise = dc.engine_noise(LATENT)
    start = torch.where(target[..., None, None, None, None], noise, clean)
    with torch.inference_mode():
        sample = diffusion.sample(any2any_velocity(dit, clean, target), start, steps=3)
    dose = sample[0, Slot.DOSE]
    assert (dose - noise).abs().mean() > 0.01  # the sampler did move the dose
    leak = dc.head_orthogonal_part(dit, noise)
    torch.testing.assert_close(dc.head_orthogonal_part(dit, dose), leak, atol=1e-4, rtol=1e-4)
    # a 32-wide head spans 32 of each token's 512 directions: most of the noise is left; the
    # last, cut depth patch (25 = 12 x 2 + 1) gets none
    whole = noise[:, :24]
    assert 0.9 < leak[:, :24].norm() / whole.norm() < 1.0
    assert leak[:, 24:].abs().max() == 0


def test_engine_noise_is_the_engines_seed_0_dose_noise():
    full = diffusion.initial_noise((N_SLOTS, *LATENT), torch.Generator().manual_seed(0))
    torch.testing.assert_close(dc.engine_noise(LATENT), full[Slot.DOSE])


def test_every_path_is_judged_on_every_pair(tmp_path, tiny_dose_bundle, capsys):
    data, heldout = _heldout(tmp_path, {"pt_201": 2})
    assert dc.main(["--model", str(tiny_dose_bundle), "--heldout", str(heldout),
                    "--dataset", str(data), "--validation", str(data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = json.loads(lines[0])
    assert row["plans"] == ["pt_201_plan0", "pt_201_plan1"]
    assert set(row["paths"]) == set(dc.PATHS)
    # resampling to the model grid and back keeps the change; an untrained VAE does not
    assert row["paths"]["grid"]["correlation"] > 0.9
    assert row["paths"]["grid"]["mae_gy"] < row["paths"]["vae"]["mae_gy"]
    summary = json.loads("\n".join(lines[1:]))
    assert summary["pairs"] == 1
    assert set(summary["paths"]["vae_leak"]) >= {"correlation", "change_ratio", "mae_gy"}
    # the OpenKBP scores of the clinical dose after each path: a perfect DiT's floor
    floor = summary["validation_floor"]
    assert set(floor) == set(dc.PATHS) and floor["grid"]["cases"] == 1
    assert floor["grid"]["dose_score"] < floor["vae"]["dose_score"]
