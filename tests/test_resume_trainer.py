"""Exact resume after SIGKILL; half-written checkpoints are never loaded; bad resumes refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_trainer_loop import build_toy_task, make_toy_data, toy_config, train_losses, write_toml

from trainer import checkpointing, loop
from trainer.config import config_from_dict
from trainer.distributed import DistContext
from trainer.events import read_events

pytestmark = pytest.mark.usefixtures("torch_one_thread")
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "test_trainer_loop.py"
CPU = DistContext(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def toy_data(openkbp_dir, tmp_path_factory) -> Path:
    return make_toy_data(openkbp_dir, tmp_path_factory.mktemp("toy"))


def _cmd(data, out, cfg, *extra):
    return [sys.executable, str(SCRIPT), "--data", str(data), "--out", str(out),
            "--config", str(cfg), *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def test_sigkill_mid_training_then_resume_repeats_the_losses(toy_data, tmp_path):
    raw = toy_config(run={"max_steps": 12, "checkpoint_every": 4, "eval_every": 100})
    cfg = write_toml(raw, tmp_path / "toy.toml")
    loop.run(build_toy_task(toy_data, 3), config_from_dict(raw), tmp_path / "full", CPU,
             progress=False)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(toy_data, run, cfg, "--step-delay", "0.25"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        events = read_events(run)
        ckpts = [e["step"] for e in events if e["type"] == "checkpoint"]
        steps = [e["step"] for e in events if e["type"] == "train"]
        if ckpts and steps and steps[-1] >= ckpts[-1] + 2:  # between two checkpoints
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = steps[-1]
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_at is not None, "the run ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not any(e["type"] == "end" for e in read_events(run))
    resumed_from = checkpointing.find_latest(run).step
    assert 4 <= resumed_from < killed_at < 12

    out = subprocess.run(_cmd(toy_data, run, cfg, "--resume"), env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    starts = [e for e in read_events(run) if e["type"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == resumed_from
    full, resumed = train_losses(tmp_path / "full"), train_losses(run)  # later lines win
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9), step
    assert read_events(run)[-1]["type"] == "end"


def _two_checkpoints(toy_data, run_dir):
    raw = toy_config(run={"max_steps": 6, "checkpoint_every": 3})
    loop.run(build_toy_task(toy_data, 3), config_from_dict(raw), run_dir, CPU, progress=False)
    return checkpointing.checkpoint_dir(run_dir)


def test_half_written_or_corrupted_checkpoints_are_never_loaded(toy_data, tmp_path, caplog):
    folder = _two_checkpoints(toy_data, tmp_path / "run")
    assert checkpointing.find_latest(tmp_path / "run").step == 6
    newest = folder / "step_00000006.safetensors"
    data = newest.read_bytes()
    (folder / "step_00000009.safetensors.tmp-123").write_bytes(data[:100])  # crash mid-write
    newest.write_bytes(data[: len(data) // 2])                              # truncated copy
    found = checkpointing.find_latest(tmp_path / "run")
    assert found.step == 3
    assert "half written" in caplog.text
    newest.write_bytes(data[:-4] + bytes(b ^ 0xFF for b in data[-4:]))       # same size, bad bytes
    assert checkpointing.find_latest(tmp_path / "run").step == 3
    assert "SHA-256" in caplog.text
    (folder / "step_00000003.json").write_text("{\"format\": ")            # torn manifest
    assert checkpointing.find_latest(tmp_path / "run") is None


def test_resume_uses_the_newest_complete_checkpoint(toy_data, tmp_path):
    folder = _two_checkpoints(toy_data, tmp_path / "run")
    (folder / "step_00000006.safetensors").unlink()
    raw = toy_config(run={"max_steps": 6, "checkpoint_every": 3})
    loop.run(build_toy_task(toy_data, 3), config_from_dict(raw), tmp_path / "run", CPU,
             resume=True, progress=False)
    starts = [e for e in read_events(tmp_path / "run") if e["type"] == "start"]
    assert starts[-1]["step"] == 3


def test_incompatible_checkpoint_is_refused_before_any_compute(toy_data, tmp_path):
    _two_checkpoints(toy_data, tmp_path / "run")
    n_events = len(read_events(tmp_path / "run"))
    task = build_toy_task(toy_data, 3)
    task.model.net[0] = torch.nn.Conv3d(2, 4, 3, padding=1)
    task.model.net[2] = torch.nn.Conv3d(4, 1, 3, padding=1)
    task.params = list(task.model.parameters())
    raw = toy_config(run={"max_steps": 9})
    with pytest.raises(checkpointing.CheckpointError, match="architecture"):
        loop.run(task, config_from_dict(raw), tmp_path / "run", CPU, resume=True,
                 progress=False)
    other = toy_config(run={"max_steps": 9}, data={"batch_size": 2})
    with pytest.raises(checkpointing.CheckpointError, match="global batch"):
        loop.run(build_toy_task(toy_data, 3), config_from_dict(other), tmp_path / "run", CPU,
                 resume=True, progress=False)
    events = read_events(tmp_path / "run")
    assert not any(e["type"] == "train" for e in events[n_events:])
    assert events[-1]["type"] == "error" and "cannot resume" in events[-1]["message"]


def test_checkpoint_holds_optimizer_rng_and_data_order(toy_data, tmp_path):
    _two_checkpoints(toy_data, tmp_path / "run")
    found = checkpointing.find_latest(tmp_path / "run")
    m = found.manifest
    assert m["data_order"] == {"epoch": 4, "position": 0, "samples_seen": 24}
    assert m["stage"] == "toy" and m["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    tensors = found.load_tensors()
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in tensors)
    assert "rng.torch.rank0" in tensors and "rng.numpy" in tensors
    assert json.loads((found.tensors_path.with_suffix(".json")).read_text())["step"] == 6


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_continues(openkbp_dir,
                                                                            tmp_path):
    """`dosepilot train` on SIGTERM (the GUI's Cancel): checkpoint at the step it stopped at,
    an `end` event with status "stopped", exit status 128 + 15; --resume carries on from there."""
    data = tmp_path / "data"
    for split, count in (("train", 2), ("validation", 1)):
        (data / split).mkdir(parents=True)
        for src in sorted((openkbp_dir / split).glob("pt_*.npz"))[:count]:
            (data / split / src.name).symlink_to(src)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine.cli", "train", "vae", "--config", "test-tiny",
           "--data", str(data), "--out", str(run), "--set", "run.checkpoint_every=1000",
           "--set", "run.eval_every=1000"]
    proc = subprocess.Popen(cmd + ["--set", "run.max_steps=100000"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if [e for e in read_events(run) if e["type"] == "train"]:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal SIGTERM" in err and "--resume" in err
    events = read_events(run)
    end = events[-1]
    assert end["type"] == "end" and end["status"] == "stopped"
    stopped_at = end["step"]
    assert 1 <= stopped_at < 100000
    assert checkpointing.find_latest(run).step == stopped_at    # nothing trained is lost

    out = subprocess.run(cmd + ["--set", f"run.max_steps={stopped_at + 2}", "--resume"],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    events = read_events(run)
    assert [e["step"] for e in events if e["type"] == "start"] == [0, stopped_at]
    assert events[-1]["type"] == "end" and events[-1]["status"] == "completed"
    assert (run / "vae.safetensors").is_file()
