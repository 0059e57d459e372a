"""DoseEngine on a phantom patient with a small real (randomly initialised) DiffKT3D bundle."""

import asyncio
import threading

import numpy as np
import pytest
import torch
from scipy import ndimage

from engine.dose_model import load_dose_model
from engine.features import Slot
from engine.latest_wins import Cancelled, Status
from engine.models.checkpoint import CheckpointError
from engine.phantom import PhantomSpec, make_phantom
from engine.runtime import AsyncDoseEngine, DoseEngine


@pytest.fixture(scope="module")
def bundle(tiny_dose_bundle):
    return tiny_dose_bundle


@pytest.fixture(scope="module")
def engine(bundle):
    return DoseEngine.from_checkpoint(bundle, threads=2)


@pytest.fixture(scope="module")
def case():
    return make_phantom(PhantomSpec(shape=(24, 48, 56), spacing=(4.0, 4.0, 4.0)))


class _Counting:
    """Counts calls of a module's ``encode`` (or another method; the real method still runs)."""

    def __init__(self, module, method: str = "encode"):
        self.calls = 0
        self._method = getattr(module, method)
        setattr(module, method, self)

    def __call__(self, x):
        self.calls += 1
        return self._method(x)


def test_preview_gives_dose_dvhs_and_timings_on_the_ct_grid(engine, case):
    result = engine.preview(case)
    assert result.kind == "preview" and result.steps == 1
    assert result.dose.geometry == case.geometry
    assert np.isfinite(result.dose.array).all() and result.dose.array.min() >= 0
    assert set(result.dvhs) == {s.name for s in case.structures}
    assert set(result.metrics) == set(result.dvhs)
    assert {"encode", "dit", "decode", "dvh", "total"} <= set(result.timings_s)


def test_conditions_are_encoded_once_and_plates_only_when_beams_change(bundle, case):
    engine = DoseEngine.from_checkpoint(bundle, threads=2)
    vae_encode = _Counting(engine.model.vae)
    codec_encode = _Counting(engine.model.codec)
    first = engine.preview(case)
    assert (vae_encode.calls, codec_encode.calls) == (1, 1)  # 4 conditions batched; 2 plates
    moved = case.plan.with_gantry(0, case.plan.beams[0].gantry_deg + 40)
    second = engine.preview(case, moved)
    assert (vae_encode.calls, codec_encode.calls) == (1, 2)
    engine.preview(case, moved)
    assert (vae_encode.calls, codec_encode.calls) == (1, 2)
    assert not np.array_equal(first.dose.array, second.dose.array)
    engine.predict(case, moved, steps=2)
    assert (vae_encode.calls, codec_encode.calls) == (2, 2)  # plates through the full VAE


def test_a_bundle_with_a_refiner_decodes_predictions_with_the_codec_unless_full_vae(bundle, case):
    from engine.models.dose_refiner import DoseRefiner, RefinerConfig

    moved = case.plan.with_gantry(0, case.plan.beams[0].gantry_deg + 40)
    counts = {}
    for full_vae in (False, True):
        model = load_dose_model(bundle)
        model.refiner = DoseRefiner(RefinerConfig(hidden=2)).eval()
        engine = DoseEngine(model, threads=2, full_vae=full_vae)
        assert engine.codec_decode is not full_vae
        calls = {(name, method): _Counting(getattr(engine.model, name), method)
                 for name in ("vae", "codec") for method in ("encode", "decode")}
        engine.preview(case, moved)
        engine.predict(case, moved, steps=2)
        counts[full_vae] = {key: c.calls for key, c in calls.items()}
    # the prediction's plates go through the VAE either way; its dose through the codec unless
    # full_vae
    assert counts[False] == {("vae", "encode"): 2, ("vae", "decode"): 0,
                             ("codec", "encode"): 1, ("codec", "decode"): 2}
    assert counts[True] == {("vae", "encode"): 2, ("vae", "decode"): 1,
                            ("codec", "encode"): 1, ("codec", "decode"): 1}
    assert not DoseEngine.from_checkpoint(bundle, threads=2).codec_decode  # no refiner


