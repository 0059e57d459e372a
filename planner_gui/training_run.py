"""A training run as the GUI sees it: the ``dosepilot train`` command line it launches and the
run's event log (``RUN_DIR/events.jsonl``, one JSON object per line) it follows. No Qt here.

Event schema (written by the trainer): every line has ``type`` ("start", "train", "eval",
"checkpoint", "end", "error"), ``step`` and ``time``; "start" carries ``total_steps``, "train"
``loss`` and ``lr``, "end" ``status`` and ``export`` (the exported model folder), "error"
``message``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.resources import resources_dir

STAGES = ("vae", "cache", "stage-a", "stage-b", "scardnft")


@dataclass(frozen=True)
class TrainRequest:
    """What the physicist chose in the training panel.

    ``overrides`` are preset keys (``section.key``) set on the command line, e.g.
    ``{"run.max_steps": 200, "optim.lr": 1e-4}``.
    """

    stage: str
    data_dir: Path
    run_dir: Path
    preset: str = ""
    overrides: dict[str, object] = field(default_factory=dict)


def available_presets() -> list[str]:
    """Stems of the shipped training presets (``resources/presets/*.toml``)."""
    folder = resources_dir() / "presets"
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def build_train_command(request: TrainRequest) -> list[str]:
    """The argv of the training process (the same run a terminal or a cluster job would start)."""
    argv = [sys.executable, "-m", "engine.cli", "train", request.stage,
            "--data", str(request.data_dir), "--run-dir", str(request.run_dir)]
    if request.preset:
        argv += ["--config", request.preset]
    for key, value in request.overrides.items():
        argv += ["--set", f"{key}={value}"]
    return argv


class EventTail:
    """Reads the events appended to ``events.jsonl`` since the last call (complete lines only;
    a line being written is picked up next time)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "events.jsonl"
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when the data ended with a newline
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a corrupt line does not stop the follower
        return events
