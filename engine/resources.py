"""Where shipped resources (default model, demo patient, scorecards, presets) live."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def resources_dir() -> Path:
    """The resources folder: ``$DOSEPILOT_RESOURCES``, a PyInstaller bundle's, or the repo's."""
    env = os.environ.get("DOSEPILOT_RESOURCES")
    if env:
        return Path(env)
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        return Path(bundle) / "resources"
    return Path(__file__).resolve().parents[1] / "resources"


def resource_path(*parts: str) -> Path:
    """Path of a shipped resource; FileNotFoundError naming it when it is missing."""
    path = resources_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"shipped resource not found: {path}")
    return path
