"""Stage B (seed §B.7): dose fine-tuning, the dose is the only target.

Start it from the Stage A bundle (``[model] init_from = "runs/stage-a/model"``). The VAE
adaptation of seed §E.2 is chosen by ``[vae_adapt] mode`` (see :mod:`trainer.stages.flow`).
"""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..distributed import DistContext
from . import flow


def run(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, ctx: DistContext) -> dict:
    return flow.run_stage("dose", flow.dose_targets, cfg, data_dir, run_dir, resume, ctx)
