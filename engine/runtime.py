"""The dose engine: interactive 1-step previews and full N-step predictions (DESIGN §5).

:class:`DoseEngine` owns one :class:`~engine.dose_model.DoseModel` on its device (CUDA when
present, else CPU) in float32 by default (:data:`PRECISIONS`) and does the least work per
request:

* per case and isocentre, the condition modalities (CT, PTV, OAR, body) are built and encoded
  once with the full VAE; their latents are cached (cases are immutable, so the cache is keyed
  by the case object and its isocentre);
* per plan, the beam and angle plates are rebuilt (tens of ms) and encoded — through the tiny
  codec for a preview, through the VAE for a full prediction — and cached by the plan value;
* the DiT runs 1 step (preview) or N steps (prediction, several seeds batched), the dose latent
  is decoded (tiny codec for a preview and, :attr:`DoseEngine.codec_decode`, for a prediction
  of a bundle with a refiner; else the VAE), corrected around the targets by the bundle's
  refiner when it has one (:mod:`engine.models.dose_refiner`; its target geometry is built once
  per case and isocentre, the beam plate's values and the quick plan it reads once per plan:
  :mod:`engine.physics.quick_plan`, optimised before the plates are encoded, the case's
  per-angle work kept so that a moved beam recomputes one angle), mapped back onto the CT grid
  through the kept transform, and DVHs, metrics and the scorecard are computed on the CT grid;
* a refiner with ``dit_class_solution`` shows the DiT the nine-field class solution whatever
  the plan (:func:`~engine.models.dose_refiner.dit_plan`): the DiT's dose is then computed once
  per case, isocentre and sampling, and a moved beam costs the plate, the quick plan and the
  refiner only.

:class:`AsyncDoseEngine` is the asyncio face for the GUI: one worker thread, latest-wins
(:mod:`engine.latest_wins`), a running prediction cancelled between steps.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine import diffusion
from engine.case import Case, Plan, Volume
from engine.cpu_tuning import single_thread_blas, tune_cpu
from engine.dose_model import DoseModel, load_dose_model
from engine.features import (
    ModelInputs,
    Normalization,
    Slot,
    build_modalities,
    plan_plates,
)
from engine.latest_wins import Cancelled, LatestWinsRunner, Outcome
from engine.metrics.dvh import DVH, DoseMetrics, StructureSet, all_metrics, prepare
from engine.metrics.scorecard import (
    BoundScorecard,
    ScorecardResult,
    best_scorecard,
)
from engine.models.checkpoint import CheckpointError
from engine.models.dit import any2any_velocity, strip_unreachable_noise
from engine.models.dose_refiner import (
    RefinerConfig,
    TargetGeometry,
    beam_fraction,
    dit_plan,
    target_geometry,
)
from engine.physics.quick_plan import (
    DOSE_MODEL,
    QuickPlanner,
    QuickPlanSettings,
    optimise_quick_plan,
)
from engine.resources import resources_dir

log = logging.getLogger(__name__)

CONDITION_SLOTS = (Slot.CT, Slot.PTV, Slot.OAR, Slot.BODY)
PLATE_SLOTS = (Slot.BEAM_PLATE, Slot.ANGLE_PLATE)
ProgressCallback = Callable[[int, int], None]


def default_model_path() -> Path:
    """The shipped default model bundle."""
    return resources_dir() / "models" / "default"


def auto_threads() -> int:
    """CPU threads for inference: the cores that other processes leave free, at least one.

    Intra-op threads wait for each other at every operator; when the cores are already busy
    (1-minute load average), a preempted thread stalls the others, and one thread is several
    times faster than two on a loaded 2-core machine (benchmarks/RESULTS.md, bench_engine).
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return cores
    return int(min(cores, max(1, round(cores - load))))


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class DoseResult:
    """One predicted dose and what was computed from it.

    Attributes:
        kind: "preview" (1 step, tiny codec) or "predict" (N steps, plates through the full
            VAE, the dose decoded as :attr:`DoseEngine.codec_decode` says).
        dose: mean predicted dose in Gy on the case's CT grid.
        std: voxel-wise standard deviation over seeds (Gy, CT grid); None for one seed.
        dvhs: structure name -> cumulative DVH on the CT grid.
        metrics: structure name -> standard dose metrics.
        scorecard: the best-matching shipped scorecard, or None when none applies.
        timings_s: seconds per stage (features, encode, dit, decode, to_patient, dvh, total).
        steps: sampler steps; seeds: the initial-noise seeds.
    """

    kind: str
    dose: Volume
    std: Volume | None
    dvhs: dict[str, DVH]
    metrics: dict[str, DoseMetrics]
    scorecard: ScorecardResult | None
    timings_s: dict[str, float]
    steps: int
    seeds: tuple[int, ...] = (0,)