def test_plates_use_no_more_threads_than_inference(bundle, case, monkeypatch):
    """The GUI gives the engine all cores but one; the plates of a moved beam must not take the
    last core from the event loop (benchmarks/bench_rapid_drags.py)."""
    import engine.features.plates as plates

    threads: set[str] = set()
    closed_marks = plates._closed_marks

    def recording(*args):
        threads.add(threading.current_thread().name)
        return closed_marks(*args)

    monkeypatch.setattr(plates, "_closed_marks", recording)
    one = DoseEngine.from_checkpoint(bundle, threads=1)
    one.preview(case, case.plan.with_gantry(0, case.plan.beams[0].gantry_deg + 40))
    assert threads == {threading.current_thread().name}


def test_seeds_give_zero_std_when_identical_and_positive_otherwise(engine, case):
    same = engine.predict(case, steps=2, seeds=(3, 3))
    different = engine.predict(case, steps=2, seeds=(3, 4))
    assert same.std is not None and float(np.abs(same.std.array).max()) < 1e-4
    assert float(different.std.array.max()) > 0


def test_noise_the_dose_head_cannot_reach_does_not_reach_the_dose(bundle, case):
    # a dose head of zeros moves nothing but its bias: every seed must give the same dose
    engine = DoseEngine.from_checkpoint(bundle, threads=2)
    with torch.no_grad():
        engine.model.dit.proj_outs[Slot.DOSE].weight.zero_()
    result = engine.predict(case, steps=2, seeds=(3, 4))
    assert float(np.abs(result.std.array).max()) < 1e-3
    assert float(result.dose.array.max()) > 0


def test_the_bundles_refiner_corrects_the_dose_around_the_targets(bundle, case):
    from engine.models.dose_refiner import DoseRefiner, RefinerConfig

    plain = DoseEngine.from_checkpoint(bundle, threads=2)
    refined = DoseEngine(load_dose_model(bundle), threads=2)
    refiner = DoseRefiner(RefinerConfig(hidden=4, band_mm=8.0))
    with torch.no_grad():  # adds 5 Gy wherever it corrects
        for p in refiner.parameters():
            p.zero_()
        refiner.net[-1].bias.fill_(5.0 / refiner.config.reference_gy)
    refined.model.refiner = refiner.eval()
    before, after = plain.preview(case), refined.preview(case)
    assert "refine" in after.timings_s and "refine" not in before.timings_s
    change = after.dose.array - before.dose.array
    target = np.logical_or.reduce([t.mask for t in case.targets])
    assert float(np.median(change[target])) == pytest.approx(5.0, abs=0.05)
    body = case.external.mask
    distance = ndimage.distance_transform_edt(~target, sampling=case.geometry.spacing)
    far = body & (distance > 30.0)
    assert far.any() and float(np.abs(change[far]).max()) < 1e-4  # beyond the band: as it was
    full = refined.predict(case, steps=2, seeds=(0,))
    assert "refine" in full.timings_s


def test_a_beam_plate_refiner_corrects_along_the_plans_beams(bundle, case):
    from engine.models.dose_refiner import DoseRefiner, RefinerConfig

    plain = DoseEngine.from_checkpoint(bundle, threads=2)
    refined = DoseEngine(load_dose_model(bundle), threads=2)
    refiner = DoseRefiner(RefinerConfig(hidden=2, band_mm=40.0, beam_plate=True))
    with torch.no_grad():  # correction = 70 Gy * silu(silu(beam fraction)): 0 where no beam
        for p in refiner.parameters():
            p.zero_()
        refiner.net[0].weight[0, -1] = 1.0
        refiner.net[2].weight[0, 0] = 1.0
        refiner.net[4].weight[0, 0] = 1.0
    refined.model.refiner = refiner.eval()
    left = case.plan.with_beams(case.plan.beams[:1])
    right = left.with_gantry(0, (left.beams[0].gantry_deg + 180.0) % 360.0)
    change = {}
    for name, plan in (("left", left), ("right", right), ("left again", left)):
        change[name] = refined.preview(case, plan).dose.array - plain.preview(case, plan).dose.array
    target = np.logical_or.reduce([t.mask for t in case.targets])
    # inside the target every beam passes (fraction ~1): 70 * silu(silu(1)) = 34.6 Gy
    assert float(np.median(change["left"][target])) == pytest.approx(34.6, abs=3.0)
    # outside it, each beam's path is corrected and the opposite side is not
    only_left = (change["left"] > 5.0) & (np.abs(change["right"]) < 0.5) & ~target
    only_right = (change["right"] > 5.0) & (np.abs(change["left"]) < 0.5) & ~target
    assert only_left.sum() > 50 and only_right.sum() > 50
    np.testing.assert_array_equal(change["left again"], change["left"])  # the plan's own cache


