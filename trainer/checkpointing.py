"""Training checkpoints: written atomically, verified on load, never unpickled.

A checkpoint is two files in ``RUN_DIR/checkpoints/``:

* ``step_XXXXXXXX.safetensors``: every tensor (model state, optimizer moments, task extras
  such as an old-policy copy, RNG states), keys prefixed ``model.``, ``optim.``, ``extra.``,
  ``rng.``;
* ``step_XXXXXXXX.json``: the manifest: format version, step, stage, the tensor file's size and
  SHA-256, the optimizer's non-tensor state, numpy/python RNG states, the data-order state and a
  signature of the model (parameter names and shapes) to refuse an incompatible resume.

The learning-rate schedule is a pure function of the step (:func:`trainer.loop.lr_at`) and the
data order a pure function of seed and step (:func:`trainer.loop.global_batch_indices`), so the
step is their whole state; the manifest records the data position anyway (epoch, position).

Both files are written to a temporary name, fsync'ed and renamed (``os.replace`` is atomic on
POSIX; :func:`engine.durable.replacing`), tensors first, manifest last, then the folder is
fsync'ed. A checkpoint counts only when its manifest parses and the tensor file matches the
recorded size and hash: a file left half written by a crash, a disk filling up or a copy in
progress is skipped (with a warning) and the newest complete checkpoint is used instead. A full
disk stops the run with :class:`engine.durable.NoSpaceError` naming the file; the checkpoints
written before stay complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.durable import NoSpaceError, file_sha256, is_temporary, replacing, write_text
from engine.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "dosepilot-train-checkpoint/1"


class CheckpointError(UserError):
    """A checkpoint that cannot be used for this run (missing, incompatible)."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint on disk: its manifest and the path of its tensors."""

    step: int
    manifest: dict
    tensors_path: Path

    def load_tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.tensors_path))


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def model_signature(model: torch.nn.Module) -> str:
    """A digest of the model's state names, shapes and dtypes (not values)."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor],
                    rng_tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int) -> Path:
    """Write the checkpoint for ``step`` atomically; keep the newest ``keep``. Returns its path.

    ``meta`` is JSON-serialisable run information (stage, data order, config, ...);
    ``rng_tensors`` are the per-rank torch RNG states gathered by the caller.
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():  # the temporaries of a killed run
        if is_temporary(stale.name) or ".tmp-" in stale.name:
            stale.unlink(missing_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        tensors[f"model.{name}"] = t
    optim_state, optim_json = _split_optimizer_state(optimizer.state_dict())
    tensors.update({f"optim.{k}": v for k, v in optim_state.items()})
    tensors.update({f"extra.{k}": v for k, v in extra.items()})
    tensors.update({f"rng.{k}": v for k, v in rng_tensors.items()})
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    stem = f"step_{step:08d}"
    data_path = folder / f"{stem}.safetensors"
    hint = ("the newest complete checkpoint is kept: free some space and continue with "
            "--resume")
    try:
        with replacing(data_path, batch=True) as tmp:  # stale temporaries removed above
            save_file(tensors, str(tmp))
        size, digest = data_path.stat().st_size, file_sha256(data_path)
    except NoSpaceError as exc:
        raise NoSpaceError(data_path, exc, hint) from exc

    manifest = {
        "format": FORMAT, "step": step, "tensors": data_path.name, "size": size,
        "sha256": digest, "model_signature": model_signature(model), "optimizer": optim_json,
        "rng": {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                "python": _python_rng_state()},
        **meta,
    }
    try:
        write_text(folder / f"{stem}.json", json.dumps(manifest, indent=1))
    except NoSpaceError as exc:
        raise NoSpaceError(exc.path, exc, hint) from exc
    _prune(folder, keep)
    return data_path


def find_latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete, verified checkpoint of a run, or None. Broken ones are skipped."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return None
    for manifest_path in sorted(folder.glob("step_*.json"), reverse=True):
        problem, ckpt = _verify(manifest_path)
        if ckpt is not None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", manifest_path.name, problem)
    return None


def has_any_checkpoint(run_dir: Path) -> bool:
    """Whether the run has written a checkpoint manifest (tensors without one, left by a run
    killed while writing its first checkpoint, are no checkpoint: the run may start afresh)."""
    folder = checkpoint_dir(run_dir)
    return folder.is_dir() and any(folder.glob("step_*.json"))


def restore_optimizer(optimizer: torch.optim.Optimizer, manifest: dict,
                      tensors: dict[str, torch.Tensor]) -> None:
    """Load the optimizer state saved by :func:`save_checkpoint` (tensors moved to params)."""
    saved = manifest["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for pid, scalars in saved["scalars"].items():
        state[int(pid)] = dict(scalars)
    for key, value in tensors.items():
        if key.startswith("optim."):
            pid, name = key[len("optim."):].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g)
              for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def restore_global_rng(manifest: dict, tensors: dict[str, torch.Tensor], rank: int) -> bool:
    """Restore numpy/python (all ranks) and this rank's torch RNG; False if it was not saved."""
    name, pos, has_gauss, cached = manifest["rng"]["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         cached))
    version, internal, gauss = manifest["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    cpu = tensors.get(f"rng.torch.rank{rank}")
    if cpu is None:
        return False
    torch.set_rng_state(cpu)
    cuda = tensors.get(f"rng.cuda.rank{rank}")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    return True


def _verify(manifest_path: Path) -> tuple[str, Checkpoint | None]:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable manifest ({exc})", None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return "not a DosePilot training checkpoint manifest", None
    data_path = manifest_path.with_name(str(manifest.get("tensors", "")))
    if not data_path.is_file():
        return f"tensor file {data_path.name} is missing", None
    if data_path.stat().st_size != manifest.get("size"):
        return (f"tensor file has {data_path.stat().st_size} bytes, the manifest says "
                f"{manifest.get('size')} (half written?)"), None
    if file_sha256(data_path) != manifest.get("sha256"):
        return "tensor file content does not match its SHA-256 (corrupted)", None
    return "", Checkpoint(step=int(manifest["step"]), manifest=manifest, tensors_path=data_path)


def _split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        scalars[str(pid)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[str(pid)][name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _prune(folder: Path, keep: int) -> None:
    manifests = sorted(folder.glob("step_*.json"))
    for old in manifests[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)        # the manifest first: a checkpoint is never half there
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    # tensors whose manifest a killed run never wrote (or had pruned already), older than the
    # newest checkpoint: nothing refers to them any more
    kept = {m.stem for m in manifests[-keep:]} if keep > 0 else {m.stem for m in manifests}
    newest = manifests[-1].stem if manifests else ""
    for data in folder.glob("step_*.safetensors"):
        if data.stem not in kept and data.stem < newest:
            data.unlink(missing_ok=True)


