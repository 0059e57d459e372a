"""Every stage end to end through `dosepilot train` on four real OpenKBP cases (tiny preset),
and the refusals that must come before any compute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("engine.features", reason="the stages need engine.features (model inputs)")

from engine.cli import main  # noqa: E402
from engine.dose_model import load_dose_model, save_dose_model  # noqa: E402
from engine.models.dose_refiner import DoseRefiner, RefinerConfig  # noqa: E402
from engine.models.tiny_codec import TinyCodec, TinyCodecConfig  # noqa: E402
from trainer.caches import Cache  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import scan_dataset  # noqa: E402
from trainer.distributed import DistContext  # noqa: E402
from trainer.events import read_events  # noqa: E402
from trainer.stages.common import build_vae, vae_config  # noqa: E402
from trainer.stages.dose_refiner import SAMPLES, _sample_cases, plans_by_patient  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TINY = load_config("test-tiny").source


def _preset(root, name, **model) -> str:
    """test-tiny with extra [model] / [vae_adapt] lines."""
    text = open(TINY).read()
    extra = "".join(f'{k} = "{v}"\n' for k, v in model.items() if k != "vae_adapt")
    text = text.replace("[model]\n", "[model]\n" + extra)
    if "vae_adapt" in model:
        text += f'\n[vae_adapt]\nmode = "{model["vae_adapt"]}"\nlora_rank = 2\n'
    path = root / f"{name}.toml"
    path.write_text(text)
    return str(path)


def _train(stage, config, data, out):
    return main(["train", stage, "--config", config, "--data", str(data), "--out", str(out)])


def _ended(run_dir) -> dict:
    events = read_events(run_dir)
    assert events[0]["type"] == "start" and events[-1]["type"] == "end", events[-1]
    return events[-1]


@pytest.fixture(scope="module")
def fitted(openkbp_dir, tmp_path_factory):
    """A 3 + 1 case OpenKBP folder, a fitted tiny VAE and the latent cache."""
    root = tmp_path_factory.mktemp("stages")
    for split, names in (("train", ["pt_1", "pt_10", "pt_100"]), ("validation", None)):
        (root / "data" / split).mkdir(parents=True)
        sources = ([openkbp_dir / split / f"{n}.npz" for n in names] if names else
                   sorted((openkbp_dir / split).glob("pt_*.npz"))[:1])
        for src in sources:
            (root / "data" / split / src.name).symlink_to(src)
    runs = root / "runs"
    assert _train("vae", TINY, root / "data", runs / "vae") == 0
    assert _ended(runs / "vae")["export"].endswith("vae.safetensors")
    cfg = _preset(root, "fitted", vae_weights=runs / "vae" / "vae.safetensors")
    assert _train("cache", cfg, root / "data", runs / "cache-build") == 0
    return root, cfg


def test_vae_and_cache(fitted):
    root, cfg = fitted
    vae = build_vae(load_config(cfg))
    assert vae.config.latents_std != (1.0,) * 16          # statistics measured at export
    index = Cache(root / "runs" / "cache").read_index()
    assert index["latents_complete"] and index["grid"] == [9, 32, 32]
    assert sorted(c["split"] for c in index["cases"]) == ["train"] * 3 + ["val"]
    latents = Cache(root / "runs" / "cache").read_latents(index["cases"][0]["name"])
    assert latents["identity"].shape == (7, 16, 3, 4, 4)



def test_interrupted_cache_build_continues_where_it_stopped(fitted):
    """A build stopped before it wrote the index keeps the latents it finished; a file of
    another VAE is re-encoded."""
    root, cfg = fitted
    cache = Cache(root / "runs" / "cache")
    index = cache.read_index()
    names = [c["name"] for c in index["cases"]]
    kept, lost, foreign = names[0], names[1], names[2]
    stamps = {n: cache.latent_path(n).stat().st_mtime_ns for n in names}
    cache.index_path.unlink()                                   # as if killed mid-build
    cache.latent_path(lost).unlink()
    stale = {"name": "another-vae"}
    cache.write_latents(foreign, cache.read_latents(foreign), stale)
    assert not cache.has_latents(foreign, build_vae(load_config(cfg)).config.to_dict(),
                                 ("identity",))
    assert _train("cache", cfg, root / "data", root / "runs" / "cache-resume") == 0
    assert cache.latent_path(kept).stat().st_mtime_ns == stamps[kept]     # not re-encoded
    assert cache.latent_path(lost).is_file()
    assert cache.read_index()["latents_complete"]
    vae_cfg = build_vae(load_config(cfg)).config.to_dict()
    assert all(cache.has_latents(n, vae_cfg, ("identity",)) for n in names)


def test_diffusion_stages_chain_and_export(fitted):
    root, cfg = fitted
    runs, data = root / "runs", root / "data"
    assert _train("any2any", cfg, data, runs / "a") == 0
    model_a = load_dose_model(runs / "a" / "model")            # what the runtime loads
    assert model_a.provenance["stage"] == "any2any" and model_a.codec is None
    # a bundle's vae.safetensors as vae_weights: its configuration (latent statistics included)
    # comes from the bundle.json beside it, not the preset's defaults
    bundled_vae = _preset(root, "a-vae", vae_weights=runs / "a" / "model" / "vae.safetensors")
    assert vae_config(load_config(bundled_vae)) == model_a.vae.config
    assert model_a.vae.config.latents_std != (1.0,) * 16
    stage_b = _preset(root, "b", init_from=runs / "a" / "model", vae_adapt="decoder_lora")
    assert _train("dose", stage_b, data, runs / "b") == 0
    evals = [e for e in read_events(runs / "b") if e["type"] == "eval"]
    assert {"val_loss", "val_mae_gy", "val_gdp_hmm_mae"} <= set(evals[-1])
    assert (runs / "b" / "vae.safetensors").is_file()       # the adapted decoder, merged
    assert any("decoder_l1" in e for e in read_events(runs / "b") if e["type"] == "train")
    post = _preset(root, "c", init_from=runs / "b" / "model")
    assert _train("scardnft", post, data, runs / "c") == 0
    train = [e for e in read_events(runs / "c") if e["type"] == "train"]
    assert {"reward", "kl", "policy_loss", "mae_gy"} <= set(train[-1])
    assert (runs / "c" / "lora" / "adapter_model.safetensors").is_file()
    merged = load_dose_model(runs / "c" / "model").dit.state_dict()
    base = load_dose_model(runs / "b" / "model").dit.state_dict()
    assert set(merged) == set(base)                         # plain DiT weights, LoRA folded in
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    assert _train("distill", cfg, data, runs / "d") == 0
    assert _ended(runs / "d")["export"].endswith("tiny_codec.safetensors")
    with_codec = _preset(root, "e", init_from=runs / "c" / "model",
                         codec_weights=runs / "d" / "tiny_codec.safetensors")
    assert _train("dose", with_codec, data, runs / "e") == 0   # the VAE comes from the bundle
    codec = load_dose_model(runs / "e" / "model").codec
    assert codec is not None
    continued = _preset(root, "f", init_from=runs / "e" / "model")   # ... and so does the codec
    assert _train("dose", continued, data, runs / "f") == 0
    kept = load_dose_model(runs / "f" / "model").codec
    assert kept is not None and kept.config == codec.config
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(),
                                                  codec.state_dict().values()))


def test_refusals_come_before_any_compute(fitted, capsys):
    root, cfg = fitted
    runs, data = root / "runs", root / "data"
    assert _train("any2any", cfg, root / "missing", runs / "x") == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert read_events(runs / "x")[-1]["type"] == "error"
    no_cache = root / "nocache.toml"
    no_cache.write_text(open(cfg).read().replace(
        "[data]\n", f'[data]\ncache_dir = "{root / "elsewhere"}"\n'))
    assert _train("dose", str(no_cache), data, runs / "y") == 2
    assert "no complete latent cache" in capsys.readouterr().err
    assert _train("scardnft", cfg, data, runs / "z") == 2
    assert "set [model] init_from" in capsys.readouterr().err
    unfitted = _preset(root, "unfitted", init_from=runs / "r0")
    assert _train("scardnft", unfitted, data, runs / "z") == 2
    assert "init_from not found" in capsys.readouterr().err
    # a checkpoint from another architecture is refused on --resume
    assert _train("any2any", cfg, data, runs / "r") == 0
    wider = (root / "wider.toml")
    wider.write_text(open(cfg).read().replace("dit_dim = 64", "dit_dim = 32"))
    n = len(read_events(runs / "r"))
    code = main(["train", "any2any", "--config", str(wider), "--data", str(data), "--out",
                 str(runs / "r"), "--resume"])
    assert code == 2
    assert "model architecture" in capsys.readouterr().err
    assert [e["type"] for e in read_events(runs / "r")[n:]] == ["error"]


def test_any2any_under_torchrun_matches_one_process(fitted):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root, cfg = fitted
    runs, data = root / "runs", root / "data"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    args = ["-m", "engine.cli", "train", "any2any", "--config", cfg, "--data", str(data)]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", *args, "--out", str(runs / "ddp")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert _train("any2any", cfg, data, runs / "one") == 0
    losses = [{e["step"]: e["loss"] for e in read_events(runs / name) if e["type"] == "train"}
              for name in ("ddp", "one")]
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 3, 4]
    for step in losses[1]:
        assert losses[0][step] == pytest.approx(losses[1][step], rel=1e-4)


def test_dose_and_codec_decoder_stages_refine_their_decoder_only(fitted, capsys):
    root, cfg = fitted
    runs, data = root / "runs", root / "data"
    assert _train("any2any", cfg, data, runs / "dd-base") == 0
    base = load_dose_model(runs / "dd-base" / "model")
    refine = _preset(root, "dd", init_from=runs / "dd-base" / "model")
    text = open(refine).read().replace("[data]\n", "[data]\ncrop = [9, 16, 16]\n")
    open(refine, "w").write(text)
    assert _train("dose-decoder", refine, data, runs / "dd") == 0
    evals = [e for e in read_events(runs / "dd") if e["type"] == "eval"]
    assert evals and "val_body_mae_gy" in evals[-1]
    refined = load_dose_model(runs / "dd" / "model")
    old, new = base.vae.state_dict(), refined.vae.state_dict()
    decoder = [k for k in old if k.startswith(("decoder.", "post_quant_conv."))]
    assert any(not torch.equal(old[k], new[k]) for k in decoder)
    # the encoder (every cached latent) and the DiT trained on those latents are untouched
    assert all(torch.equal(old[k], new[k]) for k in old if k not in decoder)
    assert all(torch.equal(a, b) for a, b in zip(base.dit.state_dict().values(),
                                                  refined.dit.state_dict().values()))
    # a depth crop would cut the causal decoder's context: refused before any compute
    open(refine, "w").write(text.replace("crop = [9, 16, 16]", "crop = [5, 16, 16]"))
    assert _train("dose-decoder", refine, data, runs / "dd-refused") == 2
    assert "crops in-plane only" in capsys.readouterr().err

    # codec-decoder: the same on the preview codec's decoder; the VAE, DiT and the codec's
    # encoder (the preview's plates) stay
    open(refine, "w").write(text)
    assert _train("codec-decoder", refine, data, runs / "cd-none") == 2
    assert "has no preview codec to refine" in capsys.readouterr().err
    codec = TinyCodec(TinyCodecConfig(name="test", hidden=8, mid=4, encoder_blocks=1,
                                      decoder_blocks=1))
    base = load_dose_model(save_dose_model(runs / "cd-base", base.dit, base.vae, codec,
                                           normalisation=base.normalisation))
    open(refine, "w").write(text.replace(str(runs / "dd-base" / "model"), str(runs / "cd-base")))
    assert _train("codec-decoder", refine, data, runs / "cd") == 0
    evals = [e for e in read_events(runs / "cd") if e["type"] == "eval"]
    assert evals and "val_body_mae_gy" in evals[-1]
    coded = load_dose_model(runs / "cd" / "model")
    assert coded.provenance["stage"] == "codec-decoder"
    old, new = base.codec.state_dict(), coded.codec.state_dict()
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith("decoder."))
    for part in ("vae", "dit"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(base, part).state_dict().values(),
                                                      getattr(coded, part).state_dict().values()))


def test_dose_refiner_stage_fits_on_the_bundles_own_previews(fitted, tiny_dose_bundle):
    root, _ = fitted
    data, runs = root / "data", root / "runs"
    text = open(TINY).read().replace("[model]\n", f'[model]\ninit_from = "{tiny_dose_bundle}"\n')
    text = text.replace("max_steps = 4", "max_steps = 40").replace("eval_every = 2",
                                                                   "eval_every = 20")
    text = text.replace("lr = 1e-3", "lr = 1e-2")
    preset = root / "refiner.toml"
    preset.write_text(text)
    assert _train("dose-refiner", str(preset), data, runs / "ref") == 0
    samples = sorted((runs / "ref" / "refiner-samples").glob("*.npz"))
    assert [p.stem.split("__")[-1] for p in samples] == ["pt_1", "pt_10", "pt_100", "pt_201"]
    with np.load(samples[0]) as z:
        assert z["inputs"].shape == (SAMPLES, 6) and z["error"].shape == (SAMPLES,)
    # the random bundle's preview is far from the reference dose: the fit must do better than
    # no correction on the validation case
    evals = [e for e in read_events(runs / "ref") if e["type"] == "eval"]
    assert evals[-1]["val_l1_gy"] < 0.8 * evals[-1]["val_l1_uncorrected_gy"]
    base, refined = load_dose_model(tiny_dose_bundle), load_dose_model(runs / "ref" / "model")
    assert refined.refiner is not None and refined.provenance["stage"] == "dose-refiner"
    for part in ("dit", "vae", "codec"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(base, part).state_dict().values(),
                                                      getattr(refined, part).state_dict().values()))
    # sampling resumes: a case already sampled is not redone, a missing one is
    kept = samples[1].stat().st_mtime_ns
    samples[0].unlink()
    refs = list(scan_dataset(data, 0.34).cases)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    _sample_cases(refs, tiny_dose_bundle, samples[0].parent, RefinerConfig(), ctx, 1)
    assert samples[0].exists() and samples[1].stat().st_mtime_ns == kept
    # a wider network reads the same inputs: nothing is redone
    _sample_cases(refs, tiny_dose_bundle, samples[0].parent, RefinerConfig(hidden=64), ctx, 1)
    assert samples[1].stat().st_mtime_ns == kept
    # samples made before a setting existed were made with its default: not redone either
    with np.load(samples[1]) as z:
        old = {k: z[k] for k in z.files}
    config = json.loads(str(old["config"]))
    del config["dit_class_solution"]
    np.savez(samples[1], **{**old, "config": json.dumps(config)})
    kept = samples[1].stat().st_mtime_ns
    _sample_cases(refs, tiny_dose_bundle, samples[0].parent, RefinerConfig(), ctx, 1)
    assert samples[1].stat().st_mtime_ns == kept
    # samples of another refiner config are redone: with the beam plate, a 7th column
    _sample_cases(refs, tiny_dose_bundle, samples[0].parent, RefinerConfig(beam_plate=True), ctx, 1)
    assert samples[1].stat().st_mtime_ns != kept
    with np.load(samples[1]) as z:
        assert z["inputs"].shape == (SAMPLES, 7)
        assert np.all(z["inputs"][:, -1] >= 0) and np.ptp(z["inputs"][:, -1]) > 0
        beam_rows = z["inputs"]
    # with the quick plan, an 8th column (Gy / 70) and the same voxels as before
    _sample_cases(refs, tiny_dose_bundle, samples[0].parent,
                  RefinerConfig(beam_plate=True, quick_plan=True), ctx, 1)
    with np.load(samples[1]) as z:
        assert z["inputs"].shape == (SAMPLES, 8)
        np.testing.assert_array_equal(z["inputs"][:, :7], beam_rows)
        quick_gy = z["inputs"][:, -1] * 70.0
        assert quick_gy.min() >= 0 and 40.0 < quick_gy.max() < 120.0
    # a bundle is required
    assert _train("dose-refiner", TINY, data, runs / "ref-none") == 2


def test_scardnft_scores_with_the_bundles_refiner_and_ships_it(fitted):
    root, cfg = fitted
    runs, data = root / "runs", root / "data"
    assert _train("any2any", cfg, data, runs / "nft-base") == 0
    base = load_dose_model(runs / "nft-base" / "model")
    refiner = DoseRefiner(RefinerConfig(beam_plate=True))
    with torch.no_grad():
        refiner.net[-1].bias.fill_(2.0)          # +140 Gy on every voxel near the targets
    with_refiner = save_dose_model(root / "nft-refined", base.dit, base.vae, base.codec,
                                   normalisation=base.normalisation, refiner=refiner)
    # a codec: the engine decodes a prediction with it only when the bundle has a refiner
    codec = TinyCodec(TinyCodecConfig(name="test", z_dim=base.vae.config.z_dim, hidden=8, mid=4,
                                      encoder_blocks=1, decoder_blocks=1))
    no_correction = DoseRefiner(RefinerConfig())
    with torch.no_grad():
        no_correction.net[-1].weight.zero_()
        no_correction.net[-1].bias.zero_()
    bundles = {"plain": runs / "nft-base" / "model", "refined": with_refiner,
               "codec": save_dose_model(root / "nft-codec", base.dit, base.vae, codec,
                                        normalisation=base.normalisation),
               "codec-refiner": save_dose_model(root / "nft-codec-refiner", base.dit, base.vae,
                                                codec, normalisation=base.normalisation,
                                                refiner=no_correction)}
    maes = {}
    for name, bundle in bundles.items():
        assert _train("scardnft", _preset(root, f"nft-{name}", init_from=bundle), data,
                      runs / f"nft-{name}") == 0
        maes[name] = next(e["mae_gy"] for e in read_events(runs / f"nft-{name}")
                          if e["type"] == "train")
    # the same rollouts (seed, weights), scored after the refiner's +140 Gy: a far larger MAE
    assert maes["refined"] > maes["plain"] + 10.0
    # decoded by the VAE without a refiner, by the (untrained) codec with one
    assert maes["codec"] == pytest.approx(maes["plain"], abs=1e-4)
    assert abs(maes["codec-refiner"] - maes["plain"]) > 0.5
    shipped = load_dose_model(runs / "nft-refined" / "model")
    assert shipped.provenance["stage"] == "scardnft" and shipped.refiner is not None
    assert shipped.refiner.config == refiner.config
    assert all(torch.equal(x, y) for x, y in zip(shipped.refiner.state_dict().values(),
                                                  refiner.state_dict().values()))
    assert load_dose_model(runs / "nft-plain" / "model").refiner is None


def test_the_refiner_reads_a_cached_case_as_the_engine_reads_the_case(openkbp_dir):
    from engine.features import Normalization, build_modalities
    from engine.io.openkbp import load_openkbp
    from engine.models.dose_refiner import beam_fraction
    from engine.runtime import model_plates, refiner_geometry
    from trainer.stages.scardnft import refiner_case

    case = load_openkbp(openkbp_dir / "train" / "pt_1.npz")
    inputs = build_modalities(case)
    config = RefinerConfig(beam_plate=True)
    refiner = DoseRefiner(config)
    geometry, beam = refiner_case(refiner, np.asarray(inputs.volumes),
                                  inputs.transform.model.spacing, Normalization())
    engine_geometry = refiner_geometry(inputs, config)
    np.testing.assert_array_equal(geometry.index, engine_geometry.index)
    np.testing.assert_allclose(geometry.features, engine_geometry.features, atol=1e-5)
    plate, _, n_angles = model_plates(inputs, case.plan, workers=1)
    engine_beam = beam_fraction(plate, n_angles, engine_geometry)
    assert engine_beam.max() > 0.5                  # the beams cross the band
    np.testing.assert_allclose(beam, np.minimum(engine_beam, 2.0), atol=1e-5)


def test_the_refiners_samples_read_the_preview_of_the_plan_the_dit_is_shown(
        openkbp_dir, tiny_dose_bundle):
    """The samples' dose input is the bundle's preview of what the engine shows its DiT: the
    plan itself, or with ``dit_class_solution`` the nine-field class solution."""
    import dataclasses

    from engine.io.openkbp import load_openkbp
    from engine.models.dose_refiner import dit_plan
    from engine.runtime import DoseEngine
    from trainer.stages.dose_refiner import case_samples

    case = load_openkbp(openkbp_dir / "train" / "pt_1.npz")
    case = dataclasses.replace(case, plan=case.plan.with_beams(case.plan.beams[:3]))
    model = load_dose_model(tiny_dose_bundle)
    model.refiner = None
    engine = DoseEngine(model, threads=1)
    doses = {}
    for flag in (False, True):
        config = RefinerConfig(dit_class_solution=flag)
        rows, error, index = case_samples(engine, case, config, np.random.default_rng(0))
        preview = engine.preview(case, dit_plan(case.plan, config)).dose.array
        expected = engine.model_inputs(case).transform.dose_to_model(preview).ravel()[index]
        doses[flag] = rows[:, 0] * config.reference_gy
        np.testing.assert_allclose(doses[flag], expected, rtol=1e-6)
    assert not np.allclose(doses[True], doses[False], rtol=1e-6)  # (the tiny DiT: ~1e-4 Gy)


def test_the_refiners_samples_read_the_quick_plan_of_its_recorded_settings(
        openkbp_dir, tiny_dose_bundle, monkeypatch):
    import engine.runtime as runtime
    from engine.io.openkbp import load_openkbp
    from engine.physics.quick_plan import QuickPlanSettings
    from trainer.stages.dose_refiner import case_samples

    used = []
    real = runtime.optimise_quick_plan

    def spy(case, plan=None, settings=None):
        settings = settings or QuickPlanSettings()
        used.append(settings)
        return real(case, plan, settings)

    monkeypatch.setattr(runtime, "optimise_quick_plan", spy)
    model = load_dose_model(tiny_dose_bundle)
    model.refiner = None
    engine = runtime.DoseEngine(model, threads=1)
    case = load_openkbp(openkbp_dir / "train" / "pt_1.npz")
    config = RefinerConfig(quick_plan=True, quick_plan_samples=900, quick_plan_max_iter=5)
    rows, _, _ = case_samples(engine, case, config, np.random.default_rng(0))
    assert used == [QuickPlanSettings(samples=900, target_samples=300, max_iter=5)]
    assert rows.shape[1] == len(config.features) and rows[:, -1].max() * 70.0 > 30.0


def test_the_refiner_stage_weighs_patients_not_plans(openkbp_dir, tmp_path):
    """A patient's physics plans join its clinical plan: the fit draws the patient, then a plan."""
    first, second = sorted((openkbp_dir / "train").glob("pt_*.npz"))[:2]
    (tmp_path / "train" / "physics").mkdir(parents=True)
    for path in (first, second):
        (tmp_path / "train" / path.name).symlink_to(path)
    for k in (0, 3):
        (tmp_path / "train" / "physics" / f"{first.stem}_plan{k}.npz").symlink_to(first)
    plans = plans_by_patient(scan_dataset(tmp_path, 0.0).train)
    assert plans == {first.stem: [f"train/physics/{first.stem}_plan0",
                                  f"train/physics/{first.stem}_plan3", f"train/{first.stem}"],
                     second.stem: [f"train/{second.stem}"]}