def test_a_class_solution_refiner_shows_the_dit_nine_fields_and_corrects_along_the_plans_beams(
        bundle, case):
    """With ``dit_class_solution`` the DiT sees the nine-field class solution whatever the
    plan's beams, and those reach the dose through the refiner's inputs only."""
    from engine.models.dose_refiner import (
        CLASS_SOLUTION_DEG,
        DoseRefiner,
        RefinerConfig,
        dit_plan,
    )

    plain = DoseEngine.from_checkpoint(bundle, threads=2)
    refined = DoseEngine(load_dose_model(bundle), threads=2)
    config = RefinerConfig(hidden=2, band_mm=40.0, beam_plate=True, dit_class_solution=True)
    refiner = DoseRefiner(config)
    with torch.no_grad():  # no correction at all
        for p in refiner.parameters():
            p.zero_()
    refined.model.refiner = refiner.eval()
    left = case.plan.with_beams(case.plan.beams[:1])
    right = left.with_gantry(0, (left.beams[0].gantry_deg + 180.0) % 360.0)
    shown = dit_plan(left, config)
    assert [b.gantry_deg for b in shown.beams] == list(CLASS_SOLUTION_DEG)
    assert {b.isocenter_mm for b in shown.beams} == {left.isocenter_mm}
    assert dit_plan(left, RefinerConfig(beam_plate=True)) is left
    nine_fields = plain.preview(case, shown).dose.array
    assert not np.array_equal(plain.preview(case, left).dose.array, nine_fields)
    for plan in (left, right):
        np.testing.assert_allclose(refined.preview(case, plan).dose.array, nine_fields,
                                   atol=1e-5)
    with torch.no_grad():  # correction = 70 Gy * silu(silu(beam fraction)): 0 where no beam
        refiner.net[0].weight[0, -1] = 1.0
        refiner.net[2].weight[0, 0] = 1.0
        refiner.net[4].weight[0, 0] = 1.0
    change = {name: refined.preview(case, plan).dose.array - nine_fields
              for name, plan in (("left", left), ("right", right))}
    target = np.logical_or.reduce([t.mask for t in case.targets])
    only_left = (change["left"] > 5.0) & (np.abs(change["right"]) < 0.5) & ~target
    only_right = (change["right"] > 5.0) & (np.abs(change["left"]) < 0.5) & ~target
    assert only_left.sum() > 50 and only_right.sum() > 50


def test_a_class_solution_refiners_dit_runs_once_per_case_and_sampling(bundle, case):
    """The DiT's dose does not depend on the plan then: a moved beam's preview or prediction
    reuses it (no DiT time, one progress report) and equals a fresh engine's."""
    from engine.models.dose_refiner import DoseRefiner, RefinerConfig

    config = RefinerConfig(hidden=4, band_mm=40.0, beam_plate=True, dit_class_solution=True)
    refiner = DoseRefiner(config).eval()
    engines = []
    for _ in range(2):
        engines.append(DoseEngine(load_dose_model(bundle), threads=2))
        engines[-1].model.refiner = refiner
    warm, fresh = engines
    moved = case.plan.with_gantry(0, case.plan.beams[0].gantry_deg + 40)
    assert "dit" in warm.preview(case).timings_s
    assert "dit" in warm.predict(case, steps=2).timings_s
    reports = []
    got = {"preview": warm.preview(case, moved),
           "predict": warm.predict(case, moved, steps=2, progress=lambda i, n: reports.append(i))}
    assert all("dit" not in r.timings_s for r in got.values()) and reports == [2]
    np.testing.assert_array_equal(got["preview"].dose.array, fresh.preview(case, moved).dose.array)
    np.testing.assert_array_equal(got["predict"].dose.array,
                                  fresh.predict(case, moved, steps=2).dose.array)
    assert "dit" in warm.predict(case, moved, steps=3).timings_s  # another sampling


