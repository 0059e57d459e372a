"""The recorded recipe of the shipped model (resources/models/default/train.sh) runs end to end:
every stage, the physics plans joining Stages B and C, the bundle the engine loads, and a rerun that
resumes instead of recomputing. Run on a tiny grid (test-tiny preset) with two steps per stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.dose_model import load_dose_model
from trainer.caches import Cache
from trainer.events import read_events

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "resources" / "models" / "default" / "train.sh"


def _link(sources, folder: Path, names=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sources):
        (folder / (names[i] if names else src.name)).symlink_to(src)


def test_recipe_trains_every_stage_with_the_physics_plans_and_resumes(openkbp_dir, tmp_path):
    train = sorted((openkbp_dir / "train").glob("pt_*.npz"))[:4]
    openkbp = tmp_path / "openkbp"
    _link(train, openkbp / "train")
    _link(sorted((openkbp_dir / "validation").glob("pt_*.npz"))[:1], openkbp / "validation")
    physics = tmp_path / "physics"        # a generated plan has the OpenKBP layout plus beams
    _link(train[:1], physics, [f"{train[0].stem}_plan0.npz"])
    physics_v2 = tmp_path / "physics-v2"  # Stage J's beam pairs need a patient's two plans
    _link(train[:1] * 2, physics_v2, [f"{train[0].stem}_plan{k}.npz" for k in (0, 1)])
    runs = tmp_path / "runs"
    env = dict(os.environ, OPENKBP=str(openkbp), PHYSICS=str(physics), N_TRAIN="4", N_VAL="1",
               VAE_STEPS="2", DISTILL_STEPS="2", A_STEPS="2", B_STEPS="2", C_STEPS="2",
               N_C="2", D_STEPS="2", D_DISTILL_STEPS="2", D_CROP="5, 16, 16", NICE="0",
               E_STEPS="2", N_E_CLINICAL="2", N_E_PHYSICS="1", E_CROP="9, 16, 16",
               F_STEPS="2", F_CODEC_STEPS="2", N_F_CLINICAL="3", N_F_PHYSICS="1", G_STEPS="2",
               H_STEPS="2", N_H_CLINICAL="1", N_H_PHYSICS="1", J_STEPS="2", N_J_PHYSICS="2",
               J_DECAY="1", I_STEPS="2", N_I="3",
               PHYSICS_V2=str(physics_v2),
               GPU_PRESET=str(REPO / "resources/presets/test-tiny.toml"),
               THREADS="1", PRESET=str(REPO / "resources/presets/test-tiny.toml"),
               CROP="5, 16, 16", PATH=f"{Path(sys.executable).parent}{os.pathsep}"
               f"{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO))

    out = subprocess.run(["bash", str(RECIPE), str(runs)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    beam_aware = runs / "stage-h" / "model"
    post = runs / "stage-i" / "model"
    assert out.stdout.strip().endswith(f"model bundle: {post}")
    # Stage I: ScardNFT of Stage H's bundle on 3 OpenKBP cases; its refiner and codec kept
    stage_i = json.loads((post / "bundle.json").read_text())["provenance"]
    assert stage_i["stage"] == "scardnft" and stage_i["init_from"] == str(beam_aware)
    nft, refined = load_dose_model(post), load_dose_model(beam_aware)
    for part in ("refiner", "codec", "vae"):
        assert all(a.equal(b) for a, b in zip(getattr(nft, part).state_dict().values(),
                                              getattr(refined, part).state_dict().values()))
    assert any(not a.equal(b) for a, b in zip(nft.dit.state_dict().values(),
                                              refined.dit.state_dict().values()))
    assert len(list((runs / "data-i" / "train").glob("pt_*.npz"))) == 3
    final = runs / "stage-f-codec" / "model"
    # Stage G: the 4 OpenKBP cases; Stage H: a clinical case, a physics plan, the validation case
    # Stage J: Stage H's and the patient's second physics plan, the quick plan an 8th input
    # and the style a 9th
    for stage, beam_plate, quick, samples in (("stage-g", False, False, 4),
                                              ("stage-h", True, False, 3),
                                              ("stage-j", True, True, 4)):
        provenance = json.loads((runs / stage / "model/bundle.json").read_text())["provenance"]
        assert provenance["stage"] == "dose-refiner" and provenance["init_from"] == str(final)
        config = load_dose_model(runs / stage / "model").refiner.config
        assert (config.beam_plate, config.quick_plan) == (beam_plate, quick)
        assert config.band_mm == (100.0 if stage == "stage-j" else 60.0)
        assert config.clinical_style == config.dit_class_solution == (stage == "stage-j")
        assert len(list((runs / stage / "refiner-samples").glob("*.npz"))) == samples
    start = next(e for e in read_events(runs / "stage-j") if e["type"] == "start")
    assert start["config"]["optim"]["decay_steps"] == 1
    # Stages H and J: the first clinical case and the first (Stage J: two) physics plans
    for data, plans in (("data-h", 1), ("data-j", 2)):
        assert sorted(p.name for p in (runs / data / "train").rglob("*.npz")) == sorted(
            [train[0].name] + [f"{train[0].stem}_plan{k}.npz" for k in range(plans)])
    stage_f = json.loads((final / "bundle.json").read_text())["provenance"]
    assert stage_f["stage"] == "codec-decoder" and stage_f["init_from"] == str(
        runs / "stage-f/model")
    assert json.loads((runs / "stage-f/model/bundle.json").read_text())["provenance"][
        "init_from"] == str(runs / "stage-e/model")
    shipped, decoder = load_dose_model(final, "cpu"), load_dose_model(runs / "stage-f/model")
    assert all(a.equal(b) for a, b in zip(shipped.vae.state_dict().values(),
                                          decoder.vae.state_dict().values()))
    assert len(list((runs / "data-f" / "train").glob("pt_*.npz"))) == 3
    bundle = runs / "stage-e" / "model"
    stage_e = json.loads((bundle / "bundle.json").read_text())["provenance"]
    assert stage_e["stage"] == "dose-decoder" and stage_e["init_from"] == str(
        runs / "stage-d/model")
    model = load_dose_model(runs / "stage-d" / "model", "cpu")
    assert json.loads((runs / "stage-d/model/bundle.json").read_text())["provenance"][
        "init_from"] == str(runs / "stage-c/model")
    refined = load_dose_model(bundle, "cpu")                 # Stage D's DiT, a new decoder
    assert all(a.equal(b) for a, b in zip(refined.dit.state_dict().values(),
                                          model.dit.state_dict().values()))
    stage_c = runs / "stage-c" / "model"
    provenance = json.loads((stage_c / "bundle.json").read_text())["provenance"]
    assert provenance["stage"] == "dose" and provenance["init_from"] == str(runs / "stage-b/model")
    stage_b = json.loads((runs / "stage-b/model/bundle.json").read_text())["provenance"]
    assert stage_b["init_from"] == str(runs / "stage-a/model")
    assert "data.crop" not in provenance["preset"]           # crops only in the volume stages
    assert model.codec is not None                           # Stage D's distilled codec
    assert Cache(runs / "cache-gpu").read_index()["latents_complete"]
    index = Cache(runs / "cache").read_index()
    trained = {c["name"] for c in index["cases"] if c["split"] == "train"}   # Stage C's last
    assert trained == {f"train/{train[0].stem}", f"train/{train[1].stem}",
                       f"train/physics/{train[0].stem}_plan0"}
    assert index["latents_complete"]
    vae_start = json.loads((runs / "vae" / "events.jsonl").read_text().splitlines()[0])
    assert vae_start["config"]["data"]["crop"] == [5, 16, 16]

    again = subprocess.run(["bash", str(RECIPE), str(runs)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("vae", "distill", "stage-a", "stage-b", "stage-c", "distill-d", "stage-d",
                  "stage-e", "stage-f", "stage-f-codec", "stage-g", "stage-h", "stage-j",
                  "stage-i"):
        starts = [line for line in (runs / stage / "events.jsonl").read_text().splitlines()
                  if '"type": "start"' in line]
        assert len(starts) == 1, stage


pytestmark = pytest.mark.usefixtures("torch_one_thread")