def test_scardnft_refuses_a_quick_plan_refiner_with_a_clear_error():
    from engine.errors import UserError
    from engine.features import Normalization
    from trainer.stages.scardnft import refiner_case

    volumes = np.zeros((7, 4, 8, 8), np.float32)
    with pytest.raises(UserError, match="quick plan"):
        refiner_case(DoseRefiner(RefinerConfig(quick_plan=True)), volumes, (2.0, 2.5, 2.5),
                     Normalization())


def test_the_refiner_stage_fits_the_change_between_a_patients_physics_plans(
        openkbp_dir, tiny_dose_bundle, tmp_path):
    """[beam_pairs]: two physics plans of one patient are sampled at the same voxels and the
    loss adds the L1 of their change; the clinical plan never pairs. With a quick-plan refiner,
    the bundle records the quick plan's dose model; the clinical-style input is added by the
    fit."""
    from trainer.caches import case_key
    from trainer.stages.dose_refiner import common_rows, physics_plans

    src = sorted((openkbp_dir / "train").glob("pt_*.npz"))[0]
    data = tmp_path / "data"
    (data / "train" / "physics").mkdir(parents=True)
    (data / "validation").mkdir()
    (data / "train" / src.name).symlink_to(src)
    (data / "validation" / "pt_900.npz").symlink_to(src)
    with np.load(src) as z:
        arrays = dict(z)
    for k, scale in ((0, 1.0), (1, 0.6)):   # same inputs, the second plan's dose 40 % lower
        np.savez(data / "train" / "physics" / f"{src.stem}_plan{k}.npz",
                 **{**arrays, "dose_cgy": (arrays["dose_cgy"] * scale).astype(np.uint16)})
    names = [f"train/physics/{src.stem}_plan0", f"train/physics/{src.stem}_plan1",
             f"train/{src.stem}"]
    assert physics_plans(names, src.stem) == names[:2]

    text = open(TINY).read().replace("[model]\n", f'[model]\ninit_from = "{tiny_dose_bundle}"\n')
    runs = tmp_path / "runs"
    for weight, code in (("0.0", 2), ("1.0", 0)):
        preset = tmp_path / f"pairs-{weight}.toml"
        preset.write_text(text + f"\n[beam_pairs]\nenabled = true\nweight = {weight}\n"
                          "\n[refiner]\nquick_plan = true\nclinical_style = true\n")
        assert _train("dose-refiner", str(preset), data, runs / weight) == code
    samples = runs / "1.0" / "refiner-samples"
    index = [np.load(samples / f"{case_key(n)}.npz")["index"] for n in names]
    # one patient, one draw of voxels for all its plans
    np.testing.assert_array_equal(index[0], index[1])
    np.testing.assert_array_equal(index[0], index[2])
    rows_a, rows_b = common_rows(index[0], index[1])
    assert len(rows_a) == len(np.unique(index[0])) > 0.9 * SAMPLES
    errors = [np.load(samples / f"{case_key(n)}.npz")["error"] for n in names[:2]]
    # equal inputs give equal corrections: the pair loss is then the reference change alone,
    # 40 % of plan 0's dose at the common voxels (the change of plan 0's reference dose)
    change = np.abs(errors[1][rows_b] - errors[0][rows_a]).mean()
    assert change > 1.0
    pair = [e["pair_l1_gy"] for e in read_events(runs / "1.0") if e["type"] == "train"]
    assert pair and all(abs(p - change) < 0.15 * change for p in pair)

    # the bundle records the quick plan's dose model its refiner was fitted on
    from engine.physics.quick_plan import DOSE_MODEL
    refiner = load_dose_model(runs / "1.0" / "model").refiner
    assert refiner.config.quick_plan_model == DOSE_MODEL
    # the style input is the fit's own column: the samples hold 7 inputs, the refiner reads 8
    assert refiner.config.features[-1] == "clinical_plan" and refiner.net[0].in_features == 8
    with np.load(samples / f"{case_key(names[0])}.npz") as z:
        assert z["inputs"].shape[1] == 7

    # a dataset whose patients have fewer than two physics plans cannot pair
    (data / "train" / "physics" / f"{src.stem}_plan1.npz").unlink()
    assert _train("dose-refiner", str(tmp_path / "pairs-1.0.toml"), data, runs / "none") == 2


def test_beam_pairs_are_fitted_in_the_style_the_engine_predicts():
    from engine.models.dose_refiner import RefinerConfig
    from trainer.stages.dose_refiner import pair_inputs
    rows = torch.rand(5, 9)
    rows[:, -1] = 0.0  # physics plans
    styled = pair_inputs(rows, RefinerConfig(beam_plate=True, quick_plan=True,
                                             clinical_style=True))
    assert torch.all(styled[:, -1] == 1.0) and torch.equal(styled[:, :-1], rows[:, :-1])
    assert torch.all(rows[:, -1] == 0.0)  # the cached samples stay as they were
    plain = RefinerConfig(beam_plate=True, quick_plan=True)
    assert torch.equal(pair_inputs(rows[:, :-1], plain), rows[:, :-1])