def test_the_engine_refuses_a_refiner_fitted_on_another_quick_plan(bundle, tmp_path):
    """A refiner's weights fit the quick-plan dose it was fitted on: a bundle whose refiner read
    another dose model, or does not say which, is refused with a message naming both."""
    from engine.dose_model import save_dose_model
    from engine.models.checkpoint import CheckpointError
    from engine.models.dose_refiner import DoseRefiner, RefinerConfig
    from engine.physics.quick_plan import DOSE_MODEL

    base = load_dose_model(bundle)
    for recorded, refused in (("", "does not record"), ("parallel-erf-beam", "'parallel-erf-beam'"),
                              (DOSE_MODEL, None)):
        refiner = DoseRefiner(RefinerConfig(quick_plan=True, quick_plan_model=recorded))
        path = save_dose_model(tmp_path / (recorded or "unrecorded"), base.dit, base.vae,
                               base.codec, normalisation=base.normalisation, refiner=refiner)
        if refused is None:
            engine = DoseEngine.from_checkpoint(path, threads=1)
            assert engine.model.refiner.config.quick_plan_model == DOSE_MODEL
            continue
        with pytest.raises(CheckpointError, match=refused) as error:
            DoseEngine.from_checkpoint(path, threads=1)
        assert DOSE_MODEL in str(error.value) and "dose-refiner" in str(error.value)
    # a refiner that reads no quick plan records none and needs none
    plain = DoseRefiner(RefinerConfig(beam_plate=True))
    path = save_dose_model(tmp_path / "plate", base.dit, base.vae, base.codec,
                           normalisation=base.normalisation, refiner=plain)
    assert DoseEngine.from_checkpoint(path, threads=1).model.refiner.config.quick_plan_model == ""


def test_a_quick_plan_refiner_reads_the_plans_quick_plan_once_per_plan(bundle, case,
                                                                       monkeypatch):
    import engine.runtime as runtime
    from engine.models.dose_refiner import DoseRefiner, RefinerConfig

    calls = []
    real = runtime.QuickPlanner.optimise

    def counted(self, *args, **kwargs):
        calls.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(runtime.QuickPlanner, "optimise", counted)
    plain = DoseEngine.from_checkpoint(bundle, threads=2)
    refined = DoseEngine(load_dose_model(bundle), threads=2)
    refiner = DoseRefiner(RefinerConfig(hidden=1, band_mm=20.0, quick_plan=True,
                                        quick_plan_model=runtime.DOSE_MODEL))
    with torch.no_grad():  # correction = 70 Gy * (quick plan dose / 70 Gy) = the quick plan
        refiner.net[0] = torch.nn.Identity()
        refiner.net[1] = torch.nn.Identity()
        refiner.net[2] = torch.nn.Linear(len(refiner.config.features), 1, bias=False)
        refiner.net[2].weight.zero_()  # no share of the other features (no random init)
        refiner.net[2].weight[0, -1] = 1.0
        refiner.net[3] = torch.nn.Identity()
        refiner.net[4] = torch.nn.Identity()
    refined.model.refiner = refiner.eval()
    one = case.plan.with_beams(case.plan.beams[:1])
    results, timings = {}, []
    plans = {"first": one, "turned": one.with_gantry(0, one.beams[0].gantry_deg + 90.0)}
    for name, plan in plans.items():
        preview = refined.preview(case, plan)
        timings.append(preview.timings_s)
        results[name] = preview.dose.array - plain.preview(case, plan).dose.array
        refined.predict(case, plan, steps=1)
    assert len(calls) == 2  # one quick plan per plan, shared by its preview and prediction
    assert all(t["quick_plan"] > 0 for t in timings)
    # the correction is the plan's own quick plan (on the refiner's voxels, near the targets;
    # compared one CT voxel inside the 20 mm band, where the interpolation back to the CT grid
    # mixes in no uncorrected voxel)
    from engine.physics.quick_plan import quick_plan_dose

    target = np.logical_or.reduce([t.mask for t in case.targets])
    inside = ndimage.distance_transform_edt(~target, sampling=case.ct.geometry.spacing) <= 16.0
    for name, plan in plans.items():
        quick = quick_plan_dose(case, plan)
        corrected = inside & (np.abs(results[name]) > 1.0)
        assert corrected.sum() > 2000
        assert np.corrcoef(results[name][corrected], quick[corrected])[0, 1] > 0.99
    # so the correction follows the beam: a beam turned by 90 degrees corrects other voxels
    outside = ~target & (np.abs(results["first"]) + np.abs(results["turned"]) > 1.0)
    assert outside.sum() > 50
    assert np.corrcoef(results["first"][outside], results["turned"][outside])[0, 1] < 0.5


