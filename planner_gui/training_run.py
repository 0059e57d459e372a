"""A training run as the GUI sees it: the ``dosepilot train`` command line it launches and the
run's event log (``RUN_DIR/events.jsonl``, one JSON object per line) it follows. No Qt here.

Event schema (written by the trainer): every line has ``type`` ("start", "train", "eval",
"checkpoint", "end", "error"), ``step`` and ``time``; "start" carries ``total_steps``, "train"
``loss`` and ``lr``, "end" ``status`` and ``export`` (the exported model folder), "error"
``message``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from engine.durable import write_text
from engine.resources import resources_dir

# the stages of ``dosepilot train STAGE`` (trainer/cli.py), in the order a model is built
STAGES = ("vae", "cache", "distill", "any2any", "dose", "dose-decoder", "codec-decoder",
          "dose-refiner", "scardnft")


class PresetError(ValueError):
    """A preset the panel cannot read or extend; the message names the file."""


@dataclass(frozen=True)
class TrainRequest:
    """What the physicist chose in the training panel.

    ``preset`` is a shipped preset name or a TOML path ("" = the trainer's defaults);
    ``overrides`` set preset keys ``section.key``, e.g. ``{"run.max_steps": 200}``.
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


def _preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix == ".toml" or path.exists():
        return path
    return resources_dir() / "presets" / f"{preset}.toml"


def merged_preset(preset: str, overrides: dict[str, object]) -> dict[str, Any]:
    """The preset's tables with ``overrides`` (``section.key``) applied."""
    tables: dict[str, Any] = {}
    if preset:
        path = _preset_path(preset)
        try:
            tables = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PresetError(f"cannot read preset {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise PresetError(f"preset {path} is not valid TOML: {exc}") from exc
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        if not section:
            raise PresetError(f"override {key!r} must be 'section.key'")
        tables.setdefault(section, {})[name] = value
    return tables


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PresetError(f"preset values must be finite, got {value}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise PresetError(f"cannot write {type(value).__name__} {value!r} into a preset")


def to_toml(tables: dict[str, Any]) -> str:
    """TOML text of ``{section: {key: value}}`` (scalars, lists, one level of tables)."""
    lines = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def write_run_preset(request: TrainRequest) -> Path:
    """Write the preset this run uses (the chosen one plus the panel's edits) next to its run
    folder, ``RUN_DIR.toml``; the trainer reads it with ``--config``."""
    tables = merged_preset(request.preset, request.overrides)
    path = request.run_dir.with_name(request.run_dir.name + ".toml")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, f"# written by the DosePilot training panel from preset "
                     f"{request.preset or '(defaults)'!r}\n" + to_toml(tables))
    return path


def build_train_command(request: TrainRequest, config: Path) -> list[str]:
    """The argv of the training process (the same run a terminal or a cluster job would start):
    ``dosepilot train STAGE --config CONFIG --data DATA --out RUN_DIR``."""
    return [sys.executable, "-m", "engine.cli", "train", request.stage, "--config", str(config),
            "--data", str(request.data_dir), "--out", str(request.run_dir)]


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
