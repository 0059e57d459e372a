"""Physics training plans: varied beam arrangements on real anatomy, written as dataset cases.

``dosepilot physics generate`` reads OpenKBP-style cases (one ``.npz`` per patient, see
``data/openkbp/README.md``) with :mod:`engine.io.openkbp`, draws clinically plausible coplanar
beam arrangements (random spread static beams, or with ``--mix`` also the equispaced 5/7/9-field
class solutions, partial and full arcs: :data:`ARRANGEMENT_MIX`), computes an optimised physics
dose for each (:mod:`engine.physics.dose_calc`) and writes one ``.npz`` per plan, which
:func:`engine.io.openkbp.load_openkbp_npz` reads back as a case whose plan has the stored beams.

On-disk format (format version 2), one file ``<case>_plan<k>.npz`` per plan, written atomically
and without pickle, with the OpenKBP keys unchanged so that the OpenKBP reader reads it, plus the
beams:

========================  =========  ==============================================================
key                       dtype      meaning
========================  =========  ==============================================================
``ct``                    int16      copied from the source case (OpenKBP array order and scale)
``dose_cgy``              uint16     the physics dose in cGy (normalised: primary target D95 = Rx),
                                     inside the body (OpenKBP's possible-dose mask, bit 15 of
                                     ``roi_bits``) like the clinical doses: the stored dose grid
                                     interpolated onto the CT grid (:func:`dose_cgy_from_grid`)
``dose_grid_cgy``         uint16     the engine's coarse dose in cGy, ``[z, y, x]`` along +z, +y,
                                     +x (LPS), only the voxels the body's dose is interpolated
                                     from (others 0), cropped to them (:func:`stored_dose_grid`)
``dose_grid_origin_mm``   float64    LPS (x, y, z) of ``dose_grid_cgy[0, 0, 0]``'s centre
``dose_grid_spacing_mm``  float64    its voxel size along (z, y, x)
``roi_bits``              uint16     copied
``roi_names``/``present``  str       copied
``voxel_mm``              float32    copied
``gantry_deg``            float32    every delivery angle, IEC 61217 for the HFS patient: a static
                                     beam's angle, or an arc's control points in delivery order
``beam_index``            int16      for each ``gantry_deg`` entry, the beam it belongs to (0..)
``beam_technique``        str        per beam: ``static`` or ``arc``
``isocenter_vox``         float32    the isocentre as a fractional voxel index in the arrays'
                                     axis order (OpenKBP: row, column, slice)
``source_case``           str        the source case's file stem
``physics_json``          str        JSON: engine and version, settings, objectives version,
                                     normalisation, timings
========================  =========  ==============================================================

Format 1 (the first 200 plans) had no ``dose_grid_*`` keys. Array order and orientation are
OpenKBP's (see :mod:`engine.io.openkbp`). A ``manifest.json`` in the output folder records the
engine version, the settings and the generator arguments (a run with other settings into the
same folder is refused) and, per plan, its wall time, arrangement kind and quality figures with
the reasons it fails the acceptance rule (:mod:`engine.physics.quality`; ``rejected``, empty
for an accepted plan). ``physics pack`` leaves rejected plans out of the packed training set.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.case import Case, Geometry, Technique
from engine.dose_grid import DoseGrid, restore_support, to_case_grid
from engine.io.openkbp import from_case_axes, load_openkbp_npz, openkbp_geometry, to_case_axes
from engine.io.plan_beams import Arrangement, beam_arrays
from engine.physics.dose_calc import (
    OBJECTIVES_VERSION,
    PhysicsResult,
    PhysicsSettings,
    compute_physics_dose,
)
from engine.physics.quality import plan_quality, rejection_reasons

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
_MIN_OPPOSED_GAP_DEG = 10.0


# ---------------------------------------------------------------- beam arrangements


def _circular_gaps(angles: np.ndarray) -> np.ndarray:
    a = np.sort(np.asarray(angles) % 360.0)
    return np.diff(np.concatenate([a, [a[0] + 360.0]]))


def is_plausible_static(angles: Sequence[float]) -> bool:
    """Spread out (every gap >= half the equispaced gap) and no two beams opposed within 10 deg
    (an opposed pair adds little but a duplicate path)."""
    a = np.asarray(angles, dtype=np.float64) % 360.0
    n = len(a)
    if np.min(_circular_gaps(a)) < 0.5 * 360.0 / n:
        return False
    diff = np.abs((a[:, None] - a[None, :] + 180.0) % 360.0 - 180.0)
    return not np.any(np.abs(diff - 180.0)[np.triu_indices(n, 1)] < _MIN_OPPOSED_GAP_DEG)


def random_static(rng: np.random.Generator, n_beams: int) -> tuple[float, ...]:
    """``n_beams`` integer gantry angles: an equispaced set turned at random and jittered, kept
    only when :func:`is_plausible_static` (so even counts lose their exact opposed pairs)."""
    for _ in range(10_000):
        base = rng.uniform(0.0, 360.0) + np.arange(n_beams) * 360.0 / n_beams
        jitter = rng.uniform(-0.25, 0.25, n_beams) * 360.0 / n_beams
        angles = np.round(base + jitter) % 360.0
        if len(set(angles)) == n_beams and is_plausible_static(angles):
            return tuple(float(a) for a in np.sort(angles))
    raise RuntimeError(f"no plausible arrangement of {n_beams} beams found")


def _arc(start: float, span: float, direction: int, cp_step_deg: float) -> tuple[float, ...]:
    """Control points of an arc from ``start`` turning ``span`` degrees (direction +1/-1), at
    most ``cp_step_deg`` apart."""
    n = max(2, math.ceil(span / cp_step_deg - 1e-9) + 1)
    return tuple(float((start + direction * s) % 360.0) for s in np.linspace(0, span, n))


def full_arc(rng: np.random.Generator, cp_step_deg: float = 10.0) -> tuple[tuple[float, ...]]:
    """One full arc (358 deg from a random start, either direction)."""
    return (_arc(float(rng.integers(0, 360)), 358.0, int(rng.choice([-1, 1])), cp_step_deg),)


def partial_arcs(rng: np.random.Generator, cp_step_deg: float = 10.0
                 ) -> tuple[tuple[float, ...], ...]:
    """One or two partial arcs (180..300 deg each; two turn opposite ways from different start
    angles), control points at most ``cp_step_deg`` apart."""
    spans = rng.uniform(180.0, 300.0, 2).round()
    start = float(rng.integers(0, 360))
    direction = int(rng.choice([-1, 1]))
    first = _arc(start, spans[0], direction, cp_step_deg)
    if rng.random() < 0.5:
        return (first,)
    return (first, _arc(start + rng.uniform(60.0, 300.0), spans[1], -direction, cp_step_deg))


def random_arcs(rng: np.random.Generator, cp_step_deg: float = 10.0
                ) -> tuple[tuple[float, ...], ...]:
    """One full arc (358 deg, either direction) or two partial arcs (180..300 deg each,
    opposite directions, different start angles); control points at most ``cp_step_deg``
    apart."""
    if rng.random() < 0.5:
        return full_arc(rng, cp_step_deg)
    spans = rng.uniform(180.0, 300.0, 2).round()
    start = float(rng.integers(0, 360))
    return (_arc(start, spans[0], 1, cp_step_deg),
            _arc(start + rng.uniform(60.0, 300.0), spans[1], -1, cp_step_deg))


def class_solution(rng: np.random.Generator, fields: Sequence[int] = (5, 7, 9)
                   ) -> tuple[float, ...]:
    """An equispaced class solution: ``n`` fields (drawn from ``fields``) 360/n degrees apart
    from an integer start angle in [0, 360/n) (start 0 with 9 fields is OpenKBP's own set)."""
    n = int(rng.choice(fields))
    start = int(rng.integers(0, math.ceil(360.0 / n)))
    return tuple(sorted(float(round(start + k * 360.0 / n) % 360) for k in range(n)))


def _static(angles: Sequence[float]) -> Arrangement:
    return Arrangement(tuple(Technique.STATIC for _ in angles), tuple((a,) for a in angles))


def _arcs(arcs: Sequence[tuple[float, ...]]) -> Arrangement:
    return Arrangement(tuple(Technique.ARC for _ in arcs), tuple(arcs))


def random_arrangement(rng: np.random.Generator, beams: tuple[int, int], arc_fraction: float
                       ) -> Arrangement:
    """A static arrangement with ``beams[0]..beams[1]`` beams, or arcs with probability
    ``arc_fraction``."""
    if rng.random() < arc_fraction:
        return _arcs(random_arcs(rng))
    return _static(random_static(rng, int(rng.integers(beams[0], beams[1] + 1))))


#: The arrangement mix (kind, probability): random spread static beams, the equispaced class
#: solutions planners use (5, 7, 9 fields), partial arcs and full arcs.
ARRANGEMENT_MIX: tuple[tuple[str, float], ...] = (
    ("static", 0.4), ("class", 0.3), ("partial_arc", 0.15), ("full_arc", 0.15))


def mixed_arrangement(rng: np.random.Generator, beams: tuple[int, int]
                      ) -> tuple[str, Arrangement]:
    """(kind, arrangement) drawn from :data:`ARRANGEMENT_MIX`; static plans have
    ``beams[0]..beams[1]`` beams."""
    kinds = [k for k, _ in ARRANGEMENT_MIX]
    kind = str(rng.choice(kinds, p=[w for _, w in ARRANGEMENT_MIX]))
    if kind == "static":
        return kind, _static(random_static(rng, int(rng.integers(beams[0], beams[1] + 1))))
    if kind == "class":
        return kind, _static(class_solution(rng))
    if kind == "partial_arc":
        return kind, _arcs(partial_arcs(rng))
    return kind, _arcs(full_arc(rng))


# ---------------------------------------------------------------- plan files


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def source_body(source: dict[str, np.ndarray]) -> np.ndarray:
    """The body (OpenKBP possible-dose mask, bit 15 of ``roi_bits``) in case ``[z, y, x]``."""
    return to_case_axes(((source["roi_bits"] >> 15) & 1).astype(bool))


def source_geometry(source: dict[str, np.ndarray]) -> Geometry:
    return openkbp_geometry(source["voxel_mm"], tuple(source["ct"].shape))


def stored_dose_grid(source: dict[str, np.ndarray], grid: DoseGrid) -> DoseGrid:
    """What a plan file keeps of the engine's coarse dose: cGy (0.01 Gy steps), only the voxels
    the body's dose is interpolated from (the rest zeroed), cropped to their bounding box."""
    support = restore_support(grid.array.shape, grid.origin_lps_mm, grid.spacing_zyx_mm,
                              source_geometry(source), source_body(source))
    if not support.any():
        raise ValueError("the engine's dose grid does not cover the body")
    cgy = np.clip(np.rint(grid.array * 100.0), 0, 65535).astype(np.uint16)
    cgy[~support] = 0
    idx = np.argwhere(support)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    origin = np.asarray(grid.origin_lps_mm) + (lo * np.asarray(grid.spacing_zyx_mm))[::-1]
    return DoseGrid(cgy[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]],
                    tuple(float(v) for v in origin), grid.spacing_zyx_mm)


