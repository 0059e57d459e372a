"""What the GUI needs from a dose engine, and how it finds the installed one.

The GUI talks to any object with the :class:`DoseEngineLike` methods and reads results through
:class:`DoseResultLike` (the engine runtime's ``DoseEngine`` and ``DoseResult``, DESIGN §5).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from engine.case import Case, Plan, Volume
from engine.metrics.dvh import DVH, DoseMetrics
from engine.metrics.scorecard import ScorecardResult

log = logging.getLogger(__name__)

NO_ENGINE = "No dose engine available"


class DoseResultLike(Protocol):
    """What the GUI reads of ``engine.runtime.DoseResult``: the dose (Gy) on the CT grid, the
    multi-seed std (Gy) or None, DVHs and metrics per structure (``engine.metrics.dvh``), the
    scorecard (``engine.metrics.scorecard``) or None, timings in seconds, and the kind
    ("preview" or "predict")."""

    kind: str
    dose: Volume
    std: Volume | None
    dvhs: Mapping[str, DVH]
    metrics: Mapping[str, DoseMetrics]
    scorecard: ScorecardResult | None
    timings_s: Mapping[str, float]


class DoseEngineLike(Protocol):
    """A synchronous dose engine (``engine.runtime.DoseEngine``); the GUI runs it on a worker
    thread. ``cancel`` is polled between steps; a cancelled call raises
    ``engine.latest_wins.Cancelled``."""

    def preview(self, case: Case, plan: Plan,
                cancel: threading.Event | None = None) -> DoseResultLike: ...

    def predict(self, case: Case, plan: Plan, steps: int = 10, seeds: tuple[int, ...] = (0,),
                progress: Callable[..., None] | None = None,
                cancel: threading.Event | None = None) -> DoseResultLike: ...


def inference_threads() -> int:
    """Torch threads for inference in the GUI: all cores but one, which stays with the UI thread
    and the software renderer so that the window keeps responding."""
    return max(1, (os.cpu_count() or 2) - 1)


def load_dose_engine(checkpoint: str | None = None) -> tuple[DoseEngineLike | None, str]:
    """The installed engine with ``checkpoint`` (None: the shipped default model).

    Returns ``(engine, "")`` or ``(None, reason)`` where ``reason`` starts with
    :data:`NO_ENGINE` and says why, for the window to show.
    """
    try:
        from engine.runtime import DoseEngine  # noqa: PLC0415 - optional part of the engine
    except ImportError as exc:
        return None, f"{NO_ENGINE}: this installation has no dose engine ({exc})."
    try:
        return DoseEngine.from_checkpoint(checkpoint, threads=inference_threads()), ""
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # CheckpointError included
        log.warning("could not load the dose engine: %s", exc)
        where = checkpoint or "the default model"
        return None, f"{NO_ENGINE}: could not load {where}: {exc}"


def model_label(engine: object) -> str:
    """A short name of the engine's model for the views' labels: "default model" for the
    shipped bundle, else its folder's name; "" when the engine does not say which model it
    runs. (Whether the model is experimental is the status bar's to say.)"""
    path = getattr(getattr(engine, "model", None), "path", None)
    if path is None:
        return ""
    from engine.runtime import default_model_path  # noqa: PLC0415 - loaded with the engine

    return "default model" if Path(path).resolve() == default_model_path().resolve() \
        else Path(path).name
