"""Dose-engine latencies (DESIGN §9) on the demo patient at the full 97 x 128 x 160 model grid.

Runs the same measurement as ``dosepilot bench`` (:func:`engine.commands.bench_cmd.measure`):
preview after a beam-angle change with warm caches, full 10-step prediction, DVH + metrics, beam +
angle plates, with the per-stage breakdown, and records the load average before and after.

Until a trained default model ships, it measures a bundle of the shipping architecture with
random weights (timing does not depend on the weights): DiT preset ``cpu-small``, VAE preset
``cpu8``, tiny codec preset ``preview``. ``--model`` measures a real bundle instead, and then also
what the preview shortcut costs: the MAE inside the body between the tiny-codec and the full-VAE
decode of the same latent (the VAE latent of the demo patient's dose).

    python -m benchmarks.bench_engine                 # 10 runs, automatic thread count
    python -m benchmarks.bench_engine --runs 12 --threads 1 2   # each count, same run
    python -m benchmarks.bench_engine --model M --full-vae      # + predictions through the VAE

``--full-vae`` measures each thread count a second time with the engine's ``full_vae`` set, the
peer of a bundle whose predictions the codec decodes (``DoseEngine.codec_decode``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

SHIPPING = {"dit": "cpu-small", "vae": "cpu8", "tiny_codec": "preview"}


def shipping_bundle(path: Path, seed: int = 0) -> Path:
    """A dose-model bundle of the shipping architecture with random weights."""
    from engine.dose_model import save_dose_model
    from engine.features import Normalization
    from engine.models.dit import DiffKT3D, preset
    from engine.models.tiny_codec import TinyCodec, TinyCodecConfig
    from engine.models.vae import VAEConfig, WanVAE

    torch.manual_seed(seed)
    return save_dose_model(
        path, DiffKT3D(preset(SHIPPING["dit"])), WanVAE(VAEConfig.preset(SHIPPING["vae"])),
        TinyCodec(TinyCodecConfig.preset(SHIPPING["tiny_codec"])),
        normalisation=Normalization().to_dict(),
        provenance={"note": "random weights of the shipping architecture, for timing only",
                    "presets": SHIPPING})


def preview_codec_mae(engine, case) -> float:
    """MAE (Gy) inside the body between the tiny-codec and the full-VAE decode of one latent.

    The latent is the VAE encoding of the case's own dose on the model grid, so both decoders
    see a realistic dose latent; the error is measured on the model grid.
    """
    from engine.features import Slot, build_modalities

    inputs = build_modalities(case, case.plan, engine.normalization)
    if not inputs.present[Slot.DOSE] or engine.model.codec is None:
        raise ValueError("the case needs a dose and the model a tiny codec")
    body = inputs[Slot.BODY] > 0
    x = torch.from_numpy(inputs[Slot.DOSE].copy())[None, None].to(engine.device)
    with torch.inference_mode():
        z = engine.model.vae.encode(x)
        full = engine.model.vae.decode(z).float()[0, 0].cpu().numpy()
        tiny = engine.model.codec.decode(z).float()[0, 0].cpu().numpy()
    norm = inputs.normalization
    return float(abs(norm.dose_to_gy(tiny) - norm.dose_to_gy(full))[body].mean())


def main(argv: list[str] | None = None) -> int:
    from engine.commands.bench_cmd import demo_patient, measure
    from engine.io.dicom import load_dicom_case
    from engine.runtime import DoseEngine

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine", description=__doc__)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, nargs="*", default=[],
                   help="thread counts to measure in turn (default: automatic)")
    p.add_argument("--model", type=Path, help="a real bundle (default: shipping architecture, "
                                              "random weights)")
    p.add_argument("--full-vae", action="store_true",
                   help="also measure with predictions through the full VAE, same run")
    args = p.parse_args(argv)
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or shipping_bundle(Path(tmp) / "bundle")
        case = load_dicom_case(demo_patient())
        for threads in args.threads or [None]:
            for full_vae in (False, True) if args.full_vae else (False,):
                load_before = os.getloadavg()
                engine = DoseEngine.from_checkpoint(model, threads=threads, full_vae=full_vae)
                report = measure(engine, case, runs=args.runs)
                report["load_average_before"] = list(load_before)
                report["codec_decode"] = engine.codec_decode
                if args.model:  # with random weights the number would mean nothing
                    report["preview_codec_mae_gy"] = preview_codec_mae(engine, case)
                reports.append(report)
    header = {"model": str(args.model) if args.model else
              f"random weights, presets {SHIPPING}",
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores",
              "torch": torch.__version__}
    print(json.dumps({**header, "runs": reports}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
