"""The DosePilot main window: tri-planar CT views and the 3D scene in the centre; beams,
structures, DVH, metrics and training in docks; patient loading, dose display and export in
the tool bar. The window only wires views to the :class:`Session`, the :class:`DoseDisplay`
(which dose the views show) and the dose controller."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6 import QtCore, QtGui, QtWidgets

from engine.case import Case
from planner_gui import gui_gc, loading
from planner_gui.beams_panel import BeamsPanel
from planner_gui.compare_window import CompareWindow
from planner_gui.dose_display import OVERLAY_MODES, REFERENCE, DoseDisplay
from planner_gui.dvh_panel import DvhPanel
from planner_gui.engine_api import NO_ENGINE, DoseEngineLike, load_dose_engine, model_label
from planner_gui.export import export_plan_and_dose
from planner_gui.inference import DoseController
from planner_gui.metrics_panel import MetricsPanel
from planner_gui.pacs_actions import install_pacs_actions
from planner_gui.plans_bar import PlansBar
from planner_gui.progress_bar import StepProgressBar
from planner_gui.session import Session
from planner_gui.structures_panel import StructuresPanel
from planner_gui.suggest_dialog import SuggestDialog
from planner_gui.training_panel import TrainingPanel
from planner_gui.views.display import WINDOW_PRESETS
from planner_gui.views.slice_view import SliceView
from planner_gui.views.view3d import View3D

log = logging.getLogger(__name__)
MAX_RECENT = 8
DRAG_HINT = "Drag a beam's handle to see the AI dose follow it; release for the full prediction"
HINT_DONE_KEY = "hints/beam_dragged"


def _freeze_long_lived_objects() -> None:
    """Move everything alive now (modules, the model, the views) out of the cyclic collector's
    sight: its full collections then stay short instead of stalling the UI for up to a second
    while inference allocates. (No collect() first: that alone takes about a second.)"""
    gc.freeze()


class MainWindow(QtWidgets.QMainWindow):
    """The planner's window. ``engine`` may be None (the window says no engine is available)
    and can be set later with :meth:`set_engine`."""

    case_loaded = QtCore.Signal(object)
    exported = QtCore.Signal(object)
    physics_ready = QtCore.Signal(object)
    error_shown = QtCore.Signal(str)
    warning_shown = QtCore.Signal(str)

    def __init__(self, engine: DoseEngineLike | None = None, engine_message: str = "",
                 settings: QtCore.QSettings | None = None) -> None:
        super().__init__()
        gui_gc.hold()  # released in closeEvent
        self._shut_down = False
        self.setWindowTitle("DosePilot")
        self.setAcceptDrops(True)
        self.resize(1500, 950)
        self.settings = settings or QtCore.QSettings("DosePilot", "DosePilot")
        self.session = Session()
        self.display = DoseDisplay(self.session)
        self.display.set_engine(engine is not None, model_label(engine))
        self.controller = DoseController(self.session, engine)
        self.last_error = ""
        self.last_warning = ""
        self._physics_task: asyncio.Future | None = None
        self._physics_cancel: threading.Event | None = None
        self._load_task: asyncio.Future | None = None
        self.compare_window: CompareWindow | None = None
        self.suggest_dialog: SuggestDialog | None = None

        self.axial = SliceView(self.session, "axial", self.display)
        self.coronal = SliceView(self.session, "coronal", self.display)
        self.sagittal = SliceView(self.session, "sagittal", self.display)
        self.slice_views = (self.axial, self.coronal, self.sagittal)
        self.view3d = View3D(self.session)
        central = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        left = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        right = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        left.addWidget(self.axial)
        left.addWidget(self.coronal)
        right.addWidget(self.view3d)
        right.addWidget(self.sagittal)
        central.addWidget(left)
        central.addWidget(right)
        self.setCentralWidget(central)

        self.beams_panel = BeamsPanel(self.session)
        self.plans_bar = PlansBar(self.session)
        plan_box = QtWidgets.QWidget()
        plan_layout = QtWidgets.QVBoxLayout(plan_box)
        plan_layout.setContentsMargins(0, 0, 0, 0)
        plan_layout.addWidget(self.plans_bar)
        plan_layout.addWidget(self.beams_panel)
        self.structures_panel = StructuresPanel(self.session)
        self.dvh_panel = DvhPanel(self.session)
        self.metrics_panel = MetricsPanel(self.session)
        self._dock("Plan and beams", plan_box, QtCore.Qt.DockWidgetArea.RightDockWidgetArea)
        self._dock("Structures", self.structures_panel,
                   QtCore.Qt.DockWidgetArea.RightDockWidgetArea)
        self.dvh_dock = self._dock("DVH", self.dvh_panel,
                                   QtCore.Qt.DockWidgetArea.RightDockWidgetArea)
        self._dock("Metrics", self.metrics_panel, QtCore.Qt.DockWidgetArea.RightDockWidgetArea)
        data_root = QtCore.QStandardPaths.writableLocation(
            QtCore.QStandardPaths.StandardLocation.AppDataLocation)
        self.training_panel = TrainingPanel(Path(data_root or ".") / "runs")
        self.training_dock = self._dock("Training", self.training_panel,
                                        QtCore.Qt.DockWidgetArea.RightDockWidgetArea)
        self.tabifyDockWidget(self.dvh_dock, self.training_dock)
        self.dvh_dock.raise_()
        self.training_panel.model_ready.connect(self.use_checkpoint)

        self._build_actions()
        self._build_status_bar(engine_message)
        self.beams_panel.message.connect(self.statusBar().showMessage)
        self.plans_bar.message.connect(self.statusBar().showMessage)
        self.controller.busy_changed.connect(self._on_busy)
        self.controller.progress.connect(self._on_progress)
        self.controller.failed.connect(lambda m: self.show_error("Dose calculation", m))
        self.session.history_changed.connect(self._on_history)
        self.session.result_changed.connect(self._on_result)
        self.session.plan_changed.connect(self._on_plan_changed)
        self.display.changed.connect(self._show_overlay_mode)
        self._on_history(False, False)
        self._update_case_actions()

    # ---- construction -------------------------------------------------------------------------
    def _dock(self, title: str, widget: QtWidgets.QWidget,
              area: QtCore.Qt.DockWidgetArea) -> QtWidgets.QDockWidget:
        dock = QtWidgets.QDockWidget(title, self)
        dock.setObjectName(f"dock:{title}")
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    def _action(self, text: str, slot: Callable[[], Any], shortcut: Any = None,
                tip: str = "") -> QtGui.QAction:
        action = QtGui.QAction(text, self)
        if shortcut is not None:
            action.setShortcut(shortcut)
        action.setToolTip(tip or text)
        action.triggered.connect(lambda _checked=False: slot())
        return action

    def _build_actions(self) -> None:
        keys = QtGui.QKeySequence.StandardKey
        self.open_action = self._action("Open DICOM…", self._open_dicom_dialog, keys.Open,
                                        "Open a folder with CT, RTSTRUCT, RTPLAN (and RTDOSE)")
        self.open_dataset_action = self._action("Open dataset case…", self._open_dataset_dialog)
        self.demo_action = self._action("Open demo patient", self.open_demo)
        self.undo_action = self._action("Undo", self.session.undo, keys.Undo)
        self.redo_action = self._action("Redo", self.session.redo, keys.Redo)
        self.export_action = self._action("Export RTPLAN + RTDOSE…", self._export_dialog,
                                          "Ctrl+E", "Write the edited plan and the shown dose "
                                          "as DICOM into a new folder")
        self.predict_action = self._action("Predict", self._predict, "Ctrl+R",
                                           "Run the full prediction for the current plan")
        self.physics_action = self._action(
            "Verify with physics", self.verify_with_physics, "Ctrl+Shift+R",
            "Optimise and compute a physics (pencil-beam) dose for the current beams in the "
            "background and show it as the reference")
        self.recent_menu = QtWidgets.QMenu("Recent patients", self)
        file_menu = self.menuBar().addMenu("&File")
        for action in (self.open_action, self.open_dataset_action, self.demo_action):
            file_menu.addAction(action)
        file_menu.addMenu(self.recent_menu)
        file_menu.addAction(self.export_action)
        file_menu.addAction(self.physics_action)
        self.pacs = install_pacs_actions(self, file_menu)
        file_menu.addSeparator()
        file_menu.addAction(self._action("Quit", self.close, keys.Quit))
        edit_menu = self.menuBar().addMenu("&Edit")
        edit_menu.addAction(self.undo_action)
        edit_menu.addAction(self.redo_action)
        self.compare_action = self._action(
            "Compare plans…", self.open_compare, "Ctrl+K",
            "Two plans (or a plan and the reference dose) side by side: doses, A − B, DVHs "
            "and scorecards, and a PDF/PNG report")
        self.suggest_action = self._action(
            "Suggest beam angles…", self.show_suggest_dialog,
            tip="Search coplanar beam arrangements with the AI preview as the objective and "
                "add the best as new plans")
        self.plan_menu = self.menuBar().addMenu("&Plan")
        self.plan_menu.addAction(self.compare_action)
        self.plan_menu.addAction(self.suggest_action)
        self.view_menu = self.menuBar().addMenu("&View")
        self.reset_view_action = self._action(
            "Reset zoom and pan", self.reset_views, "R",
            "Fit the slice views to the patient's body on the shown slices")
        self.view_menu.addAction(self.reset_view_action)
        self.view_menu.addSeparator()
        for dock in self.findChildren(QtWidgets.QDockWidget):
            self.view_menu.addAction(dock.toggleViewAction())
        self._refresh_recent()

        bar = self.addToolBar("Main")
        bar.setObjectName("toolbar:main")
        for action in (self.open_action, self.undo_action, self.redo_action,
                       self.predict_action, self.physics_action, self.export_action):
            bar.addAction(action)
        bar.addSeparator()
        self.window_combo = QtWidgets.QComboBox()
        self.window_combo.addItems(list(WINDOW_PRESETS))
        self.window_combo.setToolTip("CT window/level preset")
        self.window_combo.currentTextChanged.connect(self._on_window)
        bar.addWidget(QtWidgets.QLabel(" Window "))
        bar.addWidget(self.window_combo)
        self.overlay_combo = QtWidgets.QComboBox()
        self.overlay_combo.addItems(list(OVERLAY_MODES))
        self.overlay_combo.setToolTip(
            "What the colour wash shows. It follows the AI dose until you pick here; "
            "then it stays on your pick")
        self.overlay_combo.currentTextChanged.connect(self._on_overlay)
        bar.addWidget(QtWidgets.QLabel(" Show "))
        bar.addWidget(self.overlay_combo)
        self.opacity_slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(45)
        self.opacity_slider.setFixedWidth(100)
        self.opacity_slider.setToolTip("Dose colour-wash opacity")
        self.opacity_slider.valueChanged.connect(
            lambda v: [view.set_dose_opacity(v / 100.0) for view in self.slice_views])
        bar.addWidget(QtWidgets.QLabel(" Opacity "))
        bar.addWidget(self.opacity_slider)
        self.seeds_spin = QtWidgets.QSpinBox()
        self.seeds_spin.setRange(1, 8)
        self.seeds_spin.setToolTip("Seeds per full prediction (more than one gives an "
                                   "uncertainty map)")
        self.seeds_spin.valueChanged.connect(
            lambda n: setattr(self.controller, "seeds", tuple(range(n))))
        bar.addWidget(QtWidgets.QLabel(" Seeds "))
        bar.addWidget(self.seeds_spin)

    def _build_status_bar(self, engine_message: str) -> None:
        self.progress_bar = StepProgressBar()
        self.progress_bar.setFixedWidth(220)
        self.progress_bar.setVisible(False)
        self.engine_label = QtWidgets.QLabel()
        self.statusBar().addPermanentWidget(self.engine_label)
        self.statusBar().addPermanentWidget(self.progress_bar)
        self._set_engine_label(engine_message)

    def _set_engine_label(self, message: str) -> None:
        model = getattr(self.controller.engine, "model", None)
        warning = getattr(model, "quality_warning", "")
        if self.controller.available and warning:
            self.engine_label.setText("Experimental model: not for planning decisions")
            self.engine_label.setStyleSheet("color: black; background: #eb3; padding: 1px 6px;")
            self.engine_label.setToolTip(warning)
        elif self.controller.available:
            self.engine_label.setText("Dose engine ready")
            self.engine_label.setStyleSheet("color: #3a3;")
            self.engine_label.setToolTip("")
        else:
            text = message or f"{NO_ENGINE}."
            self.engine_label.setText(NO_ENGINE)
            self.engine_label.setStyleSheet("color: white; background: #a33; padding: 1px 6px;")
            self.engine_label.setToolTip(text)
        self.predict_action.setEnabled(self.controller.available and self.session.case is not None)

    # ---- engine -------------------------------------------------------------------------------
    def set_engine(self, engine: DoseEngineLike | None, message: str = "") -> None:
        """Use ``engine`` for previews and predictions (None: say why there is none)."""
        self.controller.set_engine(engine)
        self.display.set_engine(engine is not None, model_label(engine))
        self._set_engine_label(message)
        self._update_hint()
        _freeze_long_lived_objects()
        if engine is not None and self.session.case is not None:
            self.controller.request_prediction()

    def use_checkpoint(self, path: str) -> asyncio.Future:
        """Load the model at ``path`` off the UI thread and make it the dose engine."""
        self.statusBar().showMessage(f"Loading model {path} …")
        future = asyncio.get_event_loop().run_in_executor(None, load_dose_engine, path)

        def loaded(f: asyncio.Future) -> None:
            engine, message = f.result()
            if engine is None:
                self.show_error("Model", message)
                return
            self.set_engine(engine)
            self.statusBar().showMessage(f"Using model {path}")

        future.add_done_callback(loaded)
        return future

    def _predict(self) -> None:
        self.controller.request_prediction()

    def _on_busy(self, kind: str) -> None:
        if kind == "predict":
            steps = self.controller.steps
            self.progress_bar.set_progress(0, steps, f"Predicting 0/{steps}")
        elif kind == "preview":
            self.progress_bar.set_progress(0, 1, "Preview …")
        self.progress_bar.setVisible(bool(kind))

    def _on_progress(self, done: int, total: int) -> None:
        self.progress_bar.set_progress(done, total, f"Predicting {done}/{total}")

    def _on_result(self, result: Any) -> None:
        if result is None:
            return
        seconds = result.timings_s.get("total", sum(result.timings_s.values()))
        self.statusBar().showMessage(f"{result.kind.capitalize()} ready in {seconds:.2f} s")

    # ---- patients -----------------------------------------------------------------------------
    def open_case(self, case: Case, source: str = "") -> None:
        """Show ``case`` (already loaded); remembers ``source`` among the recent patients."""
        self.session.open_case(case)
        self.setWindowTitle(f"DosePilot — {case.name}")
        if source:
            self._remember(source)
        if case.warnings:
            self.statusBar().showMessage(
                f"Opened {case.name} with {len(case.warnings)} warning(s): {case.warnings[0]}")
        if case.study_warnings:
            self.show_warning(f"Incomplete or inconsistent study: {case.name}",
                              "\n\n".join(case.study_warnings))
        self._update_case_actions()
        self._update_hint()
        self.case_loaded.emit(case)
        _freeze_long_lived_objects()

    def open_path(self, path: str | Path) -> asyncio.Future:
        """Load a DICOM folder or a dataset case off the UI thread, then show it."""
        path = Path(path)
        self.statusBar().showMessage(f"Opening {path} …")
        loop = asyncio.get_event_loop()
        future = loop.run_in_executor(None, loading.load_case, path)
        future.add_done_callback(lambda f: self._loaded(f, path))
        self._load_task = future
        return future

    def _loaded(self, future: asyncio.Future, path: Path) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            message = str(exc) if isinstance(exc, loading.CaseLoadError) else (
                f"{type(exc).__name__}: {exc}")
            self.statusBar().showMessage(f"Could not open {path}")
            self.show_error(f"Could not open {path.name}", message)
            return
        self.open_case(future.result(), str(path))

    def open_demo(self) -> asyncio.Future | None:
        try:
            path = loading.demo_path()
        except FileNotFoundError as exc:
            self.show_error("Demo patient", str(exc))
            return None
        return self.open_path(path)

    def _open_dicom_dialog(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Open a DICOM folder")
        if folder:
            self.open_path(folder)

    def _open_dataset_dialog(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(
            self, "Open a dataset case", "", "OpenKBP case (*.npz ct.csv)")
        if path:
            self.open_path(Path(path).parent if Path(path).name == "ct.csv" else path)

    def _remember(self, source: str) -> None:
        recent = [p for p in self.recent_paths() if p != source]
        self.settings.setValue("recent", [source] + recent[:MAX_RECENT - 1])
        self._refresh_recent()

    def recent_paths(self) -> list[str]:
        value = self.settings.value("recent", [])
        return [value] if isinstance(value, str) else list(value or [])

    def _refresh_recent(self) -> None:
        self.recent_menu.clear()
        for path in self.recent_paths():
            self.recent_menu.addAction(path, lambda p=path: self.open_path(p))
        self.recent_menu.setEnabled(bool(self.recent_paths()))

    def dragEnterEvent(self, event: QtGui.QDragEnterEvent) -> None:  # noqa: N802 - Qt API
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event: QtGui.QDropEvent) -> None:  # noqa: N802 - Qt API
        urls = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if urls:
            event.acceptProposedAction()
            self.open_path(urls[0])

    # ---- small slots --------------------------------------------------------------------------
    def _update_case_actions(self) -> None:
        has_case = self.session.case is not None
        self.predict_action.setEnabled(has_case and self.controller.available)
        self.export_action.setEnabled(has_case)
        self.physics_action.setEnabled(has_case)
        self.compare_action.setEnabled(has_case)
        self.suggest_action.setEnabled(has_case)

    def open_compare(self) -> CompareWindow | None:
        """Show the (non-modal) Compare plans window, made on first use."""
        if self.session.case is None:
            return None
        if self.compare_window is None:
            self.compare_window = CompareWindow(self.session, lambda: self.controller.engine,
                                                lambda: self.controller.steps, self)
            self.compare_window.set_window(*WINDOW_PRESETS[self.window_combo.currentText()])
        self.compare_window.show()
        self.compare_window.raise_()
        return self.compare_window

    # ---- export -------------------------------------------------------------------------------
    def _export_dialog(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(
            self, "Export the plan and dose into (a new sub-folder is created)")
        if folder:
            self.export_to(folder)

    def export_to(self, parent: str | Path) -> asyncio.Future:
        """Write the current plan and predicted dose under ``parent`` off the UI thread."""
        case, plan, result = self.session.case, self.session.plan, self.session.result
        dose = result.dose if result is not None else None
        future = asyncio.get_event_loop().run_in_executor(
            None, export_plan_and_dose, case, plan, dose, parent)
        future.add_done_callback(self._exported)
        self.statusBar().showMessage("Exporting …")
        return future

    def _exported(self, future: asyncio.Future) -> None:
        exc = future.exception()
        if exc is not None:
            self.show_error("Export failed", f"{type(exc).__name__}: {exc}")
            return
        files = future.result()
        what = "RTPLAN and RTDOSE" if files.rtdose is not None else "RTPLAN (no dose yet)"
        self.statusBar().showMessage(f"Exported {what} to {files.folder}")
        self.exported.emit(files)

    # ---- physics verification ---------------------------------------------------------------
    def verify_with_physics(self) -> asyncio.Future | None:
        """Compute the physics dose of the current plan off the UI thread; it becomes the
        reference dose (compare views, dashed DVHs). A new request cancels a running one."""
        from engine.physics.dose_calc import compute_physics_dose

        case, plan = self.session.case, self.session.plan
        if case is None or plan is None:
            return None
        if self._physics_cancel is not None:
            self._physics_cancel.set()
        cancel = threading.Event()
        self._physics_cancel = cancel
        self.statusBar().showMessage("Computing the physics dose (pyRadPlan; about a minute) …")
        future = asyncio.get_event_loop().run_in_executor(
            None, lambda: compute_physics_dose(case, plan, cancel=cancel))
        future.add_done_callback(lambda f: self._physics_done(f, case, cancel))
        self._physics_task = future
        return future

    def _physics_done(self, future: asyncio.Future, case: Case, cancel: threading.Event) -> None:
        from engine.physics.dose_calc import PhysicsCancelled

        if future.cancelled() or cancel.is_set() or self.session.case is not case:
            return  # superseded, or the patient changed meanwhile
        exc = future.exception()
        if isinstance(exc, PhysicsCancelled):
            return
        if exc is not None:
            self.statusBar().showMessage("Physics dose failed")
            self.show_error("Verify with physics", str(exc))
            return
        physics = future.result()
        engine = physics.info.get("engine", "pyRadPlan")
        self.session.set_reference_dose(physics.dose, f"Physics ({engine})")
        self.display.suggest(REFERENCE)
        shown = ("shown" if self.display.mode == REFERENCE
                 else f"pick \"{REFERENCE}\" in Show to see it")
        self.statusBar().showMessage(
            f"Physics dose ready ({engine}), now the reference ({shown}); normalised to "
            f"{physics.primary_target} D95 = prescription")
        self.physics_ready.emit(physics)

    # ---- beam-angle suggestion ----------------------------------------------------------------
    def show_suggest_dialog(self) -> SuggestDialog:
        """Show the non-modal "Suggest beam angles" dialog (one per window, kept between uses)."""
        if self.suggest_dialog is None:
            self.suggest_dialog = SuggestDialog(
                self.session, engine=lambda: self.controller.engine,
                verify=self.verify_with_physics, busy=lambda: bool(self.controller.busy),
                parent=self)
            self.suggest_dialog.plans_added.connect(
                lambda names: self.statusBar().showMessage(
                    f"Suggested plans added: {', '.join(names)} (the model's word: verify with "
                    f"physics)"))
        self.suggest_dialog.show()
        self.suggest_dialog.raise_()
        self.suggest_dialog.activateWindow()
        return self.suggest_dialog

    def _on_history(self, can_undo: bool, can_redo: bool) -> None:
        self.undo_action.setEnabled(can_undo)
        self.redo_action.setEnabled(can_redo)

    def _on_window(self, name: str) -> None:
        for view in self.slice_views:
            view.set_window(*WINDOW_PRESETS[name])
        if self.compare_window is not None:
            self.compare_window.set_window(*WINDOW_PRESETS[name])

    def _on_overlay(self, mode: str) -> None:
        if mode != self.display.mode:  # the planner picked it (the display's own are equal)
            self.display.choose(mode)

    def _show_overlay_mode(self, mode: str) -> None:
        if self.overlay_combo.currentText() != mode:
            self.overlay_combo.setCurrentText(mode)

    def reset_views(self) -> None:
        """Undo zoom and pan: fit each slice view to the body on its shown slice."""
        for view in self.slice_views:
            view.fit_to_body()

    # ---- first-run hint ---------------------------------------------------------------------
    def _update_hint(self) -> None:
        """Show :data:`DRAG_HINT` over the axial view while there is a patient and an engine,
        until the planner has dragged a beam once (remembered in the settings)."""
        show = (self.session.case is not None and self.controller.available
                and not self.settings.value(HINT_DONE_KEY, False, type=bool))
        self.axial.set_hint(DRAG_HINT if show else "")

    def _on_plan_changed(self, _plan: Any, final: bool) -> None:
        if not final and not self.settings.value(HINT_DONE_KEY, False, type=bool):
            self.settings.setValue(HINT_DONE_KEY, True)  # transient plans come from drags
            self._update_hint()

    def show_error(self, title: str, message: str) -> None:
        """A clear, non-blocking error dialog (window-modal)."""
        self.last_error = message
        box = QtWidgets.QMessageBox(QtWidgets.QMessageBox.Icon.Critical, title, message,
                                    QtWidgets.QMessageBox.StandardButton.Ok, self)
        box.setAttribute(QtCore.Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()
        self.error_shown.emit(message)

    def show_warning(self, title: str, message: str) -> None:
        """A non-blocking warning dialog (window-modal): the planner can read it and go on."""
        self.last_warning = message
        box = QtWidgets.QMessageBox(QtWidgets.QMessageBox.Icon.Warning, title, message,
                                    QtWidgets.QMessageBox.StandardButton.Ok, self)
        box.setAttribute(QtCore.Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()
        self.warning_shown.emit(message)

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:  # noqa: N802 - Qt API
        # Qt delivers a close event for every close() call; releasing the engine worker and
        # the VTK render window a second time crashed the interpreter, so shut down once
        if self._shut_down:
            super().closeEvent(event)
            return
        self._shut_down = True
        if self._physics_cancel is not None:
            self._physics_cancel.set()
        if self.compare_window is not None:
            self.compare_window.close()
        if self.suggest_dialog is not None:
            self.suggest_dialog.shutdown()  # cancels a running search; it stops within a preview
            self.suggest_dialog.close()
        self.controller.shutdown()
        self.training_panel.shutdown()
        self.view3d.close_scene()
        gui_gc.release()
        super().closeEvent(event)
