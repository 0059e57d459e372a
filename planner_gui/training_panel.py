"""The settings/training panel: choose a dataset, a stage, a preset and the key
hyper-parameters, launch ``dosepilot train`` as a separate process, follow its loss and progress
from the run's event log, cancel it, and hand the model it exported to the dose engine."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyqtgraph as pg
from PySide6 import QtCore, QtWidgets

from planner_gui.training_run import (
    STAGES,
    EventTail,
    PresetError,
    TrainRequest,
    available_presets,
    build_train_command,
    merged_preset,
    write_run_preset,
)

POLL_MS = 250
# Cancel sends SIGTERM: the trainer finishes its current step, saves a checkpoint and exits
# (trainer.loop); a CPU step can take a minute, so it is killed only after this long.
TERMINATE_GRACE_MS = 180_000


class TrainingPanel(QtWidgets.QWidget):
    """Launches and follows one training run at a time.

    Signals:
        finished(status): "completed", "failed", "cancelled".
        model_ready(path): the run exported a model; the user asked to use it.
    """

    finished = QtCore.Signal(str)
    model_ready = QtCore.Signal(str)

    def __init__(self, runs_root: str | Path = "runs",
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.runs_root = Path(runs_root)
        self.process: QtCore.QProcess | None = None
        self.tail: EventTail | None = None
        self.run_dir: Path | None = None
        self.exported_model = ""
        self.status = ""
        self.events: list[dict] = []
        self._cancelling = False

        self.data_edit = QtWidgets.QLineEdit()
        self.data_edit.setPlaceholderText("dataset folder (e.g. OpenKBP train)")
        browse = QtWidgets.QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.stage_combo = QtWidgets.QComboBox()
        self.stage_combo.addItems(STAGES)
        self.stage_combo.setCurrentText("dose")
        self.preset_combo = QtWidgets.QComboBox()
        self.preset_combo.addItems(available_presets() or [""])
        self.steps_spin = QtWidgets.QSpinBox()
        self.steps_spin.setRange(1, 10_000_000)
        self.steps_spin.setValue(1000)
        self.lr_spin = QtWidgets.QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1.0)
        self.lr_spin.setSingleStep(1e-5)
        self.lr_spin.setValue(1e-4)
        self.batch_spin = QtWidgets.QSpinBox()
        self.batch_spin.setRange(1, 4096)
        self.batch_spin.setValue(8)
        self.warmup_spin = QtWidgets.QSpinBox()
        self.warmup_spin.setRange(0, 1_000_000)
        self.warmup_spin.setValue(500)

        form = QtWidgets.QFormLayout()
        data_row = QtWidgets.QHBoxLayout()
        data_row.addWidget(self.data_edit)
        data_row.addWidget(browse)
        form.addRow("Dataset", data_row)
        form.addRow("Stage", self.stage_combo)
        form.addRow("Preset", self.preset_combo)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Warm-up steps", self.warmup_spin)

        self.start_button = QtWidgets.QPushButton("Start training")
        self.cancel_button = QtWidgets.QPushButton("Cancel")
        self.use_button = QtWidgets.QPushButton("Use trained model")
        self.cancel_button.setEnabled(False)
        self.use_button.setEnabled(False)
        self.start_button.clicked.connect(self._start_clicked)
        self.cancel_button.clicked.connect(self.cancel)
        self.use_button.clicked.connect(lambda: self.model_ready.emit(self.exported_model))
        buttons = QtWidgets.QHBoxLayout()
        for b in (self.start_button, self.cancel_button, self.use_button):
            buttons.addWidget(b)
        self.progress = QtWidgets.QProgressBar()
        self.progress.setFormat("step %v / %m")
        self.status_label = QtWidgets.QLabel("No run")
        self.status_label.setWordWrap(True)
        self.loss_plot = pg.PlotWidget(background="#15191d")
        self.loss_plot.setLabel("bottom", "step")
        self.loss_plot.setLabel("left", "loss")
        self.loss_plot.showGrid(x=True, y=True, alpha=0.25)
        self.loss_curve = self.loss_plot.plot(pen=pg.mkPen((80, 180, 255), width=2),
                                              name="train loss")
        self.log_view = QtWidgets.QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(500)
        self.log_view.setMaximumHeight(110)

        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addWidget(self.loss_plot, 1)
        layout.addWidget(self.log_view)

        self.preset_combo.currentTextChanged.connect(self._load_preset_values)
        self._load_preset_values(self.preset_combo.currentText())

        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)

    # ---- launching ----------------------------------------------------------------------------
    def _fields(self) -> dict[str, QtWidgets.QAbstractSpinBox]:
        return {"run.max_steps": self.steps_spin, "optim.lr": self.lr_spin,
                "data.batch_size": self.batch_spin, "optim.warmup_steps": self.warmup_spin}

    def _load_preset_values(self, preset: str) -> None:
        """Show the chosen preset's values in the hyper-parameter fields."""
        try:
            tables = merged_preset(preset, {})
        except PresetError as exc:
            self._set_status(str(exc))
            return
        for key, spin in self._fields().items():
            section, name = key.split(".")
            value = tables.get(section, {}).get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                spin.setValue(value)

    def _browse(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Training dataset folder")
        if folder:
            self.data_edit.setText(folder)

    def request(self) -> TrainRequest:
        """The run the form describes (a fresh run folder under ``runs_root``)."""
        stage = self.stage_combo.currentText()
        run_dir = self.runs_root / f"{stage}-{dt.datetime.now():%Y%m%d-%H%M%S-%f}"
        return TrainRequest(
            stage=stage, data_dir=Path(self.data_edit.text().strip()), run_dir=run_dir,
            preset=self.preset_combo.currentText(),
            overrides={key: spin.value() for key, spin in self._fields().items()})

    def _start_clicked(self) -> None:
        if not self.data_edit.text().strip() or not Path(self.data_edit.text()).is_dir():
            self._set_status(f"Choose an existing dataset folder (got "
                             f"'{self.data_edit.text()}').")
            return
        self.start(self.request())

    def start(self, request: TrainRequest, extra_args: tuple[str, ...] = ()) -> None:
        """Launch ``dosepilot train`` for ``request`` (``extra_args`` appended to its argv,
        e.g. ``("--resume",)``)."""
        if self.running:
            raise RuntimeError("a training run is already running")
        try:
            config = write_run_preset(request)
        except PresetError as exc:
            self._set_status(str(exc))
            return
        argv = build_train_command(request, config) + list(extra_args)
        self.run_dir = request.run_dir
        self.tail = EventTail(request.run_dir)
        self.events = []
        self.exported_model = ""
        self.status = "running"
        self._cancelling = False
        self.loss_curve.setData([], [])
        self.log_view.clear()
        self.log_view.appendPlainText(" ".join(argv))
        self.process = QtCore.QProcess(self)
        self.process.setProcessChannelMode(QtCore.QProcess.ProcessChannelMode.MergedChannels)
        self.process.readyReadStandardOutput.connect(self._read_output)
        self.process.finished.connect(self._on_finished)
        self.process.errorOccurred.connect(self._on_error)
        self.process.start(argv[0], argv[1:])
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.use_button.setEnabled(False)
        self.progress.setRange(0, max(request.overrides.get("run.max_steps", 0), 0) or 0)
        self.progress.setValue(0)
        self._set_status(f"Running {request.stage} in {request.run_dir}")
        self.timer.start()

    @property
    def running(self) -> bool:
        return (self.process is not None
                and self.process.state() != QtCore.QProcess.ProcessState.NotRunning)

    def cancel(self) -> None:
        """Stop the run: the trainer saves a checkpoint after its current step and exits; it is
        killed if it has not exited after a grace period."""
        if not self.running:
            return
        self._cancelling = True
        self._set_status("Stopping after the current step and saving a checkpoint …")
        self.process.terminate()
        # the process object is the timer's context: no kill once it is gone
        QtCore.QTimer.singleShot(TERMINATE_GRACE_MS, self.process, self.process.kill)

    # ---- following ----------------------------------------------------------------------------
    def poll(self) -> None:
        """Read new events from the run's log and update the curve and progress."""
        if self.tail is None:
            return
        new = self.tail.read_new()
        if not new:
            return
        self.events.extend(new)
        steps, losses = [], []
        for event in self.events:
            if event.get("type") == "train" and event.get("loss") is not None:
                steps.append(event["step"])
                losses.append(event["loss"])
        self.loss_curve.setData(steps, losses)
        for event in new:
            kind = event.get("type")
            total = event.get("total_steps")
            if total:
                self.progress.setRange(0, int(total))
            if kind in ("train", "eval", "checkpoint", "end"):
                self.progress.setValue(int(event.get("step", 0)))
            if kind == "train" and event.get("loss") is not None:
                self._set_status(f"step {event['step']}: loss {event['loss']:.4g}, "
                                 f"lr {event.get('lr', 0):.2g}")
            elif kind == "end":
                self.exported_model = event.get("export") or ""
            elif kind == "error":
                self._set_status(f"Training failed: {event.get('message', '')}")

    def _read_output(self) -> None:
        text = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        for line in text.splitlines():
            if line.strip():
                self.log_view.appendPlainText(line)

    def _on_error(self, error: QtCore.QProcess.ProcessError) -> None:
        if error == QtCore.QProcess.ProcessError.FailedToStart:
            self._finish("failed", f"Could not start the training process: "
                                   f"{self.process.errorString()}")

    def _on_finished(self, exit_code: int, exit_status: QtCore.QProcess.ExitStatus) -> None:
        self._read_output()
        self.poll()
        if self._cancelling:
            stopped = [e for e in self.events
                       if e.get("type") == "end" and e.get("status") == "stopped"]
            self._finish("cancelled", f"Training stopped at step {stopped[-1]['step']}; its "
                         "checkpoint is saved in the run folder (dosepilot train --resume "
                         "continues it)." if stopped else "Training cancelled.")
        elif exit_code == 0 and exit_status == QtCore.QProcess.ExitStatus.NormalExit:
            done = any(e.get("type") == "end" for e in self.events)
            where = f" Model: {self.exported_model}" if self.exported_model else ""
            self._finish("completed" if done else "failed",
                         ("Training completed." + where) if done else
                         "The training process exited without finishing its run.")
        else:
            last = self.log_view.toPlainText().strip().splitlines()[-1:] or [""]
            self._finish("failed", f"Training failed (exit code {exit_code}): {last[0]}")

    def _finish(self, status: str, message: str) -> None:
        if self.status != "running":
            return
        self.timer.stop()
        self.status = status
        self._set_status(message)
        self.start_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        # a dose-model bundle is a folder (a VAE or codec stage exports a single file)
        self.use_button.setEnabled(status == "completed" and bool(self.exported_model)
                                   and Path(self.exported_model).is_dir())
        self.finished.emit(status)

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def shutdown(self) -> None:
        """Stop a running process (window closing)."""
        if self.running:
            self._cancelling = True
            self.process.kill()
            self.process.waitForFinished(2000)
