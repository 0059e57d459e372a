"""A real `torchrun --nproc_per_node 2` run on CPU (gloo) matches one process, same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_trainer_loop import make_toy_data, toy_config, train_losses, write_toml

from trainer import checkpointing
from trainer.events import read_events

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "test_trainer_loop.py"


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def test_torchrun_two_processes_match_one(openkbp_dir, tmp_path):
    data = make_toy_data(openkbp_dir, tmp_path)
    cfg = write_toml(toy_config(run={"max_steps": 4, "checkpoint_every": 4, "eval_every": 2}),
                     tmp_path / "toy.toml")
    common = ["--data", str(data), "--config", str(cfg)]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), "--out", str(tmp_path / "ddp"), *common],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "one"), *common],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    start = next(e for e in read_events(tmp_path / "ddp") if e["type"] == "start")
    assert start["world_size"] == 2
    l_ddp, l_one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one")
    assert sorted(l_ddp) == sorted(l_one) == [1, 2, 3, 4]
    for step in l_one:
        assert l_ddp[step] == pytest.approx(l_one[step], rel=1e-5)
    assert l_one[4] != pytest.approx(l_one[1], rel=1e-3)  # it did train
    ev_ddp = [e["val_loss"] for e in read_events(tmp_path / "ddp") if e["type"] == "eval"]
    ev_one = [e["val_loss"] for e in read_events(tmp_path / "one") if e["type"] == "eval"]
    assert ev_ddp == pytest.approx(ev_one, rel=1e-5)
    w_ddp = load_file(str(checkpointing.find_latest(tmp_path / "ddp").tensors_path))
    w_one = load_file(str(checkpointing.find_latest(tmp_path / "one").tensors_path))
    for key in (k for k in w_one if k.startswith("model.")):
        assert (w_ddp[key] - w_one[key]).abs().max() < 1e-5, key