@dataclass
class _GridState:
    """What is fixed for one case and isocentre: the model inputs and condition latents."""

    inputs: ModelInputs
    condition_latents: torch.Tensor  # [4, C, d, h, w], slots CT, PTV, OAR, body
    refiner_geometry: TargetGeometry | None  # None: the model has no refiner


@dataclass
class _PlanState:
    """What is fixed for one plan: its plates' latents and, for a refiner that reads them, the
    beam plate's and the quick plan's values at the refiner's voxels."""

    plate_latents: torch.Tensor | None  # [2, C, d, h, w], slots beam plate, angle plate; None
    # when the DiT is shown the class solution instead (DoseEngine._shown_latents)
    refiner_beam: np.ndarray | None
    refiner_quick: np.ndarray | None = None


@dataclass
class _CaseState:
    case: Case  # held so that id(case) stays unique while cached
    structures: StructureSet
    grids: dict[tuple[float, float, float], _GridState] = field(default_factory=dict)
    scorecard: BoundScorecard | None = None
    scorecard_chosen: bool = False
    planner: QuickPlanner | None = None  # made on the first quick plan the refiner needs
    # with a refiner that shows the DiT the class solution (dit_plan): its plates' latents and
    # the DiT's decoded doses, per isocentre and sampling, not per plan
    shown_latents: dict[tuple, torch.Tensor] = field(default_factory=dict)
    dit_doses: OrderedDict[tuple, np.ndarray] = field(default_factory=OrderedDict)


class _Timer:
    """Seconds spent per named stage (``with timer("dit"): ...``), summed over repeats."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


#: Inference precisions. float32 is the default on every device: on an H200 the shipped model
#: ran 2x faster in float32 than under bf16 autocast (preview 5.7 vs 14.9 ms, 10-step 73 vs
#: 155 ms; ``benchmarks/bench_gpu.py``), its layers being too small for the casts to pay, and
#: a CPU without bf16 units runs bf16 several to 60x slower. bf16 is for large (paper-scale)
#: models on CUDA: measure with ``benchmarks/bench_gpu.py`` before choosing it.
PRECISIONS = ("fp32", "bf16")
#: DiT doses kept per case with a class-solution refiner (a preview and a 10-step prediction,
#: at most a few seeds and isocentres: each a model-grid dose per seed, ~1-2 MB)
MAX_DIT_DOSES = 8


def model_plates(inputs: ModelInputs, plan: Plan, workers: int
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """Beam plate, angle plate and the number of angles summed (:func:`plan_plates`) of ``plan``
    on the model grid of ``inputs``, around its PTV slot's targets."""
    return plan_plates(inputs[Slot.PTV] > -1.0, inputs.transform.model, plan, workers=workers)