def dose_cgy_from_grid(source: dict[str, np.ndarray], grid_cgy: DoseGrid) -> np.ndarray:
    """A plan file's ``dose_cgy`` (uint16, OpenKBP order) from its stored dose grid (values in
    cGy): interpolated onto the case grid, rounded to cGy, zero outside the body. Generation and
    ``physics unpack`` both call this, so a restored plan is bit-identical."""
    dose = np.rint(to_case_grid(grid_cgy, source_geometry(source)))
    dose[~source_body(source)] = 0.0
    return from_case_axes(np.clip(dose, 0, 65535).astype(np.uint16))


def dose_grid_arrays(grid_cgy: DoseGrid) -> dict[str, np.ndarray]:
    return {"dose_grid_cgy": grid_cgy.array,
            "dose_grid_origin_mm": np.asarray(grid_cgy.origin_lps_mm, dtype=np.float64),
            "dose_grid_spacing_mm": np.asarray(grid_cgy.spacing_zyx_mm, dtype=np.float64)}


def read_dose_grid(arrays: dict[str, np.ndarray]) -> DoseGrid:
    """The stored dose grid of a format-2 plan file (values in cGy)."""
    return DoseGrid(arrays["dose_grid_cgy"],
                    tuple(float(v) for v in arrays["dose_grid_origin_mm"]),
                    tuple(float(v) for v in arrays["dose_grid_spacing_mm"]))


