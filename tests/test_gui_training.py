"""The training panel: the command it launches, following the event log, and real
``dosepilot train`` processes (a tiny run to completion, cancellation, failures)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from engine.cli import build_parser
from planner_gui.training_run import EventTail, TrainRequest, build_train_command

needs_display = pytest.mark.skipif(not os.environ.get("DISPLAY"),
                                   reason="GUI tests need a display: run under xvfb-run")


def has_train_command() -> bool:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return "train" in sub.choices


needs_trainer = pytest.mark.skipif(not has_train_command(),
                                   reason="the `dosepilot train` command is not installed here")


def test_command_is_the_cli_train_command(tmp_path):
    request = TrainRequest("stage-b", tmp_path / "data", tmp_path / "run", preset="tiny",
                           overrides={"run.max_steps": 3, "optim.lr": 0.001})
    argv = build_train_command(request)
    assert argv[:5] == [sys.executable, "-m", "engine.cli", "train", "stage-b"]
    assert argv[argv.index("--config") + 1] == "tiny"
    assert argv[argv.index("--run-dir") + 1] == str(tmp_path / "run")
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == ["run.max_steps=3", "optim.lr=0.001"]


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
    request = TrainRequest("no-such-stage", tmp_path, tmp_path / "run")
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