def test_progress_and_cancel_between_steps(engine, case):
    seen = []
    engine.predict(case, steps=3, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    cancel = threading.Event()

    def progress(i, n):
        if i == 1:
            cancel.set()

    seen.clear()
    with pytest.raises(Cancelled):
        engine.predict(case, steps=10, progress=lambda i, n: (seen.append(i), progress(i, n)),
                       cancel=cancel)
    assert seen == [1]


def test_async_latest_wins_and_errors_do_not_stop_the_engine(engine, case):
    service = AsyncDoseEngine(engine)
    plans = [case.plan.with_gantry(0, float(a)) for a in range(0, 100, 10)]

    async def drag_then_release():
        previews = []
        for plan in plans:
            previews.append(asyncio.ensure_future(service.submit_preview(case, plan)))
            await asyncio.sleep(0.001)
        broken = await service.submit_preview(case, plans[0].with_beams(()))
        final = await service.submit_predict(case, plans[-1], steps=2)
        return await asyncio.gather(*previews), broken, final

    previews, broken, final = asyncio.run(drag_then_release())
    assert all(o.status is Status.SUPERSEDED for o in previews[:-1])
    assert broken.status is Status.ERROR and "no plan with beams" in broken.error
    assert final.ok and final.value.kind == "predict"
    assert service.runner.started <= 4
    service.shutdown()


def test_a_bundle_that_is_not_a_dose_model_is_refused(bundle, tmp_path):
    from engine.models.checkpoint import Component, save_bundle

    model = load_dose_model(bundle)
    path = save_bundle(tmp_path / "dit-only",
                       {"dit": Component("DiffKT3D", model.dit.config.to_dict(),
                                         model.dit.state_dict())},
                       normalisation={})
    with pytest.raises(CheckpointError, match="not a dose model"):
        load_dose_model(path)


def test_precision_is_float32_by_default_and_bf16_is_refused_on_a_cpu(bundle):
    with pytest.raises(ValueError, match="precision must be one of"):
        DoseEngine.from_checkpoint(bundle, device="cpu", threads=1, precision="fp16")
    with pytest.raises(ValueError, match="bf16 inference is for CUDA"):
        DoseEngine.from_checkpoint(bundle, device="cpu", threads=1, precision="bf16")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="no CUDA device on this machine: the GPU path is checked where one is")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_engine_agrees_with_the_cpu_engine(bundle, case, engine, precision):
    """On CUDA the engine runs in float32 by default; both precisions give the CPU's dose."""
    gpu = DoseEngine.from_checkpoint(bundle, device="cuda", precision=precision)
    assert gpu.device.type == "cuda"
    assert DoseEngine.from_checkpoint(bundle, device="cuda").precision == "fp32"
    for run in ("preview", "predict"):
        want = getattr(engine, run)(case).dose.array
        got = getattr(gpu, run)(case).dose.array
        tolerance = 0.01 if precision == "fp32" else 0.05  # cuDNN convolutions use TF32
        assert np.abs(got - want).max() <= tolerance * max(float(want.max()), 1.0)


