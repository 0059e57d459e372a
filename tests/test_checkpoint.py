"""Model bundles: atomic save, checked load, clear errors, no unpickling of user files."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.models.checkpoint import (
    BUNDLE_JSON,
    CheckpointError,
    Component,
    build_component,
    load_bundle,
    pth_to_safetensors,
    read_bundle_config,
    read_pth_weights_only,
    save_bundle,
)
from engine.models.dit import DiffKT3D, DiTConfig

CONFIG = DiTConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=48, in_channels=4, freq_dim=16)


def _codec(config: dict) -> nn.Module:
    """A stand-in for another helper's architecture: components are generic."""
    return nn.Conv3d(1, config["channels"], kernel_size=3)


ARCHS = {"DiffKT3D": "engine.models.dit:DiffKT3D:DiTConfig", "Codec": _codec}
NORMALISATION = {"ct": {"clip": [-1000, 1000]}, "dose": {"scale_gy": 80.0}}
PROVENANCE = {"data": "openkbp", "stages": ["A", "B"], "steps": 1200, "commit": "abc123"}


def _components(seed=0):
    torch.manual_seed(seed)
    dit = DiffKT3D(CONFIG)
    codec = _codec({"channels": 2})
    return {
        "dit": Component("DiffKT3D", CONFIG.to_dict(), dit.state_dict()),
        "tiny_codec": Component("Codec", {"channels": 2}, codec.state_dict()),
    }


def _save(path, seed=0, **kwargs):
    return save_bundle(path, _components(seed), normalisation=NORMALISATION, prediction="v",
                       provenance=PROVENANCE, architectures=ARCHS, **kwargs)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_round_trip_restores_configs_and_weights(tmp_path):
    path = _save(tmp_path / "model")
    config, states = load_bundle(path, ARCHS)
    assert config["prediction"] == "v"
    assert config["normalisation"] == NORMALISATION and config["provenance"] == PROVENANCE
    assert DiTConfig.from_dict(config["components"]["dit"]["config"]) == CONFIG
    assert set(states) == {"dit", "tiny_codec"}
    original = _components()
    for name, comp in original.items():
        assert set(states[name]) == set(comp.state_dict)
        assert all(torch.equal(states[name][k], v) for k, v in comp.state_dict.items())
    model = build_component(config, states, "dit", ARCHS)
    assert isinstance(model, DiffKT3D) and model.config == CONFIG
    assert torch.equal(model.time_proj.weight, original["dit"].state_dict["time_proj.weight"])
    with pytest.raises(CheckpointError, match="no component 'vae'.*\\['dit', 'tiny_codec'\\]"):
        build_component(config, states, "vae", ARCHS)
    assert sorted(p.name for p in path.iterdir()) == [BUNDLE_JSON, "dit.safetensors",
                                                      "tiny_codec.safetensors"]


def test_default_registry_knows_the_dit(tmp_path):
    torch.manual_seed(0)
    comp = Component("DiffKT3D", CONFIG.to_dict(), DiffKT3D(CONFIG).state_dict())
    path = save_bundle(tmp_path / "m", {"dit": comp}, normalisation={})
    config, states = load_bundle(path)
    assert config["provenance"] == {} and "dit" in states


def test_dit_vae_and_tiny_codec_travel_together_in_one_bundle(tmp_path):
    from engine.features.normalization import Normalization
    from engine.models.tiny_codec import TinyCodec, TinyCodecConfig
    from engine.models.vae import VAEConfig, WanVAE

    torch.manual_seed(0)
    vae_config = VAEConfig.preset("cpu8").with_latent_stats([0.5] * 16, [2.0] * 16)
    codec_config = TinyCodecConfig(hidden=8, mid=4, encoder_blocks=1, decoder_blocks=1)
    models = {
        "dit": (DiffKT3D(CONFIG), CONFIG),
        "vae": (WanVAE(vae_config), vae_config),
        "tiny_codec": (TinyCodec(codec_config), codec_config),
    }
    comps = {name: Component(type(m).__name__, cfg.to_dict(), m.state_dict())
             for name, (m, cfg) in models.items()}
    path = save_bundle(tmp_path / "m", comps, normalisation=Normalization().to_dict(),
                       provenance=PROVENANCE)
    config, states = load_bundle(path)
    assert Normalization.from_dict(config["normalisation"]) == Normalization()
    assert VAEConfig.from_dict(config["components"]["vae"]["config"]) == vae_config
    assert TinyCodecConfig.from_dict(config["components"]["tiny_codec"]["config"]) == codec_config
    for name, (model, _) in models.items():
        assert all(torch.equal(states[name][k], v) for k, v in model.state_dict().items())
    _edit_json(path, lambda d: d["components"]["vae"]["config"].update(base_dim=12))
    with pytest.raises(CheckpointError, match="component 'vae' \\(WanVAE\\) vs its config"):
        load_bundle(path)


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    path = _save(tmp_path / "model", seed=0)
    before = _digest(path)
    _save(tmp_path / "model", seed=1)
    assert _digest(path) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a failing save (provenance not JSON) leaves the existing bundle untouched
    after = _digest(path)
    with pytest.raises(TypeError):
        save_bundle(path, _components(), normalisation={}, provenance={"when": object()},
                    architectures=ARCHS)
    assert _digest(path) == after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_never_replaces_something_that_is_not_a_bundle(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    (tmp_path / "file.bin").write_bytes(b"keep me too")
    for target in ("notes", "file.bin"):
        with pytest.raises(CheckpointError, match="is not a model bundle; refusing"):
            _save(tmp_path / target)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    assert (tmp_path / "file.bin").read_bytes() == b"keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "notes"]


def test_failure_while_writing_keeps_the_old_bundle(tmp_path, monkeypatch):
    path = _save(tmp_path / "model")
    before = _digest(path)
    import engine.models.checkpoint as ck

    def broken(tensors, filename):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path / "model", seed=1)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failure_while_swapping_puts_the_old_bundle_back(tmp_path, monkeypatch):
    path = _save(tmp_path / "model")
    before = _digest(path)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        _save(tmp_path / "model", seed=1)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o755)


