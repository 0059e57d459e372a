"""Stage ``dose-refiner``: fit a bundle's dose refiner on its own previews of the dataset.

The refiner (:mod:`engine.models.dose_refiner`) corrects the decoded dose around the targets,
where the latents are too coarse for a PTV's edge. It learns what *this* bundle gets wrong, so
its inputs are the bundle's own predictions, made by the engine exactly as the planner makes
them (1-step previews, tiny codec):

1. **Samples** (resumable, ``RUN_DIR/refiner-samples/KEY.npz``, the case's cache key): for
   every case, the ``init_from`` bundle's preview (without a refiner) and the reference dose go
   onto the model grid; of the voxels the refiner corrects, ``SAMPLES`` are kept (a quarter
   drawn from inside the targets, which the DVH metrics weigh) with their input rows, their
   model-grid indices and the error ``reference - preview`` (Gy). The draw is seeded by the
   patient, so a patient's plans keep the same voxels (the beam pairs below compare them).
   Ranks split the cases; a case already sampled with the same refiner inputs (``[refiner]``:
   band, beam plate, quick plan; any width) is not redone.
2. **Fit** (the shared loop: checkpoints, resume, events): a batch is drawn by patient, so every
   patient weighs the same (one with several plans gives one of them, at random: the physics
   plans teach what a beam does without the clinical plans' style being outvoted by them);
   each step draws ``VOXELS_PER_CASE`` rows of every case of the batch; the loss is the L1 (Gy)
   between the refiner's correction and the error, the dose score's own measure. With
   ``[beam_pairs] enabled``, a patient with two or more physics plans also gives two of them
   and the loss adds ``weight`` times the L1 between the two plans' *change* of correction and
   of error at their common voxels, which is the refined dose's change against the reference
   change (the previews cancel out of neither: ``refined_b - refined_a - (ref_b - ref_a)``).
   Only physics plans pair up: they share one dose engine, so what differs between two of them
   is what their beams do, whereas a clinical plan differs from them in style as well. With
   the style input (``[refiner] clinical_style``) the pair is fed as clinical plans
   (:func:`pair_inputs`): the engine shows the clinical style, so a beam's change is fitted
   there. Fitted
   per plan alone, the refiner followed the quick plan's change only partly (one beam moved:
   correlation 0.33 where the quick plan alone reaches 0.54).
3. **Export**: ``RUN_DIR/model``, the bundle with the refiner added (DiT, VAE and codec as they
   were).

The previews are 1-step; the N-step prediction goes through the same refiner (its blur at the
target edges is the same decoders'). Needs ``[model] init_from`` and a dataset with doses; a
refiner that reads the beam plate (``[refiner] beam_plate``) learns what a beam does only from a
dataset with several beam arrangements per patient (the physics plans).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engine.case import Case
from engine.dose_model import load_dose_model, save_dose_model
from engine.errors import UserError
from engine.models.dose_refiner import (
    DoseRefiner,
    RefinerConfig,
    TargetGeometry,
    beam_fraction,
    dit_plan,
    refiner_inputs,
)
from engine.physics.quick_plan import DOSE_MODEL
from engine.runtime import (
    DoseEngine,
    model_plates,
    quick_plan_settings,
    refiner_geometry,
    refiner_quick_plan,
)

from .. import loop
from ..caches import case_key
from ..config import TrainConfig
from ..data import CaseRef, load_case, scan_dataset
from ..distributed import DistContext, barrier

SAMPLES = 40_000
TARGET_SHARE = 0.25
VOXELS_PER_CASE = 1024


def case_samples(engine: DoseEngine, case: Case, config: RefinerConfig,
                 rng: np.random.Generator, anatomy: Case | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input rows ``(n, len(config.features))``, errors ``(n,)`` (Gy) and flat model-grid
    indices ``(n,)`` of up to :data:`SAMPLES` voxels the refiner corrects in ``case`` (which
    must have a reference dose); ``rng`` picks the voxels, so one seed picks the same voxels in
    every plan of a patient.

    ``anatomy``: a case with the same CT and structures that ``engine`` has already seen (an
    earlier plan of the patient), whose cached condition latents the preview reuses."""
    anatomy = anatomy or case
    config = replace(config, clinical_style=False)  # the fit adds that column (by case name)
    preview = engine.preview(anatomy, dit_plan(case.plan, config)).dose.array
    inputs = engine.model_inputs(anatomy, case.plan)  # what the preview was built from (cached)
    # the preview comes back from the CT grid: a cubic round trip, 0.05-0.12 Gy in the body
    preview = inputs.transform.dose_to_model(preview)
    reference = inputs.transform.dose_to_model(case.dose.array)
    geometry = refiner_geometry(inputs, config)
    beam = None
    if config.beam_plate:
        plate, _, n_angles = model_plates(inputs, case.plan, engine.threads)
        beam = beam_fraction(plate, n_angles, geometry)
    n = len(geometry.index)
    inside = np.flatnonzero(geometry.features[:, 0] > 0)
    n_inside = min(len(inside), int(SAMPLES * TARGET_SHARE))
    rows = np.concatenate([rng.choice(n, min(n, SAMPLES - n_inside), replace=False),
                           rng.choice(inside, n_inside, replace=False)])
    error = (reference.ravel() - preview.ravel())[geometry.index[rows]]
    sampled = TargetGeometry(geometry.shape, geometry.index[rows], geometry.features[rows])
    quick = None
    if config.quick_plan:  # the plan's own quick plan, evaluated at the sampled voxels only
        quick = refiner_quick_plan(case, case.plan, inputs, sampled,
                                   settings=quick_plan_settings(config))
    return (refiner_inputs(preview, sampled, config, None if beam is None else beam[rows], quick),
            error.astype(np.float32), sampled.index)


