"""DosePilot model bundles: named components (architecture config + safetensors weights).

Layout of a bundle folder::

    bundle.json            format, version, components, normalisation, prediction, provenance
    <component>.safetensors one per component (e.g. dit, vae, tiny_codec)

``bundle.json``::

    {"format": "dosepilot-model-bundle", "format_version": 1,
     "prediction": "v",
     "normalisation": {...},            # engine.features.normalization.Normalization.to_dict()
     "provenance": {...},               # data, stages, steps, commit, ... free JSON
     "components": {"dit": {"kind": "DiffKT3D", "config": {...},
                            "weights": "dit.safetensors",
                            "sha256": "...",    # of the weight file; optional (older bundles)
                            "tensors": {"time_proj.bias": [[1536], "float32"], ...}}}}

A component is generic: ``kind`` names an architecture in :data:`ARCHITECTURES` (``DiffKT3D``,
``WanVAE``, ``TinyCodec``; a frozen config dataclass with ``to_dict``/``from_dict`` and a module
built from it), ``config`` is that architecture's ``to_dict()``. Loading checks the
JSON, that every weight file exists and holds exactly the manifest's tensors, and that the tensors
match what the architecture builds from the config (on the meta device: nothing is allocated) and,
when the bundle records one, that every weight file has its SHA-256 (a corrupt file with an
intact header would otherwise load), and fails with a :class:`CheckpointError` naming the file
and what is wrong. :func:`build_component` then makes
the module of one component (e.g. ``build_component(config, states, "dit")``).

Writes are atomic: the bundle is written to a temporary sibling folder, every file and the folder
are fsynced, then it is renamed into place (an existing bundle is moved aside first and deleted
after; a full disk raises :class:`engine.durable.NoSpaceError`). Weights are never unpickled;
official ``.pth`` files are read only through ``torch.load(weights_only=True)`` in
:func:`read_pth_weights_only`.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine.durable import NoSpaceError, file_sha256, fsync_path, no_space, replacing

BUNDLE_FORMAT = "dosepilot-model-bundle"
BUNDLE_VERSION = 1
BUNDLE_JSON = "bundle.json"
PREDICTIONS = ("v", "epsilon", "x0")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# kind -> "module:ModelClass:ConfigClass" (built as ModelClass(ConfigClass.from_dict(config)))
# or a callable taking the config dict and returning the nn.Module.
ARCHITECTURES: dict[str, str | Callable[[dict], nn.Module]] = {
    "DiffKT3D": "engine.models.dit:DiffKT3D:DiTConfig",
    "WanVAE": "engine.models.vae:WanVAE:VAEConfig",
    "TinyCodec": "engine.models.tiny_codec:TinyCodec:TinyCodecConfig",
    "DoseRefiner": "engine.models.dose_refiner:DoseRefiner:RefinerConfig",
}


class CheckpointError(ValueError):
    """A checkpoint or bundle is missing, malformed or does not match its architecture."""


@dataclass(frozen=True)
class Component:
    """One named part of a bundle: its architecture kind, config dict and weights."""

    kind: str
    config: dict
    state_dict: Mapping[str, Tensor] = field(repr=False)


def _factory(kind: str, architectures: Mapping[str, str | Callable[[dict], nn.Module]]):
    if kind not in architectures:
        raise CheckpointError(
            f"unknown component kind {kind!r}; known kinds: {sorted(architectures)}"
        )
    target = architectures[kind]
    if callable(target):
        return target
    module_name, model_name, config_name = target.split(":")
    module = importlib.import_module(module_name)
    model_class, config_class = getattr(module, model_name), getattr(module, config_name)
    return lambda config: model_class(config_class.from_dict(config))


def _expected_shapes(
    kind: str, config: dict, architectures: Mapping[str, str | Callable[[dict], nn.Module]]
) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes the architecture builds from ``config`` (on the meta device)."""
    factory = _factory(kind, architectures)
    try:
        with torch.device("meta"):
            module = factory(config)
    except Exception as exc:  # noqa: BLE001 - any failure to build from a config means "invalid"
        raise CheckpointError(f"invalid {kind} config: {exc}") from exc
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _compare(where: str, have: Mapping[str, tuple], want: Mapping[str, tuple]) -> None:
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [
        f"{k} {list(have[k])} != {list(want[k])}"
        for k in sorted(set(have) & set(want))
        if tuple(have[k]) != tuple(want[k])
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {wrong[:3]})")
        raise CheckpointError(f"{where}: " + "; ".join(parts))