def test_every_other_voxel_is_read_and_interpolated_linearly_between():
    from engine.runtime import _double, _halve

    rng = np.random.default_rng(0)
    for shape in [(7, 8, 9), (12, 5, 6)]:
        voxels = rng.random(shape) < 0.1
        needed = _halve(voxels)
        z, y, x = np.meshgrid(*[2.0 * np.arange(n) for n in needed.shape], indexing="ij")
        # a linear function on the coarse points it reads, NaN on the others
        coarse = np.where(needed, 1.5 * z + 0.3 * y - 0.7 * x, np.nan).astype(np.float32)
        full = _double(coarse, shape)
        z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        np.testing.assert_allclose(full[voxels], (1.5 * z + 0.3 * y - 0.7 * x)[voxels],
                                   atol=1e-5)
        # and it marks only those: per voxel, 2j on an even axis, 2j and 2j + 2 on an odd one
        expected = np.zeros_like(needed)
        for voxel in np.argwhere(voxels):
            ranges = [(v // 2,) if v % 2 == 0 else (v // 2, v // 2 + 1) for v in voxel]
            expected[np.ix_(*ranges)] = True
        np.testing.assert_array_equal(needed, expected)


def test_the_engine_computes_the_quick_plan_with_the_settings_its_refiner_records(
        bundle, case, monkeypatch):
    import engine.runtime as runtime
    from engine.models.dose_refiner import DoseRefiner, RefinerConfig
    from engine.physics.quick_plan import QuickPlanSettings

    made = []
    real = runtime.QuickPlanner.__init__

    def spy(self, case, settings=None, *args, **kwargs):
        settings = settings or QuickPlanSettings()
        made.append(settings)
        real(self, case, settings, *args, **kwargs)

    monkeypatch.setattr(runtime.QuickPlanner, "__init__", spy)
    for config, expected in (
            (RefinerConfig(band_mm=20.0, quick_plan=True, quick_plan_model=runtime.DOSE_MODEL),
             QuickPlanSettings()),
            (RefinerConfig(band_mm=20.0, quick_plan=True, quick_plan_model=runtime.DOSE_MODEL,
                           quick_plan_samples=900, quick_plan_max_iter=5),
             QuickPlanSettings(samples=900, target_samples=300, max_iter=5))):
        engine = DoseEngine(load_dose_model(bundle), threads=1)
        engine.model.refiner = DoseRefiner(config).eval()
        engine.preview(case)
        assert made.pop() == expected
    # a bundle written before the settings were recorded reads them as the defaults
    old = RefinerConfig(quick_plan=True).to_dict()
    del old["quick_plan_samples"], old["quick_plan_max_iter"]
    assert runtime.quick_plan_settings(RefinerConfig.from_dict(old)) == QuickPlanSettings()


def test_the_refiners_quick_plan_is_one_function_of_a_voxel_for_the_engine_and_the_trainer(
        engine, case):
    from engine.models.dose_refiner import RefinerConfig, TargetGeometry
    from engine.physics.quick_plan import optimise_quick_plan
    from engine.runtime import refiner_geometry, refiner_quick_plan

    inputs = engine.model_inputs(case)
    geometry = refiner_geometry(inputs, RefinerConfig(band_mm=20.0, quick_plan=True))
    every = refiner_quick_plan(case, case.plan, inputs, geometry)
    # the trainer asks for a sample of the voxels: they get the values the engine shows
    rows = np.arange(0, len(geometry.index), 7)
    sample = TargetGeometry(geometry.shape, geometry.index[rows], geometry.features[rows])
    np.testing.assert_allclose(refiner_quick_plan(case, case.plan, inputs, sample), every[rows],
                               rtol=1e-6)
    # on voxels of even index it is the quick plan's dose there
    index = np.stack(np.unravel_index(geometry.index, geometry.shape), axis=1)
    even = np.flatnonzero((index % 2 == 0).all(axis=1))
    transform = inputs.transform
    points = transform.patient.lps_to_index(transform.model.index_to_lps(index[even]))
    np.testing.assert_allclose(every[even], optimise_quick_plan(case).dose_at(points),
                               rtol=1e-5, atol=1e-4)
    assert len(even) > 100 and every.max() > 30.0
    # with other settings, the quick plan of those settings
    from engine.physics.quick_plan import QuickPlanSettings

    coarse = QuickPlanSettings(samples=900, target_samples=300, max_iter=5)
    other = refiner_quick_plan(case, case.plan, inputs, geometry, settings=coarse)
    np.testing.assert_allclose(other[even], optimise_quick_plan(case, settings=coarse).dose_at(
        points), rtol=1e-5, atol=1e-4)
    assert np.abs(other - every).max() > 0.1
