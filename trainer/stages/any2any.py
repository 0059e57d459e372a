"""Stage A (seed §B.7): Any2Any pre-training, random subsets of modalities as targets."""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..distributed import DistContext
from . import flow


def run(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, ctx: DistContext) -> dict:
    return flow.run_stage("any2any", flow.any2any_targets(cfg), cfg, data_dir, run_dir, resume,
                          ctx)