def plan_arrays(source: dict[str, np.ndarray], case: Case, arrangement: Arrangement,
                isocenter_mm: Sequence[float], result: PhysicsResult, source_case: str
                ) -> dict[str, np.ndarray]:
    """The arrays of one generated plan file (see the module docstring)."""
    if result.dose_grid is None:
        raise ValueError("the physics result has no dose grid to store")
    grid_cgy = stored_dose_grid(source, result.dose_grid)
    physics = {"engine": result.info, "settings": dataclasses.asdict(result.settings),
               "normalization": result.normalization, "primary_target": result.primary_target,
               "delivery_gantry_deg": list(result.delivery_gantry_deg),
               "objectives_version": OBJECTIVES_VERSION, "format_version": FORMAT_VERSION}
    out = {k: source[k] for k in ("ct", "roi_bits", "roi_names", "present", "voxel_mm")}
    out.update(
        dose_cgy=dose_cgy_from_grid(source, grid_cgy),
        **dose_grid_arrays(grid_cgy),
        **beam_arrays(arrangement, case, isocenter_mm),
        source_case=np.asarray(source_case),
        physics_json=np.asarray(json.dumps(physics)),
    )
    return out


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Compressed ``.npz`` written to a temporary name in the same folder, then renamed."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- the generator


@dataclass(frozen=True)
class GenerateConfig:
    """What ``physics generate`` does: for each case ``plans_per_case`` plans with
    ``beams[0]..beams[1]`` static beams (or arcs with probability ``arc_fraction``), or, with
    ``mix``, arrangements drawn from :data:`ARRANGEMENT_MIX` (``beams`` then sizes its random
    static plans and ``arc_fraction`` is unused)."""

    plans_per_case: int
    beams: tuple[int, int] = (5, 11)
    arc_fraction: float = 0.0
    seed: int = 0
    settings: PhysicsSettings = PhysicsSettings()
    mix: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.beams
        if not 1 <= lo <= hi:
            raise ValueError(f"beam range must be 1 <= lo <= hi, got {lo}..{hi}")
        if self.plans_per_case < 1:
            raise ValueError("plans_per_case must be >= 1")
        if not 0.0 <= self.arc_fraction <= 1.0:
            raise ValueError("arc_fraction must be in [0, 1]")


