"""The training panel: the command it launches, following the event log, and real
``dosepilot train`` processes (a tiny run to completion, cancellation, failures)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import tomllib

from engine.cli import build_parser
from planner_gui.training_run import (
    STAGES,
    EventTail,
    PresetError,
    TrainRequest,
    build_train_command,
    merged_preset,
    write_run_preset,
)

needs_display = pytest.mark.skipif(not os.environ.get("DISPLAY"),
                                   reason="GUI tests need a display: run under xvfb-run")


def has_train_command() -> bool:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return "train" in sub.choices


needs_trainer = pytest.mark.skipif(not has_train_command(),
                                   reason="the `dosepilot train` command is not installed here")


@pytest.fixture(scope="module")
def tiny_dataset(openkbp_dir, tmp_path_factory):
    """Three training and one validation OpenKBP case (links to the shared data)."""
    root = tmp_path_factory.mktemp("training-data")
    for split, count in (("train", 3), ("validation", 1)):
        (root / split).mkdir()
        for src in sorted((openkbp_dir / split).glob("pt_*.npz"))[:count]:
            (root / split / src.name).symlink_to(src)
    return root


def test_the_panel_offers_every_stage_the_trainer_has():
    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    stage = next(a for a in train._actions if a.dest == "stage")
    assert set(STAGES) == {s for s in stage.choices if not s.startswith("stage-")}


def test_command_is_the_cli_train_command_with_a_derived_preset(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('[run]\nmax_steps = 100\nseed = 3\n[data]\ngrid = [9, 32, 32]\n'
                    '[model]\ndit = "cpu-small"\n')
    request = TrainRequest("dose", tmp_path / "data", tmp_path / "runs" / "r1", preset=str(base),
                           overrides={"run.max_steps": 3, "optim.lr": 0.001})
    config = write_run_preset(request)
    assert config == tmp_path / "runs" / "r1.toml"
    tables = tomllib.loads(config.read_text())
    assert tables["run"] == {"max_steps": 3, "seed": 3}
    assert tables["optim"] == {"lr": 0.001}
    assert tables["data"]["grid"] == [9, 32, 32] and tables["model"]["dit"] == "cpu-small"
    argv = build_train_command(request, config)
    assert argv == [sys.executable, "-m", "engine.cli", "train", "dose", "--config", str(config),
                    "--data", str(tmp_path / "data"), "--out", str(tmp_path / "runs" / "r1")]


def test_bad_presets_are_clear_errors(tmp_path):
    with pytest.raises(PresetError, match="cannot read preset"):
        merged_preset(str(tmp_path / "missing.toml"), {})
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\n")
    with pytest.raises(PresetError, match="not valid TOML"):
        merged_preset(str(broken), {})
    with pytest.raises(PresetError, match="section.key"):
        merged_preset("", {"max_steps": 3})


def test_event_tail_returns_complete_new_lines_only(tmp_path):
    tail = EventTail(tmp_path)
    assert tail.read_new() == []
    path = tmp_path / "events.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"type": "start", "step": 0}) + "\n")
        f.write('{"type": "train", "st')
    assert [e["type"] for e in tail.read_new()] == ["start"]
    with open(path, "a") as f:
        f.write('ep": 1, "loss": 0.5}\nnot json\n')
        f.write(json.dumps({"type": "end", "step": 1}) + "\n")
    events = tail.read_new()
    assert [e["type"] for e in events] == ["train", "end"] and events[0]["loss"] == 0.5
    assert tail.read_new() == []


@pytest.fixture
def panel(qtbot, tmp_path):
    from planner_gui.training_panel import TrainingPanel

    widget = TrainingPanel(runs_root=tmp_path / "runs")
    qtbot.addWidget(widget)
    widget.show()
    yield widget
    widget.shutdown()


@needs_display
def test_a_failing_launch_is_reported_with_the_process_output(panel, qtbot, tmp_path):
    request = TrainRequest("no-such-stage", tmp_path, tmp_path / "runs" / "run")
    with qtbot.waitSignal(panel.finished, timeout=60_000) as blocker:
        panel.start(request)
    assert blocker.args == ["failed"]
    assert "exit code 2" in panel.status_label.text()
    assert not panel.running and panel.start_button.isEnabled()
    assert not panel.use_button.isEnabled()


@needs_display
def test_the_form_refuses_a_missing_dataset_folder(panel, tmp_path):
    panel.data_edit.setText(str(tmp_path / "missing"))
    panel.start_button.click()
    assert not panel.running and "existing dataset folder" in panel.status_label.text()


@needs_display
@needs_trainer
def test_a_tiny_real_training_run_completes_with_its_loss_curve(panel, qtbot, tiny_dataset):
    panel.preset_combo.setCurrentText("test-tiny")
    assert panel.steps_spin.value() == 4, "the preset's values are shown in the form"
    panel.data_edit.setText(str(tiny_dataset))
    panel.stage_combo.setCurrentText("vae")
    with qtbot.waitSignal(panel.finished, timeout=240_000) as blocker:
        panel.start_button.click()
    assert blocker.args == ["completed"], panel.status_label.text()
    steps, losses = panel.loss_curve.getData()
    assert list(steps) == [1, 2, 3, 4] and all(np.isfinite(losses))
    assert panel.progress.value() == panel.progress.maximum() == 4
    assert panel.exported_model.endswith("vae.safetensors")
    assert not panel.use_button.isEnabled(), "a VAE is not a dose model"
    assert "Training completed" in panel.status_label.text()


@needs_display
@needs_trainer
def test_cancelling_a_run_ends_its_process(panel, qtbot, tiny_dataset, tmp_path):
    request = TrainRequest("vae", tiny_dataset, tmp_path / "runs" / "long", preset="test-tiny",
                           overrides={"run.max_steps": 100_000, "run.eval_every": 100_000,
                                      "run.checkpoint_every": 100_000})
    panel.start(request)
    pid = panel.process.processId()
    qtbot.waitUntil(lambda: any(e.get("type") == "train" for e in panel.events), timeout=240_000)
    assert panel.running
    with qtbot.waitSignal(panel.finished, timeout=30_000) as blocker:
        panel.cancel_button.click()
    assert blocker.args == ["cancelled"] and not panel.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the training process is gone
    stopped = [e for e in panel.events if e.get("type") == "end"]
    assert stopped and stopped[-1]["status"] == "stopped"       # it stopped cleanly ...
    step = stopped[-1]["step"]
    assert (request.run_dir / "checkpoints" / f"step_{step:08d}.safetensors").is_file()
    assert f"Training stopped at step {step}" in panel.status_label.text()   # ... and says so
