"""Any GPU measured in one short command: latencies, precisions, memory and training rate.

``python -m benchmarks.bench_gpu [--reduced] [--budget SECONDS] [--out FILE.json]``

Composes the models as :mod:`engine.runtime` does after a beam change (condition latents cached;
the two plates encoded, the DiT sampled, the dose decoded) and prints **one JSON line**:

* ``inference.<model>.<precision>``: ``preview_s`` (plates through the preview codec, 1 step,
  codec decode; the shipped model only), ``predict10_s`` (plates through the VAE, 10 Euler
  steps, VAE decode), each component's median seconds (``plates_encode_s``, ``dit_step_s``,
  ``dose_decode_s``, ...) and ``peak_gb``;
* ``fastest_precision.<model>``: per component, the precision that measured faster (float32 or
  bf16 autocast; bf16 only on CUDA) and whether the bf16 dose stayed within 2 % of the float32
  one (``bf16_max_rel_diff``);
* ``training.<model>``: a dose-stage step (flow-matching loss, backward, Adam; bf16 autocast on
  CUDA as the trainer does) at each batch size: ``samples_per_s`` and ``peak_gb``, or
  ``"out of memory"``; the paper-scale DiT with gradient checkpointing (``[model]
  gradient_checkpointing``).

Models: ``shipped`` is ``resources/models/default`` with its weights; ``paper`` is the
paper-scale architecture (Wan 2.1 1.3B DiT dims, Wan 2.1 VAE) with random weights (timing
only). ``--reduced`` runs everything on a 17 x 32 x 32 grid with a small "paper" DiT, one run
each, so it finishes in seconds on a CPU: the test suite runs it that way. ``--budget`` stops
starting new measurements after that many seconds (what was measured is kept; ``--out`` is
rewritten after every measurement, so a time-out loses nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from engine import diffusion
from engine.dose_model import load_dose_model
from engine.features import Slot
from engine.models.dit import DiffKT3D, DiTConfig, any2any_velocity, noise_targets
from engine.models.dit import preset as dit_preset
from engine.models.tiny_codec import TinyCodec
from engine.models.vae import VAEConfig, WanVAE, latent_shape
from engine.runtime import default_model_path

FULL_GRID = (97, 128, 160)
REDUCED_GRID = (17, 32, 32)
CONDITIONS = (Slot.CT, Slot.PTV, Slot.OAR, Slot.BODY)
PLATES = (Slot.BEAM_PLATE, Slot.ANGLE_PLATE)


@dataclasses.dataclass
class Models:
    """One architecture to measure: DiT, VAE and (for previews) the preview codec."""

    dit: DiffKT3D
    vae: WanVAE
    codec: TinyCodec | None


class Bench:
    """Runs measurements on one device and keeps the report (written after each one)."""

    def __init__(self, device: torch.device, runs: int, budget_s: float, out: Path | None):
        self.device, self.runs, self.budget_s, self.out = device, runs, budget_s, out
        self.t0 = time.perf_counter()
        self.report: dict = {"device": (torch.cuda.get_device_name(device)
                                        if device.type == "cuda" else "cpu"),
                             "torch": torch.__version__, "runs": runs}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget_s

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        if self.out is not None:
            self.out.write_text(json.dumps(self.report))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object]) -> float:
        """Median seconds of ``runs`` calls after one warm-up."""
        fn()
        self.sync()
        times = []
        for _ in range(self.runs):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return round(statistics.median(times), 5)

    def autocast(self, precision: str):
        return (torch.autocast(self.device.type, dtype=torch.bfloat16)
                if precision == "bf16" else nullcontext())

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.cuda \
            else None


def inference(bench: Bench, models: Models, grid: tuple[int, int, int], precision: str
              ) -> tuple[dict, torch.Tensor]:
    """Component and end-to-end latencies after a beam change; also the 10-step dose volume
    (float32, for the precision comparison)."""
    dev = bench.device
    gen = torch.Generator().manual_seed(0)
    volumes = (torch.rand(6, 1, *grid, generator=gen) * 2 - 1).to(dev)
    cond_v, plate_v = volumes[:4], volumes[4:]
    bench.reset_peak()
    res: dict = {}
    with torch.inference_mode(), bench.autocast(precision):
        condition = models.vae.encode(cond_v).float()  # cached per case in the engine
        res["plates_encode_s"] = bench.timed(lambda: models.vae.encode(plate_v))
        plates = models.vae.encode(plate_v).float()
        clean = torch.zeros(1, 7, *condition.shape[1:], device=dev)
        clean[0, list(CONDITIONS)] = condition
        clean[0, list(PLATES)] = plates
        target = torch.zeros(1, 7, dtype=torch.bool, device=dev)
        target[:, Slot.DOSE] = True
        present = torch.ones(7, dtype=torch.bool, device=dev)
        velocity = any2any_velocity(models.dit, clean, target, present, "v")
        noise = torch.randn(clean.shape, generator=gen).to(dev)
        start = torch.where(target[..., None, None, None, None], noise, clean)
        res["dit_step_s"] = bench.timed(lambda: diffusion.sample(velocity, start, steps=1))
        res["dit_10_steps_s"] = bench.timed(lambda: diffusion.sample(velocity, start, steps=10))
        latent = diffusion.sample(velocity, start, steps=10)[:, Slot.DOSE]
        res["dose_decode_s"] = bench.timed(lambda: models.vae.decode(latent))
        dose = models.vae.decode(latent).float()
        res["predict10_s"] = round(res["plates_encode_s"] + res["dit_10_steps_s"]
                                   + res["dose_decode_s"], 5)
        if models.codec is not None:
            res["codec_plates_encode_s"] = bench.timed(lambda: models.codec.encode(plate_v))
            res["codec_dose_decode_s"] = bench.timed(lambda: models.codec.decode(latent))
            res["preview_s"] = round(res["codec_plates_encode_s"] + res["dit_step_s"]
                                     + res["codec_dose_decode_s"], 5)
    res["peak_gb"] = bench.peak_gb()
    return res, dose


def fastest_precision(results: dict[str, dict], doses: dict[str, torch.Tensor]) -> dict:
    """Per component, the precision with the lower median time, and how far bf16's dose is
    from float32's (max |diff| / max |fp32|)."""
    if "bf16" not in results:
        return {"all": "fp32", "note": "bf16 autocast is only measured on CUDA"}
    out = {key: min(results, key=lambda p: results[p][key])
           for key in results["fp32"] if key.endswith("_s")}
    diff = (doses["bf16"] - doses["fp32"]).abs().max() / doses["fp32"].abs().max().clamp_min(1e-6)
    out["bf16_max_rel_diff"] = round(float(diff), 4)
    out["bf16_accurate"] = bool(diff <= 0.02)
    return out