@dataclass(frozen=True)
class PlanJob:
    source: Path
    index: int
    out: Path


def plan_rng(seed: int, case_name: str, index: int) -> np.random.Generator:
    """A generator that depends only on (seed, case, plan index): resumed runs draw the same."""
    digest = int.from_bytes(hashlib.blake2b(case_name.encode(), digest_size=8).digest(), "big")
    return np.random.default_rng([seed, digest, index])


def list_cases(dataset_dir: Path) -> list[Path]:
    """The case files (``*.npz``) of a dataset folder, in natural order (pt_2 before pt_10)."""
    def key(p: Path) -> tuple:
        digits = "".join(c for c in p.stem if c.isdigit())
        return (p.stem.rstrip("0123456789"), int(digits) if digits else -1, p.stem)
    return sorted(dataset_dir.glob("*.npz"), key=key)


def plan_jobs(cases: Sequence[Path], out_dir: Path, plans_per_case: int,
              per_patient: bool = False) -> list[PlanJob]:
    """All plan jobs: plan-index major, so a partial run covers every case once first, or with
    ``per_patient`` all plans of a case before the next case, so a partial run already has
    several arrangements of one anatomy (the signal a beam-aware model learns from)."""
    if per_patient:
        return [PlanJob(c, k, out_dir / f"{c.stem}_plan{k}.npz")
                for c in cases for k in range(plans_per_case)]
    return [PlanJob(c, k, out_dir / f"{c.stem}_plan{k}.npz")
            for k in range(plans_per_case) for c in cases]


