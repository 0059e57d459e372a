"""``dosepilot bench [--json] [--model CKPT] [--runs N] [--threads T] [--no-peers]``: latencies.

Measures, on the demo patient (``resources/demo``) with the default model (or ``--model``) at the
full 97 x 128 x 160 model grid, the medians over ``--runs`` runs of:

* ``preview_s``: a 1-step preview after a beam-angle change, caches warm (the condition latents
  are cached; the changed plates are rebuilt and encoded through the tiny codec), DVH and
  scorecard refresh included;
* ``predict10_s``: a full 10-step prediction after a beam-angle change (plates through the VAE;
  the dose decoded as the engine's ``codec_decode`` says);
* ``preview_first_s`` / ``predict10_first_s``: the case's first preview (its conditions encoded
  too) and first 10-step prediction. With a refiner that shows the DiT the class solution
  (``engine.models.dose_refiner.dit_plan``) these are the only ones whose DiT runs: after a
  beam-angle change the engine reuses the DiT's dose, and the medians above time the plate, the
  quick plan and the refiner;
* ``dvh_ms``: DVHs and metrics of every structure for one dose on the CT grid;
* ``plates_ms``: beam and angle plates of the plan on the model grid.

``breakdown`` holds the median seconds of each engine stage (features, encode, dit, decode,
to_patient, dvh) for the preview and the prediction; ``preview_cpu_s`` / ``predict10_cpu_s`` the
process CPU time (all threads), which with one thread approximates the wall time on an idle
machine when other programs load this one.

These machines differ up to 4x in speed, so the report also measures, in the same process:

* the machine: ``reference_gflops``, a single-thread float32 matrix product's rate (1024 x
  1024, best of several, from the thread's CPU time, so a loaded machine reads about as an idle
  one; the reference machine of DESIGN §9 reads :data:`REFERENCE_GEMM_GFLOPS`), and
  ``reference_membw_gbs``, a single-thread copy of a 256 MB array (bytes read + written per
  second), the memory-bound side;
* the peer: ``mednext_s``, one forward pass of the GDP-HMM challenge's baseline network
  (MedNeXt-B, kernel 3, as packaged by MONAI) on the challenge's 8-channel input, on the model
  grid cut to the multiple of 16 it needs (96 x 128 x 160), with the engine's threads; and
  ``preview_vs_mednext`` / ``predict10_vs_mednext``, how many times faster the engine is. Needs
  MONAI (``pip install 'dosepilot[bench]'``); without it, or with ``--no-peers``, the keys are
  null and ``peers_note`` says why.
* the normalised figures ``preview_norm_s`` / ``predict10_norm_s``: the latency scaled by
  ``reference_gflops / REFERENCE_GEMM_GFLOPS``, what it would read on the reference machine if
  the engine were GEMM-bound. It is a first-order estimate: the engine is partly memory- and
  convolution-bound, and two VMs whose GEMM rates differed 1.25x ran the model 1.35x apart the
  other way round (benchmarks/README.md). Compare models with a peer bundle (``--model``) and
  the MedNeXt ratio, both measured in the same run.

``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.case import Case
from engine.errors import UserError
from engine.features import Slot, build_modalities, plan_plates
from engine.metrics.dvh import all_metrics, prepare
from engine.resources import resources_dir

if TYPE_CHECKING:  # torch is imported only when a benchmark runs, not on every CLI start
    from engine.runtime import DoseEngine

STAGES = ("features", "quick_plan", "encode", "dit", "decode", "refine", "to_patient", "dvh",
          "total")
ANGLE_STEP_DEG = 7.0  # each run moves beam 0 by this much, so the plates are never cached
# single-thread fp32 GEMM of the reference machine (2-core AMD EPYC, notes/cpu-performance.md)
REFERENCE_GEMM_GFLOPS = 69.0


def gemm_gflops(size: int = 1024, repeats: int = 7) -> float:
    """This machine's single-thread float32 GEMM rate in GFLOP/s: the best of ``repeats``
    products of two ``size`` x ``size`` matrices, timed by the thread's CPU time."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.thread_time()
            torch.mm(a, b)
            best = min(best, time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2.0 * size**3 / max(best, 1e-9) / 1e9


def memory_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """This machine's single-thread copy rate in GB/s (bytes read + written), best of
    ``repeats`` copies of a ``megabytes`` float32 array, timed by the thread's CPU time."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.ones(megabytes * 2**20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # warm-up: pages touched
        best = float("inf")
        for _ in range(repeats):
            t0 = time.thread_time()
            dst.copy_(src)
            best = min(best, time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2.0 * src.numel() * 4 / max(best, 1e-9) / 1e9


#: the peer's input: the model grid cut to the multiple of 16 that MedNeXt's four
#: down-samplings need, with the GDP-HMM challenge's eight input channels
MEDNEXT_GRID = (96, 128, 160)
MEDNEXT_CHANNELS = 8


def mednext_forward_s(grid: tuple[int, int, int] = MEDNEXT_GRID, runs: int = 3) -> float:
    """Median seconds of a MedNeXt-B forward pass (MONAI's, kernel 3, 8 channels in, 1 out:
    the GDP-HMM baseline) on one ``grid`` volume, after a warm-up, with torch's current threads.
    Raises ImportError when MONAI is not installed."""
    import torch
    from monai.networks.nets.mednext import create_mednext

    torch.manual_seed(0)
    model = create_mednext("B", spatial_dims=3, in_channels=MEDNEXT_CHANNELS, out_channels=1,
                           kernel_size=3).eval()
    x = torch.randn(1, MEDNEXT_CHANNELS, *grid)
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return _median(times)


def peer_figures(report: dict[str, Any], runs: int, peers: bool,
                 grid: tuple[int, int, int] = MEDNEXT_GRID) -> dict[str, Any]:
    """The MedNeXt peer on ``grid`` and the engine's speed-up over it (null with a note when
    skipped)."""
    out: dict[str, Any] = {"mednext_s": None, "preview_vs_mednext": None,
                           "predict10_vs_mednext": None, "peers_note": ""}
    if not peers:
        out["peers_note"] = "skipped (--no-peers)"
        return out
    try:
        seconds = mednext_forward_s(grid, runs=max(1, min(runs, 3)))
    except ImportError:
        out["peers_note"] = "MONAI is not installed: pip install 'dosepilot[bench]'"
        return out
    out.update(mednext_s=seconds, preview_vs_mednext=seconds / report["preview_s"],
               predict10_vs_mednext=seconds / report["predict10_s"],
               peers_note=f"MedNeXt-B (MONAI), 1 x {MEDNEXT_CHANNELS} x "
                          f"{' x '.join(map(str, grid))}, random weights")
    return out


def normalised(report: dict[str, Any]) -> dict[str, float]:
    """Latencies scaled to the reference machine by the GEMM rate (see the module docstring)."""
    scale = report["reference_gflops"] / REFERENCE_GEMM_GFLOPS
    return {"preview_norm_s": report["preview_s"] * scale,
            "predict10_norm_s": report["predict10_s"] * scale}


def demo_patient() -> Path:
    return resources_dir() / "demo"


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _stage_medians(timings: list[dict[str, float]]) -> dict[str, float]:
    return {k: _median([t.get(k, 0.0) for t in timings]) for k in STAGES}


def measure(engine: DoseEngine, case: Case, runs: int = 10, steps: int = 10) -> dict[str, Any]:
    """Median latencies of the engine on ``case`` (see the module docstring for the keys).

    The first preview and prediction (condition encoding, allocator warm-up) are not counted.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    plan = case.plan
    if plan is None or not plan.beams:
        raise ValueError(f"case {case.name!r} has no plan with beams")
    base = plan.beams[0].gantry_deg

    def moved(i: int):
        return plan.with_gantry(0, (base + ANGLE_STEP_DEG * (i + 1)) % 360.0)

    t0 = time.perf_counter()
    engine.preview(case, plan)  # warm: condition latents, scorecard choice
    preview_first = time.perf_counter() - t0
    engine.predict(case, plan, steps=1)  # warm the full-VAE plate path
    previews, predictions = [], []
    for i in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        result = engine.preview(case, moved(i))
        previews.append({**result.timings_s, "wall": time.perf_counter() - t0,
                         "cpu": time.process_time() - c0})
    for i in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        result = engine.predict(case, moved(runs + i), steps=steps)
        predictions.append({**result.timings_s, "wall": time.perf_counter() - t0,
                            "cpu": time.process_time() - c0})

    inputs = build_modalities(case, plan, engine.normalization)
    ptv = inputs[Slot.PTV] > -1.0
    structures = prepare(case.structures, case.geometry)
    dose = result.dose.array
    dvh_s, plate_s = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        all_metrics(dose, structures, case.geometry)
        dvh_s.append(time.perf_counter() - t0)
    for i in range(runs):
        t0 = time.perf_counter()
        plan_plates(ptv, inputs.transform.model, moved(i))
        plate_s.append(time.perf_counter() - t0)

    return {
        "preview_s": _median([p["wall"] for p in previews]),
        "predict10_s": _median([p["wall"] for p in predictions]),
        "preview_first_s": preview_first,
        "predict10_first_s": predictions[0]["wall"],
        "dvh_ms": 1000.0 * _median(dvh_s),
        "plates_ms": 1000.0 * _median(plate_s),
        "preview_cpu_s": _median([p["cpu"] for p in previews]),
        "predict10_cpu_s": _median([p["cpu"] for p in predictions]),
        "reference_gflops": gemm_gflops(),
        "reference_membw_gbs": memory_bandwidth_gbs(),
        "device": str(engine.device),
        "threads": engine.threads,
        "runs": runs,
        "steps": steps,
        "structures": len(case.structures),
        "beams": len(plan.beams),
        "breakdown": {"preview": _stage_medians(previews),
                      "predict10": _stage_medians(predictions)},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _text(r: dict[str, Any]) -> str:
    lines = [f"device {r['device']}, {r['threads']} thread(s), median of {r['runs']} run(s); "
             f"{r['structures']} structures, {r['beams']} beams",
             f"preview after a beam-angle change  {r['preview_s']:8.3f} s",
             f"{r['steps']}-step prediction{'':17}{r['predict10_s']:8.3f} s",
             f"  the case's first: preview {r['preview_first_s']:.3f} s, prediction "
             f"{r['predict10_first_s']:.3f} s",
             f"  process CPU time: preview {r['preview_cpu_s']:.3f} s, prediction "
             f"{r['predict10_cpu_s']:.3f} s",
             f"  machine: single-thread fp32 GEMM {r['reference_gflops']:.0f} GFLOP/s (the "
             f"reference machine: {REFERENCE_GEMM_GFLOPS:.0f}), copy "
             f"{r['reference_membw_gbs']:.1f} GB/s",
             f"  scaled to the reference machine by GEMM rate: preview "
             f"{r['preview_norm_s']:.3f} s, prediction {r['predict10_norm_s']:.3f} s",
             (f"  peer MedNeXt-B forward {r['mednext_s']:.2f} s: preview "
              f"{r['preview_vs_mednext']:.1f}x, prediction {r['predict10_vs_mednext']:.1f}x "
              "faster" if r["mednext_s"] is not None else f"  peer MedNeXt: {r['peers_note']}"),
             f"DVH + metrics{'':22}{r['dvh_ms']:8.1f} ms",
             f"beam + angle plates{'':16}{r['plates_ms']:8.1f} ms",
             "breakdown (s):   " + "  ".join(f"{k:>10}" for k in STAGES)]
    for kind, stages in r["breakdown"].items():
        lines.append(f"  {kind:<14}" + "  ".join(f"{stages[k]:10.3f}" for k in STAGES))
    if r["load_average"]:
        lines.append("load average " + ", ".join(f"{v:.2f}" for v in r["load_average"]))
    return "\n".join(lines)


def load_engine(model: Path | None, threads: int | None, device: str | None = None,
                precision: str = "fp32", full_vae: bool = False) -> DoseEngine:
    """The engine for ``model`` (default: the shipped one), with a clear error when missing or
    when ``precision`` does not suit the device."""
    from engine.models.checkpoint import CheckpointError
    from engine.runtime import DoseEngine, default_model_path

    path = model if model is not None else default_model_path()
    if model is None and not (path / "bundle.json").is_file():
        raise UserError(f"no default model is installed (expected a model bundle in {path}); "
                        "pass one with --model PATH (a folder written by the trainer)")
    if not path.exists():
        raise UserError(f"{path}: no such model bundle")
    try:
        return DoseEngine.from_checkpoint(path, device=device, threads=threads,
                                          precision=precision, full_vae=full_vae)
    except (CheckpointError, OSError, ValueError) as exc:
        raise UserError(f"cannot load the model {path}: {exc}") from exc


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision fp32|bf16`` (see :data:`engine.runtime.PRECISIONS`)."""
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="inference precision (default fp32, the faster one for the shipped "
                             "model on CPU and GPU; bf16 only on CUDA, for large models)")


def run(args: argparse.Namespace) -> int:
    from engine.io.dicom import DicomImportError, load_dicom_case

    if args.runs < 1:
        raise UserError(f"--runs must be >= 1, got {args.runs}")
    engine = load_engine(args.model, args.threads, precision=args.precision)
    try:
        case = load_dicom_case(args.patient or demo_patient())
    except DicomImportError as exc:
        raise UserError(str(exc)) from exc
    if case.plan is None or not case.plan.beams:
        raise UserError(f"{case.name}: the patient has no plan with beams to benchmark")
    report = measure(engine, case, runs=args.runs)
    report.update(normalised(report))
    report.update(peer_figures(report, args.runs, peers=args.peers))
    report["model"] = str(engine.model.path)
    report["patient"] = case.name
    print(json.dumps(report, indent=2) if args.json else _text(report))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="measure preview, prediction, DVH and plate latencies on this machine",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--model", type=Path, help="model bundle folder (default: the shipped model)")
    p.add_argument("--runs", type=int, default=10, help="runs per measurement (default 10)")
    p.add_argument("--threads", type=int,
                   help="CPU threads (default: the cores other processes leave free)")
    p.add_argument("--patient", type=Path,
                   help="DICOM patient folder (default: the demo patient)")
    p.add_argument("--no-peers", dest="peers", action="store_false",
                   help="skip the MedNeXt peer (tens of seconds on a laptop CPU)")
    add_precision_argument(p)
    p.set_defaults(func=run)
