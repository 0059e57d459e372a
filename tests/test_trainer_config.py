"""Presets: the shipped ones load; bad ones stop with a message naming file, key and rule."""

from __future__ import annotations

import pytest

from engine.cli import main
from trainer.config import ConfigError, config_from_dict, load_config, presets_dir


@pytest.mark.parametrize("name", ["paper", "cpu-small", "default-cpu", "default-gpu", "test-tiny"])
def test_shipped_presets_load(name):
    cfg = load_config(name)
    assert cfg.source.endswith(f"{name}.toml")


def test_paper_preset_has_the_paper_settings():
    cfg = load_config("paper")
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.eps == 1e-8
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 500 and cfg.optim.grad_clip == 0.1
    assert cfg.optim.weight_decay == 0.0 and cfg.data.batch_size == 8
    assert cfg.diffusion.shift == 3.0 and cfg.diffusion.timesteps == 1000
    assert cfg.diffusion.prediction == "v" and cfg.diffusion.sample_steps == 10
    assert cfg.lora.rank == 64 and cfg.data.grid == (97, 128, 160)
    assert cfg.model.gradient_checkpointing  # the 1.3B DiT needs it to train at batch >= 8


def test_gradient_checkpointing_reaches_the_dit():
    from trainer.stages.common import build_dit

    assert not build_dit(load_config("test-tiny")).gradient_checkpointing
    assert build_dit(load_config("test-tiny", ["model.gradient_checkpointing=true"])
                     ).gradient_checkpointing


@pytest.mark.parametrize("raw, message", [
    ({"optimizer": {}}, r"unknown section\(s\) 'optimizer'; allowed: run, optim"),
    ({"optim": {"learning_rate": 1}}, r"unknown key\(s\) in \[optim\]: 'learning_rate'"),
    ({"optim": {"lr": "fast"}}, r"\[optim\] lr must be a number, got 'fast'"),
    ({"optim": {"lr": -1.0}}, r"\[optim\] lr must be > 0"),
    ({"optim": {"betas": [0.9]}}, r"\[optim\] betas must be a list of 2 numbers"),
    ({"optim": {"betas": [0.9, 1.5]}}, r"betas must lie in \[0, 1\)"),
    ({"run": {"max_steps": 1.5}}, r"\[run\] max_steps must be an integer"),
    ({"run": {"device": "tpu"}}, r"\[run\] device = 'tpu' is not one of 'auto', 'cpu', 'cuda'"),
    ({"data": {"flip_lr": 1}}, r"\[data\] flip_lr must be true or false"),
    ({"data": {"val_fraction": 1.0}}, r"val_fraction must be < 1"),
    ({"data": {"grid": [96, 128, 160]}}, r"grid \(96, 128, 160\) must be \(4k\+1, 8m, 8n\)"),
    ({"data": {"crop": [32, 64, 64]}}, r"crop \(32, 64, 64\) must be \(0, 0, 0\) or \(4k\+1"),
    ({"data": {"crop": [33, 64, 200]}}, r"no larger than the grid"),
    ({"data": {"crop": [33, 0, 64]}}, r"crop \(33, 0, 64\) must be"),
    ({"diffusion": {"solver": "ddim"}}, r"solver = 'ddim' is not one of"),
    ({"scardnft": {"group_size": 1}}, r"group_size must be >= 2"),
    ({"scardnft": {"train_timesteps": 20}}, r"train_timesteps \(20\) cannot exceed"),
    ({"refiner": {"band_mm": 0}}, r"\[refiner\] band_mm must be > 0"),
    ({"refiner": {"beam_plate": "yes"}}, r"\[refiner\] beam_plate must be true or false"),
])
def test_invalid_presets_are_refused_with_a_clear_message(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, source="my.toml")


def test_bad_toml_and_missing_preset(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nmax_steps = = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"preset 'nope' not found.*cpu-small, default-cpu,"):
        load_config("nope")
    assert presets_dir().is_dir()


def test_cli_reports_an_invalid_preset_before_any_compute(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = 0\n")
    code = main(["train", "any2any", "--config", str(bad), "--data", str(tmp_path),
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "[optim] lr must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_set_overrides_are_validated_like_the_file():
    cfg = load_config("test-tiny", ["run.max_steps=7", "optim.lr=2e-3", "data.flip_lr=true",
                                    "data.grid=[13, 32, 32]", "model.dit=cpu-base"])
    assert (cfg.run.max_steps, cfg.optim.lr, cfg.data.flip_lr) == (7, 2e-3, True)
    assert cfg.data.grid == (13, 32, 32) and cfg.model.dit == "cpu-base"
    assert load_config("test-tiny", ["refiner.beam_plate=true"]).refiner.beam_plate
    with pytest.raises(ConfigError, match=r"--set 'max_steps=3': expected section.key=value"):
        load_config("test-tiny", ["max_steps=3"])
    with pytest.raises(ConfigError, match=r"with --set run.max_steps=0.*max_steps must be > 0"):
        load_config("test-tiny", ["run.max_steps=0"])


def test_cli_accepts_the_gui_spelling(tmp_path, capsys):
    """The training panel launches `train stage-b --data D --run-dir R --set k=v`."""
    code = main(["train", "stage-b", "--data", str(tmp_path / "missing"), "--run-dir",
                 str(tmp_path / "run"), "--config", "test-tiny", "--set", "run.max_steps=2"])
    assert code == 2
    assert "dataset folder not found" in capsys.readouterr().err


def test_gpu_recipe_is_the_cpu_recipe_architecture():
    """The GPU preset trains the same model as the CPU one (its bundle meets the CPU budgets),
    with a GPU-sized batch and latents held in memory."""
    cpu, gpu = load_config("default-cpu"), load_config("default-gpu")
    assert (gpu.model, gpu.data.grid) == (cpu.model, cpu.data.grid)
    assert gpu.run.device == "auto" and gpu.data.latents_in_memory and gpu.data.batch_size >= 32
