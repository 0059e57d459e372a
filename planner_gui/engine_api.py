"""What the GUI needs from a dose engine, and how it finds the installed one.

The GUI talks to any object with the :class:`DoseEngineLike` methods and reads results through
:class:`DoseResultLike` (the engine runtime's ``DoseEngine`` and ``DoseResult``, DESIGN §5).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from engine.case import Case, Plan, Volume

log = logging.getLogger(__name__)

NO_ENGINE = "No dose engine available"


class DoseResultLike(Protocol):
    """A dose prediction: dose (Gy) on the CT grid, optional multi-seed std (Gy), DVHs per
    structure, metrics per structure, optional scorecard, timings in seconds, and its kind
    ("preview" or "predict")."""

    dose: Volume
    std: Volume | None
    dvh: Mapping[str, Any]
    metrics: Mapping[str, Mapping[str, float]]
    scorecard: Any
    timings_s: Mapping[str, float]
    kind: str


class DoseEngineLike(Protocol):
    """A synchronous dose engine; the GUI runs it on a worker thread."""

    def preview(self, case: Case, plan: Plan) -> DoseResultLike: ...

    def predict(self, case: Case, plan: Plan, steps: int = 10, seeds: tuple[int, ...] = (0,),
                progress: Callable[..., None] | None = None,
                cancel: threading.Event | None = None) -> DoseResultLike: ...


def limit_torch_threads() -> None:
    """Leave one CPU core to the UI thread and the software renderer while torch works."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))


def load_dose_engine(checkpoint: str | None = None) -> tuple[DoseEngineLike | None, str]:
    """The installed engine with ``checkpoint`` (None: the shipped default model).

    Returns ``(engine, "")`` or ``(None, reason)`` where ``reason`` starts with
    :data:`NO_ENGINE` and says why, for the window to show.
    """
    try:
        from engine.runtime import DoseEngine  # noqa: PLC0415 - optional part of the engine
    except ImportError as exc:
        return None, f"{NO_ENGINE}: this installation has no dose engine ({exc})."
    limit_torch_threads()
    try:
        return DoseEngine.from_checkpoint(checkpoint), ""
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("could not load the dose engine: %s", exc)
        where = checkpoint or "the default model"
        return None, f"{NO_ENGINE}: could not load {where}: {exc}"