def _halve(mask: np.ndarray) -> np.ndarray:
    """The every-other-voxel grid points (``2 * j`` along each axis, ``j`` up to ``n // 2``)
    that linear interpolation at ``mask``'s voxels reads: ``j`` for ``2j - 1 .. 2j + 1``."""
    for axis in range(3):
        m = np.moveaxis(mask, axis, 0)
        n = m.shape[0]
        padded = np.zeros((2 * (n // 2) + 3, *m.shape[1:]), bool)
        padded[1:n + 1] = m
        mask = np.moveaxis(padded[0:-2:2] | padded[1:-1:2] | padded[2::2], 0, axis)
    return mask


def _double(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Linear interpolation of values on every other voxel (``coarse[j]`` at ``2j``) onto the
    full grid of ``shape``."""
    for axis, n in enumerate(shape):
        c = np.moveaxis(coarse, axis, 0)
        full = np.empty((n, *c.shape[1:]), np.float32)
        full[0::2] = c[:(n + 1) // 2]
        full[1::2] = 0.5 * (c[:n // 2] + c[1:n // 2 + 1])
        coarse = np.moveaxis(full, 0, axis)
    return coarse


def quick_plan_settings(config: RefinerConfig) -> QuickPlanSettings:
    """The settings of the quick plan a refiner reads (its config records them)."""
    return QuickPlanSettings(samples=config.quick_plan_samples,
                             target_samples=config.quick_plan_samples // 3,
                             max_iter=config.quick_plan_max_iter)


def refiner_quick_plan(case: Case, plan: Plan, inputs: ModelInputs, geometry: TargetGeometry,
                       planner: QuickPlanner | None = None,
                       settings: QuickPlanSettings | None = None) -> np.ndarray:
    """The quick-plan dose (Gy) of ``plan`` (:mod:`engine.physics.quick_plan`, optimised on
    the case's own grid) at the refiner's voxels of the model grid: evaluated on every other
    model-grid voxel along each axis and linearly interpolated in between. The quick plan
    varies over a bixel (7 mm), and a moved beam's preview cannot wait for its dose at every
    voxel (8x the points). ``planner``: the case's :class:`QuickPlanner`, which keeps what
    other plans of the case already computed (and its settings); ``settings``: those of the
    quick plan without one (default: :class:`QuickPlanSettings`'s)."""
    transform = inputs.transform
    voxels = np.zeros(geometry.shape, bool)
    voxels.ravel()[geometry.index] = True
    needed = _halve(voxels)
    points = transform.patient.lps_to_index(transform.model.index_to_lps(2 * np.argwhere(needed)))
    if planner is None:
        values = optimise_quick_plan(case, plan, settings or QuickPlanSettings()).dose_at(points)
    else:
        key = f"refiner voxels around {tuple(transform.isocenter_mm)}"
        values = planner.optimise(plan).dose_at(points, key)
    coarse = np.zeros(needed.shape, np.float32)
    coarse[needed] = values
    return _double(coarse, geometry.shape).ravel()[geometry.index]


def refiner_geometry(inputs: ModelInputs, config: RefinerConfig) -> TargetGeometry:
    """The target geometry a dose refiner corrects on, from a case's model-grid inputs."""
    norm = inputs.normalization
    return target_geometry(norm.ptv_to_gy(inputs[Slot.PTV]), inputs[Slot.BODY] > 0.0,
                           inputs.transform.model.spacing, config)


def check_refiner_quick_plan(model: DoseModel) -> None:
    """Refuse a model whose dose refiner reads a quick plan of another dose model than the one
    :mod:`engine.physics.quick_plan` computes (its corrections would be fitted to another dose).

    Raises:
        CheckpointError: naming the dose model the refiner was fitted on and this one.
    """
    config = model.refiner.config if model.refiner is not None else None
    if config is None or not config.quick_plan or config.quick_plan_model == DOSE_MODEL:
        return
    fitted = (repr(config.quick_plan_model) if config.quick_plan_model
              else "a dose model it does not record (a bundle older than this check)")
    raise CheckpointError(
        f"the model's dose refiner was fitted on the quick plan of {fitted}, but this version "
        f"computes the quick plan with {DOSE_MODEL!r}: refit the refiner (dosepilot train "
        f"dose-refiner) or use the DosePilot version the model was made with")


class DoseEngine:
    """Dose previews and predictions for cases, with caches keyed by content."""

    def __init__(self, model: DoseModel, device: str | torch.device | None = None,
                 threads: int | None = None, solver: diffusion.Solver = "euler",
                 max_cases: int = 4, max_plans: int = 32, precision: str = "fp32",
                 full_vae: bool = False) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        check_refiner_quick_plan(model)
        self.device = pick_device(device)
        if precision == "bf16" and self.device.type != "cuda":
            raise ValueError("bf16 inference is for CUDA devices; on this CPU it runs several "
                             "to 60x slower than float32")
        self.precision = precision
        if self.device.type == "cpu":
            tune_cpu(threads or auto_threads())
        single_thread_blas()
        self.threads = torch.get_num_threads()
        self.model = model.to(self.device)
        self.normalization = Normalization.from_dict(model.normalisation or {})
        self.solver = solver
        self.full_vae = full_vae
        self._cases: OrderedDict[int, _CaseState] = OrderedDict()
        self._plates: OrderedDict[tuple, _PlanState] = OrderedDict()
        self._quick: OrderedDict[tuple, np.ndarray] = OrderedDict()  # shared by both kinds
        self._max_cases, self._max_plans = max_cases, max_plans
        self._lock = threading.Lock()  # one inference at a time per engine

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str | None = None,
                        threads: int | None = None, precision: str = "fp32",
                        full_vae: bool = False) -> DoseEngine:
        """Load a model bundle (default: the shipped one) onto ``device``."""
        path = Path(path) if path is not None else default_model_path()
        return cls(load_dose_model(path, "cpu"), device=device, threads=threads,
                   precision=precision, full_vae=full_vae)

    @property
    def codec_decode(self) -> bool:
        """Whether full predictions decode the dose with the tiny codec instead of the VAE.

        True for a bundle with a codec and a dose refiner, unless ``full_vae``: the refiner is
        fitted on the bundle's previews, i.e. on the codec's decode, and corrects it better.
        Measured with the Stage H bundle (benchmarks/RESULTS.md, 33 OpenKBP validation
        patients, 10-step): dose / DVH score 4.91 / 4.64 Gy against 4.93 / 4.71 through the VAE,
        and the VAE decode's time (about 15 % of a prediction) saved. The plates keep the VAE:
        encoded by the codec they lost 0.02 of held-out beam-change correlation.
        """
        return (not self.full_vae and self.model.codec is not None
                and self.model.refiner is not None)

    # --- public API ------------------------------------------------------------------------

    def preview(self, case: Case, plan: Plan | None = None,
                cancel: threading.Event | None = None) -> DoseResult:
        """1-step prediction; plates and dose go through the tiny codec when the model has one."""
        return self._run(case, plan, steps=1, seeds=(0,), kind="preview", progress=None,
                         cancel=cancel, solver="euler")

    def predict(self, case: Case, plan: Plan | None = None, steps: int = 10,
                seeds: Sequence[int] = (0,), progress: ProgressCallback | None = None,
                cancel: threading.Event | None = None,
                solver: diffusion.Solver | None = None) -> DoseResult:
        """N-step prediction, plates through the full VAE (the dose decoded as
        :attr:`codec_decode` says); several seeds give mean and std."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not seeds:
            raise ValueError("at least one seed is needed")
        return self._run(case, plan, steps=steps, seeds=tuple(int(s) for s in seeds),
                         kind="predict", progress=progress, cancel=cancel,
                         solver=solver or self.solver)

    # --- stages ----------------------------------------------------------------------------

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _to_tensor(self, volumes: np.ndarray) -> torch.Tensor:
        """[N, D, H, W] float32 -> [N, 1, D, H, W] on the device."""
        return torch.from_numpy(np.ascontiguousarray(volumes))[:, None].to(self.device)

    def _encode(self, volumes: np.ndarray, fast: bool) -> torch.Tensor:
        codec = self.model.codec if fast and self.model.codec is not None else self.model.vae
        return codec.encode(self._to_tensor(volumes)).float()

    def _decode(self, latents: torch.Tensor, fast: bool) -> np.ndarray:
        codec = self.model.codec if fast and self.model.codec is not None else self.model.vae
        return codec.decode(latents).float()[:, 0].cpu().numpy()

    def _case_state(self, case: Case) -> _CaseState:
        state = self._cases.get(id(case))
        if state is None or state.case is not case:
            state = _CaseState(case=case, structures=prepare(case.structures, case.geometry))
            self._cases[id(case)] = state
            while len(self._cases) > self._max_cases:
                self._cases.popitem(last=False)
        self._cases.move_to_end(id(case))
        return state

    def _grid_state(self, state: _CaseState, plan: Plan, timer: _Timer) -> _GridState:
        iso = tuple(round(v, 3) for v in plan.isocenter_mm)
        grid = state.grids.get(iso)
        if grid is None:
            with timer("features"):
                inputs = build_modalities(state.case, plan, self.normalization,
                                          workers=self.threads)
            with timer("encode"):
                cond = self._encode(inputs.volumes[list(CONDITION_SLOTS)], fast=False)
            geometry = None
            if self.model.refiner is not None:
                with timer("features"):
                    geometry = refiner_geometry(inputs, self.model.refiner.config)
            grid = _GridState(inputs=inputs, condition_latents=cond, refiner_geometry=geometry)
            state.grids[iso] = grid
        return grid

    def _plan_state(self, state: _CaseState, grid: _GridState, plan: Plan, fast: bool,
                    timer: _Timer) -> _PlanState:
        key = (id(state.case), plan.beams, plan.patient_position, fast)
        planned = self._plates.get(key)
        if planned is None:
            with timer("features"):
                norm = grid.inputs.normalization
                config = self.model.refiner.config if self.model.refiner is not None else None
                # no more threads than inference (the GUI keeps a core for its event loop)
                beam, angle, n_angles = model_plates(grid.inputs, plan, self.threads)
                refiner_beam = None
                if grid.refiner_geometry is not None and config.beam_plate:
                    refiner_beam = beam_fraction(beam, n_angles, grid.refiner_geometry)
            refiner_quick = None
            if grid.refiner_geometry is not None and self.model.refiner.config.quick_plan:
                # before the DiT, not beside it: on two cores, beside the DiT's two threads, its
                # 0.12 s slowed a 10-step prediction by 0.3-0.4 s (benchmarks/RESULTS.md)
                with timer("quick_plan"):
                    refiner_quick = self._quick_plan(state, plan, grid)
            latents = None  # the DiT shown the class solution: DoseEngine._shown_latents
            if dit_plan(plan, config) is plan:
                with timer("encode"):
                    plates = np.stack([norm.beam_plate(beam, n_angles), norm.binary(angle)])
                    latents = self._encode(plates, fast=fast)
            planned = _PlanState(latents, refiner_beam, refiner_quick)
            self._plates[key] = planned
            while len(self._plates) > self._max_plans:
                self._plates.popitem(last=False)
        self._plates.move_to_end(key)
        return planned

    def _shown_latents(self, state: _CaseState, grid: _GridState, shown: Plan, fast: bool,
                       timer: _Timer) -> torch.Tensor:
        """The plate latents of the class solution the DiT is shown (:func:`dit_plan`), once
        per case, isocentre and encoder."""
        key = (shown.beams, shown.patient_position, fast)
        latents = state.shown_latents.get(key)
        if latents is None:
            with timer("features"):
                norm = grid.inputs.normalization
                beam, angle, n_angles = model_plates(grid.inputs, shown, self.threads)
                plates = np.stack([norm.beam_plate(beam, n_angles), norm.binary(angle)])
            with timer("encode"):
                latents = state.shown_latents[key] = self._encode(plates, fast=fast)
        return latents

    def _quick_plan(self, state: _CaseState, plan: Plan, grid: _GridState) -> np.ndarray:
        """The plan's quick-plan dose at the refiner's voxels, cached per case and plan (a
        preview and a prediction of one plan share it); the case's planner keeps the angles
        of earlier plans, so a moved beam costs one angle and the optimisation."""
        key = (id(state.case), plan.beams, plan.patient_position)
        quick = self._quick.get(key)
        if quick is None:
            if state.planner is None:
                state.planner = QuickPlanner(
                    state.case, quick_plan_settings(self.model.refiner.config))
            quick = refiner_quick_plan(state.case, plan, grid.inputs, grid.refiner_geometry,
                                       state.planner)
            self._quick[key] = quick
            while len(self._quick) > self._max_plans:
                self._quick.popitem(last=False)
        self._quick.move_to_end(key)
        return quick

    def model_inputs(self, case: Case, plan: Plan | None = None) -> ModelInputs:
        """The model-grid inputs of ``case`` under ``plan`` (default: the case's), built with
        this model's normalisation and cached per case and isocentre as for a prediction."""
        with self._lock, torch.inference_mode(), self._autocast():
            return self._grid_state(self._case_state(case), plan or case.plan, _Timer()).inputs

    def _scorecard(self, state: _CaseState, dose: np.ndarray) -> ScorecardResult | None:
        if not state.scorecard_chosen:
            state.scorecard, state.scorecard_chosen = best_scorecard(state.case, dose), True
        return state.scorecard.score(dose) if state.scorecard is not None else None

    def _run(self, case: Case, plan: Plan | None, steps: int, seeds: tuple[int, ...], kind: str,
             progress: ProgressCallback | None, cancel: threading.Event | None,
             solver: diffusion.Solver) -> DoseResult:
        plan = plan or case.plan
        if plan is None or not plan.beams:
            raise ValueError(f"case {case.name!r} has no plan with beams to predict a dose for")
        fast = kind == "preview"
        timer = _Timer()
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode(), self._autocast():
            state = self._case_state(case)
            grid = self._grid_state(state, plan, timer)
            planned = self._plan_state(state, grid, plan, fast, timer)
            gy = self._dit_dose(state, grid, plan, planned, steps, seeds, fast, solver,
                                progress, cancel, timer)
            if grid.refiner_geometry is not None:
                with timer("refine"):
                    gy = self.model.refiner.refine(gy, grid.refiner_geometry,
                                                   planned.refiner_beam, planned.refiner_quick)
        order = 1 if fast else 3
        with timer("to_patient"):
            transform = grid.inputs.transform
            dose = transform.dose_to_patient(gy.mean(axis=0), order=order)
            std = None
            if len(seeds) > 1:
                std = transform.to_patient(gy.std(axis=0), order=1, fill=0.0)
        with timer("dvh"):
            curves, metrics = all_metrics(dose.array, state.structures, case.geometry)
            scorecard = self._scorecard(state, dose.array)
        timer.times["total"] = time.perf_counter() - t0
        return DoseResult(kind=kind, dose=dose, std=std,
                          dvhs={c.name: c for c in curves}, metrics={m.name: m for m in metrics},
                          scorecard=scorecard, timings_s=dict(timer.times), steps=steps,
                          seeds=seeds)

    def _dit_dose(self, state: _CaseState, grid: _GridState, plan: Plan, planned: _PlanState,
                  steps: int, seeds: tuple[int, ...], fast: bool, solver: diffusion.Solver,
                  progress: ProgressCallback | None, cancel: threading.Event | None,
                  timer: _Timer) -> np.ndarray:
        """The DiT's decoded dose (Gy, model grid, ``[seeds, z, y, x]``) before the refiner.
        Shown the class solution instead of the plan (:func:`dit_plan`), the DiT's input is
        the same for every plan of a case: its dose is kept per case, isocentre and sampling,
        and a moved beam costs the refiner's inputs only."""
        config = self.model.refiner.config if self.model.refiner is not None else None
        shown = dit_plan(plan, config)
        key = None
        if shown is not plan:
            key = (shown.beams, shown.patient_position, fast, steps, seeds, solver)
            if key in state.dit_doses:
                state.dit_doses.move_to_end(key)
                if progress is not None:
                    progress(steps, steps)
                return state.dit_doses[key]
        latents = (planned.plate_latents if key is None
                   else self._shown_latents(state, grid, shown, fast, timer))
        clean, target, present = self._assemble(grid, latents, len(seeds))
        noise = torch.stack([
            diffusion.initial_noise(clean.shape[1:], torch.Generator().manual_seed(seed))
            for seed in seeds]).to(self.device)
        velocity = any2any_velocity(self.model.dit, clean, target, present,
                                    self.model.prediction)

        def on_step(i: int, n: int, s: float, x: torch.Tensor) -> None:
            if progress is not None:
                progress(i, n)

        with timer("dit"):
            try:
                sample = diffusion.sample(
                    velocity, torch.where(target[..., None, None, None, None], noise, clean),
                    steps=steps, solver=solver, callback=on_step,
                    should_cancel=cancel.is_set if cancel is not None else None)
            except diffusion.SamplingCancelled as exc:
                raise Cancelled(str(exc)) from exc
            sample = strip_unreachable_noise(self.model.dit, sample, noise, target,
                                             self.model.prediction)
        with timer("decode"):
            unit = self._decode(sample[:, Slot.DOSE], fast=fast or self.codec_decode)
        gy = grid.inputs.normalization.dose_to_gy(unit)
        if key is not None:
            state.dit_doses[key] = gy
            while len(state.dit_doses) > MAX_DIT_DOSES:
                state.dit_doses.popitem(last=False)
        return gy

    def _assemble(self, grid: _GridState, plates: torch.Tensor, batch: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean latents [B, 7, C, d, h, w], the dose-target mask [B, 7] and present slots [7]."""
        cond = grid.condition_latents
        clean = torch.zeros((7, *cond.shape[1:]), device=self.device)
        clean[list(CONDITION_SLOTS)] = cond
        clean[list(PLATE_SLOTS)] = plates
        clean = clean.expand(batch, *clean.shape).contiguous()
        target = torch.zeros((batch, 7), dtype=torch.bool, device=self.device)
        target[:, Slot.DOSE] = True
        present = torch.tensor([True, True, True, grid.inputs.present[Slot.BODY], True, True,
                                True], device=self.device)
        return clean, target, present


class AsyncDoseEngine:
    """The asyncio face of a :class:`DoseEngine`: latest-wins, one worker thread.

    ``await submit_preview(...)`` / ``await submit_predict(...)`` return an
    :class:`~engine.latest_wins.Outcome` whose ``value`` is a :class:`DoseResult` when ``ok``;
    a newer request supersedes older ones (status ``superseded``), a running prediction is
    cancelled between steps, and errors come back as ``error`` outcomes.
    """

    def __init__(self, engine: DoseEngine) -> None:
        self.engine = engine
        self.runner = LatestWinsRunner("dose-engine")

    async def submit_preview(self, case: Case, plan: Plan | None = None) -> Outcome[DoseResult]:
        return await self.runner.submit(lambda cancel: self.engine.preview(case, plan, cancel))

    async def submit_predict(self, case: Case, plan: Plan | None = None, steps: int = 10,
                             seeds: Sequence[int] = (0,),
                             progress: ProgressCallback | None = None) -> Outcome[DoseResult]:
        return await self.runner.submit(lambda cancel: self.engine.predict(
            case, plan, steps=steps, seeds=seeds, progress=progress, cancel=cancel))

    def shutdown(self) -> None:
        self.runner.shutdown()