def plans_by_patient(cases: Iterable[CaseRef]) -> dict[str, list[str]]:
    """Patient -> the names of its cases (its clinical plan and its physics plans), in order."""
    plans: dict[str, list[str]] = {}
    for case in cases:
        plans.setdefault(case.group, []).append(case.name)
    return plans


def is_clinical_plan(name: str, patient: str) -> bool:
    """Whether a patient's case is its clinical plan, the case named after the patient itself
    (``train/pt_12`` beside its generated physics plans ``train/physics/pt_12_plan0``...)."""
    return Path(name).name == patient


def physics_plans(names: list[str], patient: str) -> list[str]:
    """Of a patient's cases, its generated physics plans (all but the clinical plan)."""
    return [n for n in names if not is_clinical_plan(n, patient)]


def common_rows(index_a: np.ndarray, index_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of two plans' samples that hold the same model-grid voxels: ``(rows_a, rows_b)``
    with ``index_a[rows_a] == index_b[rows_b]``, each voxel once."""
    _, rows_a, rows_b = np.intersect1d(index_a, index_b, assume_unique=False,
                                       return_indices=True)
    return rows_a, rows_b


def pair_inputs(rows: torch.Tensor, config: RefinerConfig) -> torch.Tensor:
    """A beam pair's input rows as the fit feeds them: with the style input, as clinical plans
    (1), the style the engine predicts, so what a beam changes is fitted where it is shown.
    (Fitted in the physics style, the clinical style followed a moved beam less: 2026-12-07.)"""
    if not config.clinical_style:
        return rows
    rows = rows.clone()
    rows[:, -1] = 1.0
    return rows


def _same_anatomy(a: Case, b: Case) -> bool:
    """Whether two cases hold the same CT and structures (two plans of one patient)."""
    return (a.ct.geometry == b.ct.geometry and np.array_equal(a.ct.array, b.ct.array)
            and [(s.name, s.prescription_gy) for s in a.structures]
            == [(s.name, s.prescription_gy) for s in b.structures]
            and all(np.array_equal(x.mask, y.mask) for x, y in zip(a.structures, b.structures)))


def _sample_settings(config: dict) -> dict:
    """What of a refiner config its samples depend on: all but the network's width and the
    style input (a column the fit adds from the case's name), so refiners of several widths,
    with or without the style, are fitted on one set of samples."""
    return {k: v for k, v in config.items() if k not in ("hidden", "clinical_style")}


def _sampled(path: Path, config: RefinerConfig) -> bool:
    """Whether ``path`` holds samples made for ``config`` (its width aside)."""
    if not path.exists():
        return False
    with np.load(path) as z:
        if "config" not in z or "index" not in z:
            return False
        try:  # a config from before a setting existed has that setting's default
            made_for = RefinerConfig.from_dict(json.loads(str(z["config"])))
        except ValueError:
            return False
    return _sample_settings(made_for.to_dict()) == _sample_settings(config.to_dict())


def _sample_cases(refs: list[CaseRef], bundle: Path, out: Path, config: RefinerConfig,
                  ctx: DistContext, threads: int) -> None:
    """Write the samples of the cases of ``refs`` that are not there yet, split between ranks.

    The ranks list what is missing before any of them writes (a barrier), then each takes a
    contiguous run of it (in name order, a patient's plans are neighbours), so consecutive plans
    of one patient share the engine's condition latents and a resumed run splits what is left
    evenly."""
    pending = [r for r in refs if not _sampled(out / f"{case_key(r.name)}.npz", config)]
    barrier(ctx)
    mine = pending[ctx.rank * len(pending) // ctx.world_size:
                   (ctx.rank + 1) * len(pending) // ctx.world_size]
    if not mine:
        return
    model = load_dose_model(bundle)
    model.refiner = None  # the refiner learns to correct the bundle's uncorrected preview
    engine = DoseEngine(model, device="cpu", threads=threads)
    anatomy = None
    for i, ref in enumerate(mine):
        case = load_case(ref)
        if case.dose is None:
            raise UserError(f"dose-refiner: case {ref.name} ({ref.path}) has no reference dose")
        rng = np.random.default_rng(zlib.crc32(ref.group.encode()))
        if anatomy is None or not _same_anatomy(anatomy, case):
            anatomy = case
        rows, error, index = case_samples(engine, case, config, rng, anatomy)
        tmp = out / f".{case_key(ref.name)}.tmp.npz"
        np.savez(tmp, inputs=rows, error=error, index=index, config=json.dumps(config.to_dict()))
        tmp.replace(out / f"{case_key(ref.name)}.npz")
        if ctx.is_main:
            print(f"dose-refiner: sampled {ref.name} ({i + 1}/{len(mine)} on this process)",
                  flush=True)


def run(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, ctx: DistContext) -> dict:
    if not cfg.model.init_from:
        raise UserError("dose-refiner fits a model bundle's refiner: set [model] init_from")
    bundle = Path(cfg.model.init_from)
    base = load_dose_model(bundle)  # checks the bundle before the long sampling
    manifest = scan_dataset(data_dir, cfg.data.val_fraction)
    config = RefinerConfig(hidden=cfg.refiner.hidden, band_mm=cfg.refiner.band_mm,
                           beam_plate=cfg.refiner.beam_plate, quick_plan=cfg.refiner.quick_plan,
                           quick_plan_model=DOSE_MODEL if cfg.refiner.quick_plan else "",
                           clinical_style=cfg.refiner.clinical_style,
                           dit_class_solution=cfg.refiner.dit_class_solution,
                           quick_plan_samples=cfg.refiner.quick_plan_samples,
                           quick_plan_max_iter=cfg.refiner.quick_plan_max_iter)
    samples = Path(run_dir) / "refiner-samples"
    samples.mkdir(parents=True, exist_ok=True)
    _sample_cases(list(manifest.cases), bundle, samples, config, ctx, cfg.run.threads)
    barrier(ctx)

    pairs = cfg.beam_pairs.enabled
    if pairs and cfg.beam_pairs.weight <= 0:
        raise UserError("dose-refiner: [beam_pairs] enabled needs a weight > 0 (the weight of "
                        "the pairs' change loss)")
    cached: dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}

    clinical = {c.name: is_clinical_plan(c.name, c.group) for c in manifest.cases}

    def load(name: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        if name not in cached:
            with np.load(samples / f"{case_key(name)}.npz") as z:
                inputs = torch.from_numpy(z["inputs"])
                if config.clinical_style:
                    style = torch.full((len(inputs), 1), float(clinical[name]))
                    inputs = torch.cat([inputs, style], dim=1)
                cached[name] = inputs, torch.from_numpy(z["error"]), z["index"]
        return cached[name]

    common: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def pair_rows(a: str, b: str) -> tuple[torch.Tensor, torch.Tensor]:
        if (a, b) not in common:
            rows_a, rows_b = common_rows(load(a)[2], load(b)[2])
            common[a, b] = torch.from_numpy(rows_a), torch.from_numpy(rows_b)
        return common[a, b]

    refiner = DoseRefiner(config).to(ctx.device)

    plans = plans_by_patient(manifest.train)
    generated = {p: physics_plans(names, p) for p, names in plans.items()}
    if pairs and not any(len(g) > 1 for g in generated.values()):
        raise UserError("dose-refiner: [beam_pairs] enabled, but no training patient has two "
                        "physics plans: add generated plans (dosepilot physics generate)")

    def loss(m, patients, gens):
        rows, errors, firsts, seconds, changes = [], [], [], [], []
        for patient, g in zip(patients, gens):
            names = plans[patient]
            pick = int(torch.randint(len(names), (1,), generator=g)) if len(names) > 1 else 0
            x, e, _ = load(names[pick])
            pick = torch.randint(len(e), (VOXELS_PER_CASE,), generator=g)
            rows.append(x[pick])
            errors.append(e[pick])
            if pairs and len(generated[patient]) > 1:
                i, j = torch.randperm(len(generated[patient]), generator=g)[:2].tolist()
                a, b = generated[patient][i], generated[patient][j]
                rows_a, rows_b = pair_rows(a, b)
                if len(rows_a):
                    k = torch.randint(len(rows_a), (VOXELS_PER_CASE,), generator=g)
                    (xa, ea, _), (xb, eb, _) = load(a), load(b)
                    firsts.append(pair_inputs(xa[rows_a[k]], config))
                    seconds.append(pair_inputs(xb[rows_b[k]], config))
                    changes.append(eb[rows_b[k]] - ea[rows_a[k]])
        n = sum(len(r) for r in rows)
        # one forward pass for plans and pairs alike (DDP expects one per step)
        out = m(torch.cat(rows + firsts + seconds).to(ctx.device))
        value = (out[:n] - torch.cat(errors).to(ctx.device)).abs().mean()
        metrics = {"l1_gy": value.item()}
        if changes:
            half = (len(out) - n) // 2
            change = out[n + half:] - out[n:n + half]
            pair = (change - torch.cat(changes).to(ctx.device)).abs().mean()
            metrics["pair_l1_gy"] = pair.item()
            value = value + cfg.beam_pairs.weight * pair
        return value, metrics

    def evaluate(m, names):
        before, after = [], []
        with torch.no_grad():
            for name in names:
                x, e, _ = load(name)
                e = e.to(ctx.device)
                before.append(float(e.abs().mean()))
                after.append(float((m(x.to(ctx.device)) - e).abs().mean()))
        return {"val_l1_gy": sum(after) / len(after),
                "val_l1_uncorrected_gy": sum(before) / len(before)}

    def export(out_dir: Path) -> Path:
        provenance = {**base.provenance, "stage": "dose-refiner", "steps": cfg.run.max_steps,
                      "preset": cfg.source, "init_from": str(bundle), "data": str(data_dir)}
        return save_dose_model(out_dir / "model", base.dit, base.vae, base.codec,
                               normalisation=base.normalisation, prediction=base.prediction,
                               provenance=provenance, refiner=refiner.cpu().eval())

    train = list(plans)
    task = loop.Task(stage="dose-refiner", model=refiner, params=list(refiner.parameters()),
                     train_items=train, val_items=[c.name for c in manifest.val], loss=loss,
                     evaluate=evaluate, export=export, data_signature=loop.data_signature(train))
    return loop.run(task, cfg, run_dir, ctx, resume=resume)
