"""``dosepilot train STAGE --config PRESET --data DATASET --out RUN_DIR [--resume] [--set K=V]``.

Stages, in the order a model is built (seed §B.3, §B.5, §B.7):

* ``vae``: fit the VAE on the dataset's modalities (or adapt pretrained Wan weights);
* ``cache``: encode every case's modalities once into the latent cache;
* ``distill``: train the tiny preview codec against the frozen VAE;
* ``any2any``: Stage A, random subsets of modalities as targets;
* ``dose``: Stage B, dose as the only target;
* ``dose-decoder`` / ``codec-decoder``: refine the VAE's / preview codec's decoder on true doses;
* ``dose-refiner``: fit the correction of the decoded dose around the targets on the bundle's
  own previews;
* ``scardnft``: LoRA post-training with the scorecard + MAE reward.

Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m engine.cli train ...`` (see
:mod:`trainer.distributed`). Progress goes to ``RUN_DIR/events.jsonl`` (:mod:`trainer.events`).
Everything the preset, data and checkpoint need is checked before any compute.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from engine.errors import UserError

STAGES = ("vae", "cache", "distill", "any2any", "dose", "dose-decoder", "codec-decoder",
          "dose-refiner", "scardnft")


ALIASES = {"stage-a": "any2any", "stage-b": "dose", "dose-decoder": "dose_decoder",
           "codec-decoder": "codec_decoder", "dose-refiner": "dose_refiner"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train or adapt the dose model (one stage)",
        description="\n\n".join(__doc__.split("\n\n")[1:4]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES + tuple(ALIASES),
                   help="which stage to run (stage-a = any2any, stage-b = dose)")
    p.add_argument("--config", default="",
                   help="preset TOML file, or the name of a shipped preset (paper, cpu-small, "
                        "test-tiny); default: paper with CUDA, cpu-small without")
    p.add_argument("--data", required=True, type=Path, help="dataset folder")
    p.add_argument("--out", "--run-dir", dest="out", required=True, type=Path,
                   help="run folder (created)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest complete checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one preset value (repeatable)")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    import torch

    from .config import load_config
    from .distributed import setup, teardown
    from .loop import TrainingStopped

    try:
        preset = args.config or ("paper" if torch.cuda.is_available() else "cpu-small")
        cfg = load_config(preset, args.overrides)
        ctx = setup(cfg.run.device, cfg.run.threads)
    except UserError as exc:
        _log_refusal(args.out, exc)
        raise
    torch.manual_seed(cfg.run.seed)  # fresh weights are a function of the seed, on every rank
    try:
        stage = importlib.import_module(f"trainer.stages.{ALIASES.get(args.stage, args.stage)}")
        stage.run(cfg, args.data, args.out, args.resume, ctx)
    except TrainingStopped as exc:
        print(f"{args.stage}: {exc}", file=sys.stderr)
        return 128 + exc.signum       # the shell's convention for "ended by this signal"
    except UserError as exc:
        _log_refusal(args.out, exc)
        raise
    finally:
        teardown()
    return 0


def _log_refusal(run_dir: Path, exc: UserError) -> None:
    """Tell a GUI following the event log why the run stopped before training (rank 0 only)."""
    from .events import EventLog

    if getattr(exc, "logged", False) or int(os.environ.get("RANK", 0)) != 0:
        return
    try:
        log = EventLog(run_dir, tensorboard=False)
        log.emit("error", 0, message=str(exc), error_type=type(exc).__name__)
        log.close()
    except OSError:  # e.g. a full disk: the refusal itself is what the user must see
        pass
