"""The shared training loop on a small real module and real OpenKBP tensors.

This file is also the script that ``torchrun`` launches in the DDP and resume tests:
``python tests/test_trainer_loop.py --data D --out RUN --config PRESET [--resume]`` trains a
small 3-D conv net that predicts (coarse) dose from (coarse) CT and PTV of OpenKBP patients.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a script by torchrun
    sys.path.insert(0, str(REPO))

from trainer import loop  # noqa: E402
from trainer.config import config_from_dict  # noqa: E402
from trainer.distributed import setup, teardown  # noqa: E402
from trainer.events import read_events  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
COARSE = 8  # 128^3 OpenKBP grid -> 16^3


def make_toy_data(openkbp_dir: Path, out: Path, n_cases: int = 8) -> Path:
    """Coarse (16^3) CT, PTV70 and dose tensors of the first ``n_cases`` training patients."""
    files = sorted((openkbp_dir / "train").glob("pt_*.npz"), key=lambda p: int(p.stem[3:]))
    cts, ptvs, doses = [], [], []
    for f in files[:n_cases]:
        z = np.load(f)
        names = list(z["roi_names"])
        ptv = (z["roi_bits"] >> names.index("PTV70")) & 1
        for arr, dst, scale in ((z["ct"], cts, 1000.0), (ptv, ptvs, 1.0),
                                (z["dose_cgy"], doses, 7000.0)):
            a = arr.astype(np.float32).reshape(16, COARSE, 16, COARSE, 16, COARSE)
            dst.append(torch.from_numpy(a.mean(axis=(1, 3, 5)) / scale))
    path = out / "toy.safetensors"
    save_file({"ct": torch.stack(cts), "ptv": torch.stack(ptvs), "dose": torch.stack(doses)},
              str(path))
    return path


class ToyDoseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.GELU(),
                                 nn.Conv3d(8, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_toy_task(data_file: Path, seed: int = 0) -> loop.Task:
    data = load_file(str(data_file))
    n = data["ct"].shape[0]
    items = [{"ct": data["ct"][i], "ptv": data["ptv"][i], "dose": data["dose"][i]}
             for i in range(n)]
    torch.manual_seed(seed)
    model = ToyDoseNet()

    def batch_inputs(items, gens):
        xs = []
        for it, g in zip(items, gens):
            noisy_ct = it["ct"] + 0.05 * torch.randn(it["ct"].shape, generator=g)
            xs.append(torch.stack([noisy_ct, it["ptv"]]))
        return torch.stack(xs), torch.stack([it["dose"] for it in items])[:, None]

    def loss(m, items, gens):
        x, y = batch_inputs(items, gens)
        pred = m(x)
        return ((pred - y) ** 2).mean(), {"mae": (pred - y).abs().mean().item()}

    def evaluate(m, items):
        x = torch.stack([torch.stack([it["ct"], it["ptv"]]) for it in items])
        y = torch.stack([it["dose"] for it in items])[:, None]
        return {"val_loss": ((m(x) - y) ** 2).mean().item()}

    return loop.Task(stage="toy", model=model, params=list(model.parameters()),
                     train_items=items[:6], val_items=items[6:], loss=loss, evaluate=evaluate,
                     data_signature=loop.data_signature([str(i) for i in range(6)]))


def toy_config(**overrides) -> dict:
    raw = {"run": {"seed": 3, "max_steps": 6, "log_every": 1, "eval_every": 3,
                   "checkpoint_every": 3},
           "optim": {"lr": 3e-3, "warmup_steps": 2, "grad_clip": 1.0},
           "data": {"batch_size": 4}}
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return raw


def write_toml(raw: dict, path: Path) -> Path:
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir) if e["type"] == "train"}


@pytest.fixture(scope="module")
def toy_data(openkbp_dir, tmp_path_factory) -> Path:
    return make_toy_data(openkbp_dir, tmp_path_factory.mktemp("toy"))


def _run_inprocess(data, run_dir, resume=False, **overrides):
    from trainer.distributed import DistContext
    cfg = config_from_dict(toy_config(**overrides))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    return loop.run(build_toy_task(data, cfg.run.seed), cfg, run_dir, ctx, resume=resume,
                    progress=False)


def test_loop_learns_and_logs_events(toy_data, tmp_path):
    _run_inprocess(toy_data, tmp_path / "run", run={"max_steps": 30, "eval_every": 10,
                                                    "checkpoint_every": 15})
    events = read_events(tmp_path / "run")
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "end"
    assert {"train", "eval", "checkpoint"} <= set(types)
    for e in events:
        assert {"type", "step", "time"} <= set(e)
    train = [e for e in events if e["type"] == "train"]
    assert [e["step"] for e in train] == list(range(1, 31))
    assert all({"loss", "lr", "samples_per_s", "grad_norm", "total_steps", "mae"} <= set(e)
               for e in train)
    # linear warm-up over 2 steps, then constant
    assert [e["lr"] for e in train[:3]] == pytest.approx([1.5e-3, 3e-3, 3e-3])
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert np.mean([e["loss"] for e in train[-5:]]) < np.mean([e["loss"] for e in train[:5]])
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run/tb").iterdir())


def test_resume_in_process_repeats_the_uninterrupted_run(toy_data, tmp_path):
    _run_inprocess(toy_data, tmp_path / "full")
    _run_inprocess(toy_data, tmp_path / "part", run={"max_steps": 3})
    _run_inprocess(toy_data, tmp_path / "part", resume=True)
    full, part = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert sorted(part) == list(range(1, 7))
    for step in range(1, 7):
        assert part[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9)


def test_the_lr_warms_up_holds_and_decays_to_zero_over_the_last_decay_steps():
    cfg = config_from_dict(toy_config(run={"max_steps": 10},
                                      optim={"lr": 1.0, "warmup_steps": 2, "decay_steps": 4}))
    assert [loop.lr_at(s, cfg) for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])
    plain = config_from_dict(toy_config(run={"max_steps": 10}, optim={"lr": 1.0}))
    assert loop.lr_at(9, plain) == 1.0


def test_a_finished_run_resumed_with_more_steps_decays_from_its_checkpoint(toy_data, tmp_path):
    """Warm-up, stable, decay: the decay phase continues a constant-lr run, as a run trained
    with the decay from the start would have run it after the same checkpoint."""
    run = tmp_path / "run"
    _run_inprocess(toy_data, run, run={"max_steps": 6})
    _run_inprocess(toy_data, run, resume=True, run={"max_steps": 12},
                   optim={"decay_steps": 6})
    lrs = {e["step"]: e["lr"] for e in read_events(run) if e["type"] == "train"}
    assert lrs[6] == pytest.approx(3e-3)            # the constant phase
    assert lrs[7] == pytest.approx(3e-3 * 6 / 6) and lrs[12] == pytest.approx(3e-3 / 6)
    whole = tmp_path / "whole"
    _run_inprocess(toy_data, whole, run={"max_steps": 12}, optim={"decay_steps": 6})
    assert train_losses(whole) == pytest.approx(train_losses(run))


def test_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(toy_data, tmp_path):
    from engine.errors import UserError
    _run_inprocess(toy_data, tmp_path / "run", run={"max_steps": 3})
    with pytest.raises(UserError, match="already holds a training run"):
        _run_inprocess(toy_data, tmp_path / "run")
    with pytest.raises(UserError, match="no complete checkpoint"):
        _run_inprocess(toy_data, tmp_path / "empty", resume=True)


def test_divergence_stops_with_an_error_event(toy_data, tmp_path):
    with pytest.raises(FloatingPointError, match="diverged"):
        _run_inprocess(toy_data, tmp_path / "run", optim={"lr": 1e30, "warmup_steps": 0,
                                                          "grad_clip": 0.0},
                       run={"max_steps": 50})
    last = read_events(tmp_path / "run")[-1]
    assert last["type"] == "error" and "diverged" in last["message"]


def test_batches_are_independent_of_world_size():
    n, batch = 6, 4
    idx = [loop.global_batch_indices(1, s, batch, n) for s in range(6)]
    flat = [i for b in idx for i in b]
    # every epoch visits each item exactly once
    for e in range(len(flat) // n):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))
    a = torch.randn(3, generator=loop.sample_generator(1, 5, 2))
    b = torch.randn(3, generator=loop.sample_generator(1, 5, 2))
    c = torch.randn(3, generator=loop.sample_generator(1, 5, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: train the toy task with a preset, as `dosepilot train` would."""
    from trainer.config import load_config
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    ctx = setup("cpu", threads=1)
    try:
        task = build_toy_task(args.data, cfg.run.seed)
        loop.run(task, cfg, args.out, ctx, resume=args.resume, progress=False)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