@dataclass(frozen=True)
class PlanOutcome:
    """One written plan: wall time (s), arrangement kind and its quality record (the figures
    of :func:`engine.physics.quality.plan_quality` plus ``rejected``, the reasons it fails the
    acceptance rule, empty when accepted)."""

    seconds: float
    record: dict


def plan_arrangement(config: GenerateConfig, case_name: str, index: int
                     ) -> tuple[str, Arrangement]:
    """(kind, arrangement) of plan ``index`` of ``case_name``."""
    rng = plan_rng(config.seed, case_name, index)
    if config.mix:
        return mixed_arrangement(rng, config.beams)
    arrangement = random_arrangement(rng, config.beams, config.arc_fraction)
    return ("arc" if arrangement.techniques[0] is Technique.ARC else "static"), arrangement


def quality_record(case: Case, arrays: dict[str, np.ndarray]) -> dict:
    """The manifest's quality record of a plan file's arrays (its dose and beams) for its
    source ``case``."""
    quality = plan_quality(case, to_case_axes(arrays["dose_cgy"]).astype(np.float32) / 100.0)
    return {**quality, "beams": int(len(arrays["beam_technique"])),
            "rejected": rejection_reasons(quality)}


def generate_one(job: PlanJob, config: GenerateConfig) -> PlanOutcome:
    """Compute and write one plan; returns its wall time and quality record."""
    t0 = time.perf_counter()
    source = load_arrays(job.source)
    case = load_openkbp_npz(job.source)
    kind, arrangement = plan_arrangement(config, job.source.stem, job.index)
    iso = case.plan.isocenter_mm
    plan = dataclasses.replace(case.plan, beams=arrangement.beams(iso),
                               name=f"{job.source.stem}_plan{job.index}")
    result = compute_physics_dose(case, plan, config.settings)
    arrays = plan_arrays(source, case, arrangement, iso, result, job.source.stem)
    write_npz_atomic(job.out, arrays)
    return PlanOutcome(time.perf_counter() - t0,
                       {"arrangement": kind, **quality_record(case, arrays)})


def manifest_settings(config: GenerateConfig, dataset_dir: Path) -> dict:
    return {"format_version": FORMAT_VERSION, "objectives_version": OBJECTIVES_VERSION,
            "dataset_dir": str(dataset_dir.resolve()),
            "plans_per_case": config.plans_per_case, "beams": list(config.beams),
            "arc_fraction": config.arc_fraction, "mix": config.mix, "seed": config.seed,
            "physics": dataclasses.asdict(config.settings)}


