"""The run's event log: ``RUN_DIR/events.jsonl`` (one JSON object per line) + TensorBoard scalars.

The GUI starts ``dosepilot train ...`` as a subprocess and follows this file; keep the schema
stable. Every line is a JSON object with at least:

* ``type`` (str): one of the types below;
* ``step`` (int): optimizer steps completed so far (0 before the first);
* ``time`` (float): UNIX time in seconds.

Types and their extra fields:

* ``"start"``: ``stage``, ``total_steps``, ``world_size``, ``device``, ``resumed`` (bool),
  ``config`` (the preset as a dict), ``train_cases``, ``val_cases``.
* ``"train"``: ``loss`` (float, mean over the global batch), ``lr``, ``samples_per_s``,
  ``grad_norm`` (before clipping), ``total_steps``, plus stage-specific losses (floats, e.g.
  ``reward``, ``kl``). The ``cache`` stage, which does not train, reports its progress with
  ``"train"`` events that have ``step`` (cases done), ``total_steps``, ``samples_per_s`` and
  ``case``, but no ``loss``/``lr``.
* ``"eval"``: ``total_steps`` and the validation metrics (floats, e.g. ``val_loss``,
  ``val_mae_gy``).
* ``"checkpoint"``: ``path`` (str) of the checkpoint just completed.
* ``"end"``: ``total_steps``, ``status`` ("completed", or "stopped" when a signal stopped the
  run after saving a checkpoint), ``export`` (path of the exported model, or null), ``wall_s``.
* ``"error"``: ``message`` (str), ``error_type`` (str).

Only rank 0 writes. Lines are flushed as they are written, so a reader sees complete lines; a
reader should still ignore a trailing partial line if it reads while a line is being written.
A line left unfinished (a killed process, a full disk) is ended before the next run appends, so
the resumed run's events are never glued to it. A full disk raises
:class:`engine.durable.NoSpaceError` naming ``events.jsonl``.
Numeric fields are also written as TensorBoard scalars ``<type>/<field>`` in ``RUN_DIR/tb``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from engine.durable import NoSpaceError, no_space

log = logging.getLogger(__name__)

EVENT_TYPES = ("start", "train", "eval", "checkpoint", "end", "error")


class EventLog:
    """Appends events to ``run_dir/events.jsonl`` and mirrors numeric fields to TensorBoard.

    Args:
        run_dir: the run folder (created if needed).
        enabled: False on ranks other than 0 (then every call is a no-op).
        tensorboard: also write TensorBoard scalars.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "events.jsonl"
        self.enabled = enabled
        self._file = None
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = _ends_mid_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            if torn:  # a process killed (or a disk filled) while writing a line: end it there
                self._write("\n")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def emit(self, type: str, step: int, **fields: Any) -> dict:
        """Write one event; returns it. Non-finite floats are written as null."""
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
        event = {"type": type, "step": int(step), "time": time.time()}
        event.update({k: _jsonable(v) for k, v in fields.items()})
        if not self.enabled:
            return event
        self._write(json.dumps(event, allow_nan=False) + "\n")
        if self._tb is not None and type in ("train", "eval"):
            for key, value in event.items():
                if key not in ("step", "time", "total_steps") and isinstance(value, float):
                    self._tb.add_scalar(f"{type}/{key}", value, step)
            self._tb.flush()
        return event

    def _write(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
        except OSError as exc:
            if no_space(exc, self.path.parent):
                raise NoSpaceError(self.path, exc) from exc
            raise

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as exc:  # only a line that could not be written is lost
                log.warning("closing %s: %s", self.path, exc)
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_events(run_dir: Path) -> list[dict]:
    """All complete events of a run, in order (a trailing partial line is ignored)."""
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() == 0:
                return False
            f.seek(-1, 2)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