def test_save_refuses_weights_that_do_not_match_the_config(tmp_path):
    comps = _components()
    wrong = Component("DiffKT3D", {**CONFIG.to_dict(), "num_layers": 2}, comps["dit"].state_dict)
    message = "component 'dit' \\(DiffKT3D\\): .*missing.*blocks.1"
    with pytest.raises(CheckpointError, match=message):
        save_bundle(tmp_path / "m", {"dit": wrong}, normalisation={}, architectures=ARCHS)
    with pytest.raises(CheckpointError, match="prediction must be one of"):
        save_bundle(tmp_path / "m", comps, normalisation={}, prediction="score",
                    architectures=ARCHS)
    with pytest.raises(CheckpointError, match="unknown component kind 'VAE'"):
        save_bundle(tmp_path / "m", {"vae": Component("VAE", {}, {})}, normalisation={},
                    architectures=ARCHS)
    assert not (tmp_path / "m").exists()


def test_loading_never_modifies_the_bundle(tmp_path):
    path = _save(tmp_path / "model")
    before = _digest(path), {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    load_bundle(path, ARCHS)
    assert (_digest(path), {p.name: p.stat().st_mtime_ns for p in path.iterdir()}) == before


def _edit_json(path, change):
    doc = json.loads((path / BUNDLE_JSON).read_text())
    change(doc)
    (path / BUNDLE_JSON).write_text(json.dumps(doc))


def test_clear_errors_for_broken_bundles(tmp_path):
    with pytest.raises(CheckpointError, match="model bundle not found"):
        load_bundle(tmp_path / "missing", ARCHS)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="got a file"):
        load_bundle(tmp_path / "file.bin", ARCHS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="bundle.json is missing"):
        load_bundle(tmp_path / "empty", ARCHS)

    path = _save(tmp_path / "m")
    (path / BUNDLE_JSON).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_bundle(path, ARCHS)

    cases = [
        (lambda d: d.update(format="other"), "is not a dosepilot-model-bundle"),
        (lambda d: d.update(format_version=99), "unsupported bundle format version 99"),
        (lambda d: d.pop("normalisation"), "missing field 'normalisation'"),
        (lambda d: d.update(prediction="score"), "unknown prediction 'score'"),
        (lambda d: d["components"]["dit"].pop("tensors"), "component 'dit' lacks 'tensors'"),
        (lambda d: d["components"]["dit"]["config"].update(dim=64),
         "component 'dit' \\(DiffKT3D\\) vs its config: .*wrong shape"),
        (lambda d: d["components"]["dit"]["config"].update(width=3),
         "invalid DiffKT3D config: unknown DiTConfig fields"),
        (lambda d: d["components"]["tiny_codec"].update(kind="Mystery"),
         "unknown component kind 'Mystery'"),
        (lambda d: d["components"]["dit"].update(weights="../dit.safetensors"), "is missing"),
    ]
    for change, message in cases:
        path = _save(tmp_path / "m")
        _edit_json(path, change)
        with pytest.raises(CheckpointError, match=message):
            load_bundle(path, ARCHS)


def test_clear_errors_for_broken_weight_files(tmp_path):
    path = _save(tmp_path / "m")
    (path / "tiny_codec.safetensors").unlink()
    message = "weight file 'tiny_codec.safetensors' of 'tiny_codec' is missing"
    with pytest.raises(CheckpointError, match=message):
        load_bundle(path, ARCHS)

    path = _save(tmp_path / "m")
    tensors = load_file(str(path / "dit.safetensors"))
    del tensors["time_proj.bias"]
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="1 missing.*time_proj.bias.*1 unexpected.*extra"):
        load_bundle(path, ARCHS)

    path = _save(tmp_path / "m")
    tensors = load_file(str(path / "dit.safetensors"))
    tensors["time_proj.bias"] = tensors["time_proj.bias"].double()
    save_file(tensors, str(path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="dtypes differ.*time_proj.bias"):
        load_bundle(path, ARCHS)

    path = _save(tmp_path / "m")
    (path / "dit.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="cannot read dit.safetensors"):
        load_bundle(path, ARCHS)
    assert read_bundle_config(path)["components"]["dit"]["kind"] == "DiffKT3D"


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pth_files_are_read_weights_only(tmp_path):
    state = {"a.weight": torch.randn(3, 2), "b.bias": torch.arange(4.0)}
    torch.save({"state_dict": state}, tmp_path / "ok.pth")
    loaded = read_pth_weights_only(tmp_path / "ok.pth")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)

    out = pth_to_safetensors(tmp_path / "ok.pth", tmp_path / "ok.safetensors")
    assert torch.equal(load_file(str(out))["a.weight"], state["a.weight"])

    marker = tmp_path / "pwned"
    torch.save({"x": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot be read as a weights-only"):
        read_pth_weights_only(tmp_path / "evil.pth")
    assert not marker.exists()

    torch.save({"lr": 0.1, "nested": {"w": torch.zeros(1)}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="flat state dict"):
        read_pth_weights_only(tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="not found"):
        read_pth_weights_only(tmp_path / "none.pth")


def test_no_torch_load_outside_the_weights_only_reader():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "engine"
    for file in root.rglob("*.py"):
        for call in re.findall(r"torch\.load\(([^)]*)\)", file.read_text()):
            assert "weights_only=True" in call, f"{file}: torch.load({call})"