def prepare_manifest(out_dir: Path, config: GenerateConfig, dataset_dir: Path,
                     engine: dict) -> dict:
    """Create ``manifest.json`` or check that an existing one has the same settings."""
    path = out_dir / "manifest.json"
    settings = manifest_settings(config, dataset_dir)
    if path.exists():
        manifest = json.loads(path.read_text())
        if manifest.get("settings") != settings:
            raise ValueError(f"{out_dir} holds plans generated with other settings "
                             f"({manifest.get('settings')}); use another output folder")
        return manifest
    manifest = {"generator": "dosepilot physics generate", "engine": engine,
                "settings": settings, "created_unix": time.time(), "plans_written": 0}
    write_json_atomic(path, manifest)
    return manifest


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_generation(jobs: Sequence[PlanJob], config: GenerateConfig, workers: int,
                   on_done: Callable[[PlanJob, PlanOutcome | None, str | None], None]) -> None:
    """Run ``jobs`` (in ``workers`` processes when > 1), calling ``on_done(job, outcome,
    error)`` after each."""
    if workers <= 1:
        for job in jobs:
            try:
                on_done(job, generate_one(job, config), None)
            except Exception as exc:  # one bad case must not stop a long run
                log.exception("plan %s failed", job.out.name)
                on_done(job, None, f"{type(exc).__name__}: {exc}")
        return
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(_generate_in_pool, job, config): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            try:
                on_done(job, future.result(), None)
            except Exception as exc:
                on_done(job, None, f"{type(exc).__name__}: {exc}")
    except BaseException:
        # Ctrl-C / SIGTERM (see exit_on_sigterm): queued plans are dropped and the pool processes
        # stopped; their engine subprocesses die with them (the worker's parent-death signal)
        pool.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():
            child.terminate()
        raise
    finally:
        pool.shutdown(wait=True)


def _generate_in_pool(job: PlanJob, config: GenerateConfig) -> PlanOutcome:
    """``generate_one`` in a pool process, which leaves the pool when the parent stops it.

    The pool process inherits ``exit_on_sigterm``, so the parent's ``terminate()`` raises
    SystemExit in the running plan (Ctrl-C: KeyboardInterrupt) and its cleanup runs (engine
    subprocess killed, partial file removed); the executor's worker loop would catch that and
    start the next queued plan, so the process exits here instead."""
    try:
        return generate_one(job, config)
    except SystemExit as exc:
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    except KeyboardInterrupt:
        os._exit(128 + signal.SIGINT)


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit in this process, so that ``finally`` blocks run: a running
    generation then stops its pool and its engine subprocesses instead of orphaning them."""
    signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def reconcile_manifest(manifest: dict, jobs: Sequence[PlanJob], config: GenerateConfig) -> dict:
    """Bring a manifest's plan records and counters in line with the plan files of ``jobs``.

    A run stopped between writing a plan file and recording it leaves a file without a record:
    it is evaluated now (its source case, the same quality figures; no wall time). Every
    recorded plan counts as written, also a rejected one whose file a folder restored from a
    pack lacks. Returns ``manifest``, updated in place."""
    plans: dict[str, dict] = manifest.setdefault("plans", {})
    for job in jobs:
        if job.out.exists() and job.out.stem not in plans:
            kind, _ = plan_arrangement(config, job.source.stem, job.index)
            record = quality_record(load_openkbp_npz(job.source), load_arrays(job.out))
            plans[job.out.stem] = {"arrangement": kind, **record}
    times = manifest.get("seconds_per_plan", [])
    manifest.update(plans_written=len(plans), **summarize_times(times),
                    **acceptance_summary(plans))
    return manifest


def summarize_times(seconds: Sequence[float]) -> dict:
    if not seconds:
        return {}
    return {"median_s_per_plan": statistics.median(seconds), "plans_timed": len(seconds)}


def acceptance_summary(plans: dict[str, dict]) -> dict:
    """How many of the manifest's plan records pass the acceptance rule, and how often each
    limit failed (keyed by the limit, e.g. ``body Dmax``)."""
    reasons: dict[str, int] = {}
    for record in plans.values():
        for reason in record.get("rejected", []):
            key = " ".join(reason.split(" ")[:2])
            reasons[key] = reasons.get(key, 0) + 1
    rejected = sum(1 for r in plans.values() if r.get("rejected"))
    return {"plans_evaluated": len(plans), "plans_accepted": len(plans) - rejected,
            "plans_rejected": rejected, "rejections_by_limit": dict(sorted(reasons.items()))}
