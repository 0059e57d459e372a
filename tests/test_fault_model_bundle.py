"""Broken model bundles: truncated or garbage weight files, a corrupt bundle.json, the files of
another architecture. Each gives one clear error naming the file, through the engine, through
`dosepilot predict --model` and through the window's model loader (which then has no engine
and says why; tests/test_gui_faults.py opens a patient in that window)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from engine.cli import main
from engine.dose_model import load_dose_model, save_dose_model
from engine.models.checkpoint import BUNDLE_JSON, CheckpointError
from engine.models.dit import DiffKT3D, DiTConfig
from planner_gui.engine_api import NO_ENGINE, load_dose_engine


@pytest.fixture(scope="module")
def other_architecture(tiny_dose_bundle, tmp_path_factory):
    """A dose-model bundle with a wider, deeper DiT than ``tiny_dose_bundle``'s."""
    model = load_dose_model(tiny_dose_bundle)
    torch.manual_seed(1)
    dit = DiffKT3D(DiTConfig(dim=64, num_layers=2, num_heads=2, ffn_dim=128))
    return save_dose_model(tmp_path_factory.mktemp("other") / "bundle", dit, model.vae,
                           model.codec, normalisation=model.normalisation, provenance={})


def _truncate(name, keep):
    def corrupt(path, other):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:keep(len(data))])
    return corrupt


def _garbage(path, other):
    size = (path / "dit.safetensors").stat().st_size
    (path / "dit.safetensors").write_bytes(os.urandom(size))


def _flip_tensor_bytes(path, other):
    """Bit rot in the tensor data: the header (names, shapes) is intact, the values are not."""
    data = bytearray((path / "dit.safetensors").read_bytes())
    for i in range(len(data) - 4096, len(data), 7):
        data[i] ^= 0x5A
    (path / "dit.safetensors").write_bytes(bytes(data))


def _edit_json(change):
    def corrupt(path, other):
        doc = json.loads((path / BUNDLE_JSON).read_text())
        change(doc)
        (path / BUNDLE_JSON).write_text(json.dumps(doc))
    return corrupt


def _swap_kinds(doc):
    comps = doc["components"]
    comps["dit"], comps["vae"] = comps["vae"], comps["dit"]


# (id, corruption, text the error must contain: the file it names and what is wrong with it)
FAULTS = [
    ("weights cut inside the header", _truncate("dit.safetensors", lambda n: 6),
     "dit.safetensors"),
    ("weights cut in half", _truncate("dit.safetensors", lambda n: n // 2), "dit.safetensors"),
    ("weights one byte short", _truncate("dit.safetensors", lambda n: n - 1),
     "dit.safetensors"),
    ("empty VAE weights", _truncate("vae.safetensors", lambda n: 0), "vae.safetensors"),
    ("garbage weights", _garbage, "cannot read dit.safetensors"),
    ("bit rot in the tensor data", _flip_tensor_bytes,
     "dit.safetensors does not match the SHA-256"),
    ("garbage bundle.json", lambda p, o: (p / BUNDLE_JSON).write_bytes(os.urandom(300)),
     "bundle.json is not valid JSON"),
    ("bundle.json cut short", _truncate(BUNDLE_JSON, lambda n: n // 3),
     "bundle.json is not valid JSON"),
    ("bundle.json with a list of components", _edit_json(lambda d: d.update(components=[])),
     "bundle.json: 'components' must be a JSON object"),
    ("bundle.json of another architecture",
     lambda p, o: shutil.copy(o / BUNDLE_JSON, p / BUNDLE_JSON),
     "dit.safetensors vs bundle.json: 15 missing"),
    ("weights of another architecture",
     lambda p, o: shutil.copy(o / "dit.safetensors", p / "dit.safetensors"),
     "dit.safetensors vs bundle.json: 15 unexpected"),
    ("components swapped", _edit_json(_swap_kinds),
     "bundle.json: component 'dit' is a WanVAE, expected DiffKT3D"),
    ("a VAE-only bundle", _edit_json(lambda d: d["components"].pop("dit")),
     "bundle.json: not a dose model, it lacks ['dit']"),
]


@pytest.fixture(params=FAULTS, ids=[f[0] for f in FAULTS])
def broken(request, tiny_dose_bundle, other_architecture, tmp_path):
    _, corrupt, message = request.param
    path = tmp_path / "bundle"
    shutil.copytree(tiny_dose_bundle, path)
    corrupt(path, other_architecture)
    return path, message


def test_a_broken_bundle_is_one_clear_error_naming_the_file(broken, phantom_dicom, capsys):
    path, message = broken
    with pytest.raises(CheckpointError) as caught:
        load_dose_model(path)
    assert str(path) in str(caught.value) and message in str(caught.value)

    code = main(["predict", str(phantom_dicom.rtplan_path.parent), "--model", str(path),
                 "--out", str(path.parent / "out"), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"dosepilot predict: error: cannot load the model {path}")
    assert message in err and "Traceback" not in err
    assert not (path.parent / "out").exists()

    engine, shown = load_dose_engine(str(path))    # what the window gets
    assert engine is None and shown.startswith(NO_ENGINE) and message in shown


def test_a_weight_file_instead_of_a_bundle_folder_is_named(tiny_dose_bundle):
    engine, shown = load_dose_engine(str(tiny_dose_bundle / "dit.safetensors"))
    assert engine is None
    assert f"a model bundle is a folder with bundle.json; got a file: {tiny_dose_bundle}" in shown
