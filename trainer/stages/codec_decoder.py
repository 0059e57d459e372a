"""Stage ``codec-decoder``: the preview codec's decoder learns to decode dose latents into the
true dose (the ``dose-decoder`` stage's recipe on the tiny codec; see ``dose_decoder``).

The codec's decoder was distilled to imitate the VAE's decoder, so the preview inherits that
decoder's errors plus its own; refining it on true doses makes the preview's floor its own.
The codec's encoder (the preview's beam and angle plates), the VAE and the DiT stay as they are.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..distributed import DistContext
from .dose_decoder import refine_decoder


def run(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, ctx: DistContext) -> dict:
    return refine_decoder(cfg, data_dir, run_dir, resume, ctx, "codec")