def training(bench: Bench, dit_config: DiTConfig, latent: tuple[int, ...], batches: list[int],
             checkpointing: bool) -> dict:
    """Samples per second of a dose-stage step at each batch size (or "out of memory")."""
    model = DiffKT3D(dit_config).to(bench.device).train()
    model.gradient_checkpointing = checkpointing
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    out: dict = {"gradient_checkpointing": checkpointing}
    for batch in batches:
        if bench.over_budget():
            out[f"batch_{batch}"] = "skipped (time budget)"
            continue
        bench.reset_peak()
        x0 = torch.randn(batch, 7, *latent, device=bench.device)
        noise = torch.randn_like(x0)
        mask = torch.zeros(batch, 7, dtype=torch.bool, device=bench.device)
        mask[:, Slot.DOSE] = True
        s = torch.rand(batch, device=bench.device)

        try:
            seconds = bench.timed(functools.partial(_train_step, bench, model, optimizer,
                                                    x0, noise, s, mask))
            out[f"batch_{batch}"] = {"step_s": seconds, "samples_per_s": round(batch / seconds, 2),
                                     "peak_gb": bench.peak_gb()}
        except torch.OutOfMemoryError:
            out[f"batch_{batch}"] = "out of memory"
        optimizer.zero_grad(set_to_none=True)
    return out


def _train_step(bench: Bench, model: DiffKT3D, optimizer: torch.optim.Optimizer,
                x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor, mask: torch.Tensor
                ) -> None:
    with bench.autocast("bf16" if bench.cuda else "fp32"):
        pred = model(noise_targets(x0, noise, s, mask), s, mask)
        loss = diffusion.flow_matching_loss(pred.float(), x0, noise, "v",
                                            mask=mask[..., None, None, None, None])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def shipped_models(device: torch.device) -> Models:
    model = load_dose_model(default_model_path(), device)
    return Models(model.dit, model.vae, model.codec)


def paper_models(device: torch.device, reduced: bool) -> tuple[Models, DiTConfig, VAEConfig]:
    dit_config = dit_preset("wan2.1-1.3b")
    vae_config = VAEConfig.preset("wan2.1")
    if reduced:  # the same code path at a size a CPU runs in seconds
        dit_config = dataclasses.replace(dit_config, dim=64, num_layers=1, num_heads=2,
                                         ffn_dim=128)
        vae_config = VAEConfig.preset("cpu8")
    models = Models(DiffKT3D(dit_config).to(device).eval(),
                    WanVAE(vae_config).to(device).eval(), None)
    return models, dit_config, vae_config


def run(reduced: bool, budget_s: float, out: Path | None, device: str | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = REDUCED_GRID if reduced else FULL_GRID
    bench = Bench(dev, runs=1 if reduced else 5, budget_s=budget_s, out=out)
    bench.report.update(grid=list(grid), reduced=reduced,
                        note="shipped: its weights; paper: random weights (timing only)")
    precisions = ["fp32", "bf16"] if bench.cuda else ["fp32"]
    shipped = shipped_models(dev)
    shipped_dit, shipped_vae = shipped.dit.config, shipped.vae.config
    paper, paper_dit, paper_vae = paper_models(dev, reduced)
    for name, models in (("shipped", shipped), ("paper", paper)):
        results, doses = {}, {}
        for precision in precisions:
            if bench.over_budget():
                break
            results[precision], doses[precision] = inference(bench, models, grid, precision)
            bench.report.setdefault("inference", {}).setdefault(name, {})[precision] = \
                results[precision]
            bench.save()
        if "fp32" in results:
            bench.report.setdefault("fastest_precision", {})[name] = \
                fastest_precision(results, doses)
    del shipped, paper, models
    shipped_latent = latent_shape(*grid, shipped_vae)
    bench.report["training"] = {
        "shipped": training(bench, shipped_dit, shipped_latent,
                            [2] if reduced else [8, 32], checkpointing=False)}
    bench.save()
    bench.report["training"]["paper"] = training(
        bench, paper_dit, latent_shape(*grid, paper_vae), [1, 2] if reduced else [1, 8],
        checkpointing=True)
    bench.save()
    return bench.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reduced", action="store_true",
                        help="small grid and paper DiT, one run each (CPU smoke run)")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="start no new measurement after this many seconds (default 480)")
    parser.add_argument("--out", type=Path, help="also write the JSON here, after each step")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when present)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.reduced, args.budget, args.out, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