def save_bundle(
    path: str | Path,
    components: Mapping[str, Component],
    *,
    normalisation: dict,
    prediction: str = "v",
    provenance: dict | None = None,
    architectures: Mapping[str, str | Callable[[dict], nn.Module]] = ARCHITECTURES,
) -> Path:
    """Write a bundle folder at ``path`` atomically and return it.

    Each component's weights must match what its architecture builds from its config; this is
    checked before anything is written.
    """
    path = Path(path)
    if prediction not in PREDICTIONS:
        raise CheckpointError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if not components:
        raise CheckpointError("a bundle needs at least one component")
    manifest: dict[str, dict] = {}
    for name, comp in components.items():
        if not name.isidentifier():
            raise CheckpointError(f"component name {name!r} must be a Python identifier")
        shapes = {k: tuple(v.shape) for k, v in comp.state_dict.items()}
        _compare(f"component {name!r} ({comp.kind})", shapes,
                 _expected_shapes(comp.kind, comp.config, architectures))
        manifest[name] = {
            "kind": comp.kind,
            "config": comp.config,
            "weights": f"{name}.safetensors",
            "tensors": {
                k: [list(v.shape), str(v.dtype).removeprefix("torch.")]
                for k, v in sorted(comp.state_dict.items())
            },
        }
    document = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "prediction": prediction,
        "normalisation": normalisation,
        "provenance": provenance or {},
        "components": manifest,
    }
    json.dumps(document)  # fails early, before any file is written, if not JSON-serialisable

    if path.exists() and not (path.is_dir() and (path / BUNDLE_JSON).is_file()):
        raise CheckpointError(f"{path} exists and is not a model bundle; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is an ordinary folder
    old = None
    try:
        for name, comp in components.items():
            tensors = {
                k: v.detach().to("cpu").contiguous().clone() for k, v in comp.state_dict.items()
            }
            save_file(tensors, str(tmp / manifest[name]["weights"]))
            manifest[name]["sha256"] = file_sha256(tmp / manifest[name]["weights"])
        (tmp / BUNDLE_JSON).write_text(json.dumps(document, indent=1, sort_keys=True))
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
        os.rename(tmp, path)
        fsync_path(path.parent)
    except BaseException as exc:
        full = no_space(exc, path.parent)
        if old is not None and not path.exists():
            os.rename(old / path.name, path)  # put the previous bundle back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if full:
            raise NoSpaceError(path, exc) from exc
        raise
    if old is not None:
        shutil.rmtree(old)
    return path


def read_bundle_config(path: str | Path) -> dict:
    """The parsed, format-checked ``bundle.json`` of a bundle folder (no weights read)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model bundle not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"a model bundle is a folder with {BUNDLE_JSON}; got a file: {path}")
    json_path = path / BUNDLE_JSON
    if not json_path.is_file():
        raise CheckpointError(f"{path} is not a model bundle: {BUNDLE_JSON} is missing")
    try:
        document = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{json_path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{json_path} is not a {BUNDLE_FORMAT} file")
    version = document.get("format_version")
    if version != BUNDLE_VERSION:
        raise CheckpointError(
            f"{json_path}: unsupported bundle format version {version!r} "
            f"(this DosePilot reads version {BUNDLE_VERSION})"
        )
    for key in ("components", "normalisation", "prediction", "provenance"):
        if key not in document:
            raise CheckpointError(f"{json_path}: missing field {key!r}")
    if document["prediction"] not in PREDICTIONS:
        raise CheckpointError(f"{json_path}: unknown prediction {document['prediction']!r}")
    for key in ("components", "normalisation", "provenance"):
        if not isinstance(document[key], dict):
            raise CheckpointError(f"{json_path}: {key!r} must be a JSON object")
    if not document["components"]:
        raise CheckpointError(f"{json_path}: the bundle has no components")
    for name, comp in document["components"].items():
        if not isinstance(comp, dict):
            raise CheckpointError(f"{json_path}: component {name!r} must be a JSON object")
        for key in ("kind", "config", "weights", "tensors"):
            if key not in comp:
                raise CheckpointError(f"{json_path}: component {name!r} lacks {key!r}")
        problem = _component_problem(comp)
        if problem:
            raise CheckpointError(f"{json_path}: component {name!r}: {problem}")
    return document


def _component_problem(comp: dict) -> str:
    """What is malformed in a component entry of ``bundle.json`` ("" when nothing is)."""
    if not isinstance(comp["kind"], str):
        return "'kind' must be a string"
    if not isinstance(comp["config"], dict):
        return "'config' must be a JSON object"
    if not isinstance(comp["weights"], str):
        return "'weights' must be a file name"
    tensors = comp["tensors"]
    if not isinstance(tensors, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], list)
            and all(isinstance(d, int) and d >= 0 for d in v[0]) and isinstance(v[1], str)
            for v in tensors.values()):
        return "'tensors' must map each tensor name to [shape, dtype]"
    digest = comp.get("sha256")
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        return "'sha256' must be 64 hexadecimal digits"
    return ""


def load_bundle(
    path: str | Path,
    architectures: Mapping[str, str | Callable[[dict], nn.Module]] = ARCHITECTURES,
) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """Read and check a bundle: returns (``bundle.json`` as a dict, component name -> state dict).

    Raises :class:`CheckpointError` naming the file, component and tensors when anything is
    missing, malformed or does not match the architecture its config describes.
    """
    path = Path(path)
    document = read_bundle_config(path)
    state_dicts: dict[str, dict[str, Tensor]] = {}
    for name, comp in document["components"].items():
        weights = path / comp["weights"]
        if Path(comp["weights"]).name != comp["weights"] or not weights.is_file():
            raise CheckpointError(
                f"bundle {path}: weight file {comp['weights']!r} of {name!r} is missing"
            )
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"bundle {path}: cannot read {weights.name}: {exc}") from exc
        manifest = {k: tuple(v[0]) for k, v in comp["tensors"].items()}
        _compare(f"bundle {path}: {weights.name} vs {BUNDLE_JSON}",
                 {k: tuple(v.shape) for k, v in state.items()}, manifest)
        dtypes = [
            k for k, v in state.items()
            if str(v.dtype).removeprefix("torch.") != comp["tensors"][k][1]
        ]
        if dtypes:
            raise CheckpointError(
                f"bundle {path}: {weights.name} dtypes differ from {BUNDLE_JSON}: {dtypes[:3]}"
            )
        where = f"bundle {path}: {BUNDLE_JSON}: component {name!r}"
        try:
            expected = _expected_shapes(comp["kind"], comp["config"], architectures)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        _compare(f"{where} ({comp['kind']}) vs its config", manifest, expected)
        if "sha256" in comp and file_sha256(weights) != comp["sha256"]:
            raise CheckpointError(
                f"bundle {path}: {weights.name} does not match the SHA-256 recorded in "
                f"{BUNDLE_JSON}: the file is corrupt (or was replaced)"
            )
        state_dicts[name] = state
    return document, state_dicts


def build_component(
    document: dict,
    state_dicts: Mapping[str, Mapping[str, Tensor]],
    name: str,
    architectures: Mapping[str, str | Callable[[dict], nn.Module]] = ARCHITECTURES,
) -> nn.Module:
    """The module of component ``name`` of a loaded bundle, built from its config, weights loaded.

    ``document`` and ``state_dicts`` are what :func:`load_bundle` returned.
    """
    components = document["components"]
    if name not in components:
        raise CheckpointError(f"the bundle has no component {name!r}; it has {sorted(components)}")
    comp = components[name]
    module = _factory(comp["kind"], architectures)(comp["config"])
    module.load_state_dict(state_dicts[name], strict=True)
    return module



def read_pth_weights_only(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a PyTorch ``.pth`` file via ``torch.load(weights_only=True)`` (no code runs).

    Accepts a plain state dict or one nested under ``"state_dict"``/``"model"``; anything that is
    not a flat mapping of names to tensors is rejected.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors of many kinds; all mean "not loadable safely"
        raise CheckpointError(
            f"{path} cannot be read as a weights-only PyTorch checkpoint: {exc}"
        ) from exc
    if isinstance(data, dict):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()
    ):
        raise CheckpointError(f"{path} does not hold a flat state dict of named tensors")
    return data


def pth_to_safetensors(src: str | Path, dst: str | Path) -> Path:
    """Convert an official ``.pth`` state dict to a ``.safetensors`` file (atomic write)."""
    tensors = {k: v.contiguous().clone() for k, v in read_pth_weights_only(src).items()}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dst) as tmp:
        save_file(tensors, str(tmp))
    return dst
