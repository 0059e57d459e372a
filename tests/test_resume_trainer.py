"""Exact resume after SIGKILL of `dosepilot train` (mid-step and mid-checkpoint); half-written
checkpoints are never loaded; bad resumes refused; SIGTERM stops with a checkpoint."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_harness import checkpoint_files, dosepilot, kill_when, subprocess_env
from test_trainer_loop import build_toy_task, make_toy_data, toy_config, train_losses

from engine.cli import main
from engine.durable import is_temporary
from trainer import checkpointing, loop
from trainer.config import config_from_dict
from trainer.distributed import DistContext
from trainer.events import read_events

pytestmark = pytest.mark.usefixtures("torch_one_thread")
CPU = DistContext(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def toy_data(openkbp_dir, tmp_path_factory) -> Path:
    return make_toy_data(openkbp_dir, tmp_path_factory.mktemp("toy"))


def _vae_data(openkbp_dir, root):
    """Two training cases and one validation case of the shared OpenKBP data (symlinks)."""
    for split, count in (("train", 2), ("validation", 1)):
        (root / split).mkdir(parents=True)
        for src in sorted((openkbp_dir / split).glob("pt_*.npz"))[:count]:
            (root / split / src.name).symlink_to(src)
    return root


def _assert_every_checkpoint_file_is_complete(run) -> list[int]:
    steps, problems = checkpoint_files(run)
    assert problems == []
    return steps


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


def test_a_run_killed_while_writing_its_first_checkpoint_can_start_again(toy_data, tmp_path):
    """Only the tensors of step 3 made it to disk (killed before the manifest): neither a dead
    end ("pass --resume", then "no complete checkpoint") nor a refusal to start afresh."""
    folder = checkpointing.checkpoint_dir(tmp_path / "run")
    folder.mkdir(parents=True)
    (folder / "step_00000003.safetensors").write_bytes(b"tensors without a manifest")
    raw = toy_config(run={"max_steps": 3, "checkpoint_every": 3})
    loop.run(build_toy_task(toy_data, 3), config_from_dict(raw), tmp_path / "run", CPU,
             progress=False)
    assert checkpointing.find_latest(tmp_path / "run").step == 3


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
    data = _vae_data(openkbp_dir, tmp_path / "data")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine.cli", "train", "vae", "--config", "test-tiny",
           "--data", str(data), "--out", str(run), "--set", "run.checkpoint_every=1000",
           "--set", "run.eval_every=1000"]
    proc = subprocess.Popen(cmd + ["--set", "run.max_steps=100000"], env=subprocess_env(),
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
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    events = read_events(run)
    assert [e["step"] for e in events if e["type"] == "start"] == [0, stopped_at]
    assert events[-1]["type"] == "end" and events[-1]["status"] == "completed"
    assert (run / "vae.safetensors").is_file()


def test_sigkill_of_dosepilot_train_mid_step_and_mid_checkpoint_then_resume_is_bit_exact(
        openkbp_dir, tmp_path):
    """A real `dosepilot train vae` killed with SIGKILL twice, once in the middle of a step and
    once while it writes a checkpoint (frozen first, to be sure of where), then --resume: every
    checkpoint file on disk is complete after each kill, and the loss of every step equals the
    uninterrupted run's bit for bit."""
    data = _vae_data(openkbp_dir, tmp_path / "data")
    args = ["train", "vae", "--config", "test-tiny", "--data", data, "--set",
            "run.max_steps=8", "--set", "run.checkpoint_every=2", "--set",
            "run.eval_every=1000"]
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "full")]) == 0
    run = tmp_path / "killed"
    folder = checkpointing.checkpoint_dir(run)

    def last_step() -> int:
        return max((e["step"] for e in read_events(run) if e["type"] == "train"), default=0)

    # 1: mid-step, between two checkpoints (step 3 logged, step 4 not finished)
    proc = subprocess.Popen(dosepilot(*args, "--out", run), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(proc, lambda: last_step() == 3 and not any(
        p.name.startswith(("step_00000004", ".step_00000004")) for p in folder.iterdir()))
    assert proc.returncode == -signal.SIGKILL
    assert _assert_every_checkpoint_file_is_complete(run) == [2]

    # 2: while it writes a checkpoint (files of a step it has not reported saving yet)
    proc = subprocess.Popen(dosepilot(*args, "--out", run, "--resume"), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writing = []

    def saving() -> bool:
        saved = max((e["step"] for e in read_events(run) if e["type"] == "checkpoint"),
                    default=0)
        writing[:] = [p.name for p in folder.iterdir() if is_temporary(p.name)
                      or int(re.search(r"step_(\d+)", p.name).group(1)) > saved]
        return bool(writing)

    assert kill_when(proc, saving), "never caught the run writing a checkpoint"
    assert any(is_temporary(n) or n.endswith(".safetensors") for n in writing), writing
    steps = _assert_every_checkpoint_file_is_complete(run)
    assert steps[0] == 2 and all(s % 2 == 0 for s in steps)

    assert main([str(a) for a in args] + ["--out", str(run), "--resume"]) == 0
    full, resumed = train_losses(tmp_path / "full"), train_losses(run)  # later lines win
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(1, 9)] == [full[s] for s in range(1, 9)]  # bit-exact
    starts = [e for e in read_events(run) if e["type"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True, True]
    assert read_events(run)[-1]["type"] == "end"
    # the finished run holds only complete checkpoints: no temporaries, no orphaned tensors
    assert _assert_every_checkpoint_file_is_complete(run) == [4, 6, 8]
    assert sorted(p.name for p in folder.iterdir()) == [
        f"step_{s:08d}.{ext}" for s in (4, 6, 8) for ext in ("json", "safetensors")]


def test_a_line_torn_by_a_kill_does_not_swallow_the_resumed_runs_events(tmp_path):
    """A run killed (or out of disk) in the middle of an event line: the next run's first
    event starts on a line of its own, so the GUI still sees that it resumed."""
    from trainer.events import EventLog

    first = EventLog(tmp_path, tensorboard=False)
    first.emit("train", 3, loss=0.5)
    first.close()
    with open(tmp_path / "events.jsonl", "a", encoding="utf-8") as f:
        f.write('{"type": "train", "step": 4, "lo')            # what the kill left
    resumed = EventLog(tmp_path, tensorboard=False)
    resumed.emit("start", 3, resumed=True)
    resumed.close()
    assert [(e["type"], e["step"]) for e in read_events(tmp_path)] == [("train", 3),
                                                                        ("start", 3)]
