"""Physics training plans: random beam arrangements on real anatomy, written as dataset cases.

``dosepilot physics generate`` reads OpenKBP-style cases (one ``.npz`` per patient, see
``data/openkbp/README.md``) with :mod:`engine.io.openkbp`, draws clinically plausible coplanar
beam arrangements, computes an optimised physics dose for each (:mod:`engine.physics`) and
writes one ``.npz`` per plan, which :func:`engine.io.openkbp.load_openkbp_npz` reads back as a
case whose plan has the stored beams.

On-disk format (format version 1), one file ``<case>_plan<k>.npz`` per plan, written atomically
and without pickle, with the OpenKBP keys unchanged so that the OpenKBP reader reads it, plus the
beams:

========================  =========  ==============================================================
key                       dtype      meaning
========================  =========  ==============================================================
``ct``                    int16      copied from the source case (OpenKBP array order and scale)
``dose_cgy``              uint16     the physics dose in cGy (normalised: primary target D95 = Rx),
                                     computed inside the body (OpenKBP's possible-dose mask,
                                     bit 15 of ``roi_bits``) like the clinical doses
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
``physics_json``          str        JSON: engine and version, settings, normalisation, timings
========================  =========  ==============================================================

Array order and orientation are OpenKBP's (see :mod:`engine.io.openkbp`).
A ``manifest.json`` in the output folder records the engine version, the settings and the
generator arguments; a run with other settings into the same folder is refused.
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

from engine.case import Beam, Case, Plan, Technique
from engine.io.openkbp import from_case_axes, load_openkbp_npz
from engine.physics import PhysicsResult, PhysicsSettings, compute_physics_dose

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MIN_OPPOSED_GAP_DEG = 10.0


# ---------------------------------------------------------------- beam arrangements


@dataclass(frozen=True)
class Arrangement:
    """A coplanar beam arrangement: per beam its technique and its gantry angles (one for a
    static beam, the control points in delivery order for an arc), IEC degrees."""

    techniques: tuple[Technique, ...]
    gantry_deg: tuple[tuple[float, ...], ...]

    def beams(self, isocenter_mm: Sequence[float]) -> tuple[Beam, ...]:
        out = []
        for i, (tech, angles) in enumerate(zip(self.techniques, self.gantry_deg)):
            out.append(Beam(f"{'Arc' if tech is Technique.ARC else 'B'}{i + 1}", angles[0],
                            tuple(isocenter_mm), technique=tech, number=i + 1,
                            control_point_gantry_deg=angles if tech is Technique.ARC else ()))
        return tuple(out)


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


def random_arcs(rng: np.random.Generator, cp_step_deg: float = 10.0
                ) -> tuple[tuple[float, ...], ...]:
    """One full arc (358 deg, either direction) or two partial arcs (180..300 deg each,
    opposite directions, different start angles); control points at most ``cp_step_deg``
    apart."""
    def arc(start: float, span: float, direction: int) -> tuple[float, ...]:
        n = max(2, math.ceil(span / cp_step_deg - 1e-9) + 1)
        return tuple(float((start + direction * s) % 360.0) for s in np.linspace(0, span, n))

    if rng.random() < 0.5:
        start = float(rng.integers(0, 360))
        return (arc(start, 358.0, int(rng.choice([-1, 1]))),)
    spans = rng.uniform(180.0, 300.0, 2).round()
    start = float(rng.integers(0, 360))
    return (arc(start, spans[0], 1), arc(start + rng.uniform(60.0, 300.0), spans[1], -1))


def random_arrangement(rng: np.random.Generator, beams: tuple[int, int], arc_fraction: float
                       ) -> Arrangement:
    """A static arrangement with ``beams[0]..beams[1]`` beams, or arcs with probability
    ``arc_fraction``."""
    if rng.random() < arc_fraction:
        arcs = random_arcs(rng)
        return Arrangement(tuple(Technique.ARC for _ in arcs), arcs)
    n = int(rng.integers(beams[0], beams[1] + 1))
    return Arrangement(tuple(Technique.STATIC for _ in range(n)),
                       tuple((a,) for a in random_static(rng, n)))


# ---------------------------------------------------------------- plan files


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def plan_arrays(source: dict[str, np.ndarray], case: Case, arrangement: Arrangement,
                isocenter_mm: Sequence[float], result: PhysicsResult, source_case: str
                ) -> dict[str, np.ndarray]:
    """The arrays of one generated plan file (see the module docstring)."""
    dose_cgy = np.clip(np.rint(from_case_axes(result.dose.array) * 100.0), 0, 65535)
    gantry = [a for angles in arrangement.gantry_deg for a in angles]
    index = [i for i, angles in enumerate(arrangement.gantry_deg) for _ in angles]
    k, j, i = case.geometry.lps_to_index(isocenter_mm)
    physics = {"engine": result.info, "settings": dataclasses.asdict(result.settings),
               "normalization": result.normalization, "primary_target": result.primary_target,
               "delivery_gantry_deg": list(result.delivery_gantry_deg),
               "format_version": FORMAT_VERSION}
    out = {k: source[k] for k in ("ct", "roi_bits", "roi_names", "present", "voxel_mm")}
    out.update(
        dose_cgy=dose_cgy.astype(np.uint16),
        gantry_deg=np.asarray(gantry, dtype=np.float32),
        beam_index=np.asarray(index, dtype=np.int16),
        beam_technique=np.asarray([t.value for t in arrangement.techniques]),
        isocenter_vox=np.asarray([j, i, case.geometry.shape[0] - 1 - k], dtype=np.float32),
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


def read_plan_beams(arrays: dict[str, np.ndarray]) -> Arrangement:
    """The beam arrangement stored in a generated plan file."""
    techniques = tuple(Technique(str(t)) for t in arrays["beam_technique"])
    gantry = arrays["gantry_deg"].astype(np.float64)
    index = arrays["beam_index"]
    return Arrangement(techniques, tuple(tuple(float(a) for a in gantry[index == i])
                                         for i in range(len(techniques))))


def plan_from_arrays(arrays: dict[str, np.ndarray], case: Case) -> Plan:
    """The plan stored in a generated plan file, for ``case`` read from the same file."""
    i0, i1, i2 = (float(v) for v in arrays["isocenter_vox"])
    iso = tuple(float(v) for v in case.geometry.index_to_lps(
        [case.geometry.shape[0] - 1 - i2, i0, i1]))
    base = case.plan or Plan(())
    return dataclasses.replace(base, beams=read_plan_beams(arrays).beams(iso),
                               name=f"physics plan ({arrays['source_case']})")


# ---------------------------------------------------------------- the generator


@dataclass(frozen=True)
class GenerateConfig:
    """What ``physics generate`` does: for each case ``plans_per_case`` plans with
    ``beams[0]..beams[1]`` static beams (or arcs with probability ``arc_fraction``)."""

    plans_per_case: int
    beams: tuple[int, int] = (5, 11)
    arc_fraction: float = 0.0
    seed: int = 0
    settings: PhysicsSettings = PhysicsSettings()

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


def plan_jobs(cases: Sequence[Path], out_dir: Path, plans_per_case: int) -> list[PlanJob]:
    """All plan jobs, plan-index major so a partial run covers every case once first."""
    return [PlanJob(c, k, out_dir / f"{c.stem}_plan{k}.npz")
            for k in range(plans_per_case) for c in cases]


def generate_one(job: PlanJob, config: GenerateConfig) -> float:
    """Compute and write one plan; returns its wall time in seconds."""
    t0 = time.perf_counter()
    source = load_arrays(job.source)
    case = load_openkbp_npz(job.source)
    arrangement = random_arrangement(plan_rng(config.seed, job.source.stem, job.index),
                                     config.beams, config.arc_fraction)
    iso = case.plan.isocenter_mm
    plan = dataclasses.replace(case.plan, beams=arrangement.beams(iso),
                               name=f"{job.source.stem}_plan{job.index}")
    result = compute_physics_dose(case, plan, config.settings)
    write_npz_atomic(job.out, plan_arrays(source, case, arrangement, iso, result,
                                          job.source.stem))
    return time.perf_counter() - t0


def manifest_settings(config: GenerateConfig, dataset_dir: Path) -> dict:
    return {"format_version": FORMAT_VERSION, "dataset_dir": str(dataset_dir.resolve()),
            "plans_per_case": config.plans_per_case, "beams": list(config.beams),
            "arc_fraction": config.arc_fraction, "seed": config.seed,
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
                   on_done: Callable[[PlanJob, float | None, str | None], None]) -> None:
    """Run ``jobs`` (in ``workers`` processes when > 1), calling ``on_done(job, seconds,
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
        # stopped; their engine subprocesses die with them (physics_worker's parent-death signal)
        pool.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():
            child.terminate()
        raise
    finally:
        pool.shutdown(wait=True)


def _generate_in_pool(job: PlanJob, config: GenerateConfig) -> float:
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


def summarize_times(seconds: Sequence[float]) -> dict:
    if not seconds:
        return {}
    return {"median_s_per_plan": statistics.median(seconds), "plans_timed": len(seconds)}
