"""Many rapid beam drags in the real main window: the longest event-loop stall, and whether only
the newest result is ever shown.

Each drag is real mouse input on the axial view (press on the beam's handle, moves around the
isocentre, release at a new gantry angle), one event per timer tick of the running event loop,
so the window handles every event as it would a user's. Every move asks for a preview and
every release for a full prediction; the dose controller keeps only the newest request
(``engine.latest_wins``). A 10 ms timer records the gaps between its ticks from the first press
until the final prediction is on screen: the longest gap is the stall (goal <= 150 ms).

A shown result is stale when it was computed for another plan than the one on screen at the
moment it is shown; the script counts those (must be 0) and checks that the final result is a
full prediction of the final plan.

    python -m benchmarks.bench_rapid_drags                 # 200 drags, shipped model, demo patient
    python -m benchmarks.bench_rapid_drags --drags 50 --model PATH --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PySide6 import QtCore, QtTest

LEFT = QtCore.Qt.MouseButton.LeftButton
STALL_GOAL_S = 0.150


def drag_angles(other_beams_deg: Sequence[float], drags: int) -> list[float]:
    """Target gantry angles (degrees) of successive drags: the middles of the gaps between the
    other beams in turn, so that a press on the dragged beam's handle never lands on another
    beam's and consecutive targets differ."""
    others = sorted(a % 360.0 for a in other_beams_deg)
    if len(others) < 2:
        across = (others[0] + 180.0) % 360.0 if others else 180.0
        middles = [(across - 45.0) % 360.0, (across + 45.0) % 360.0]
    else:
        middles = [(a + ((b - a) % 360.0) / 2.0) % 360.0
                   for a, b in zip(others, others[1:] + others[:1])]
    return [round(middles[n % len(middles)], 1) for n in range(drags)]


class DragStorm(QtCore.QObject):
    """Plays drags of beam ``beam`` in an axial :class:`~planner_gui.views.slice_view.SliceView`
    as mouse events, one per tick of a timer (``interval_ms``), on the thread's event loop.

    Each drag: press on the beam's ray, ``moves`` moves along the arc towards the target
    angle, release at the target. All points lie at ``reach`` times the isocentre's distance
    from the nearest edge of the view (the beam handles sit at the edge, at distances that
    vary with the direction); for a head-first-supine patient
    the gantry angle ``a`` is in the direction ``(sin a, -cos a)`` from the isocentre (LPS mm).
    """

    done = QtCore.Signal()

    def __init__(self, view: Any, beam: int, angles: Sequence[float], moves: int = 3,
                 interval_ms: int = 4, reach: float = 0.5) -> None:
        super().__init__()
        self.view = view
        self.beam = beam
        self.angles = list(angles)
        self.moves = moves
        self.reach = reach
        self.events_sent = 0
        self.finished = False
        self._steps = self._script()
        self._timer = QtCore.QTimer(self)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._step)

    def start(self) -> None:
        self._timer.start()

    def _point(self, angle_deg: float) -> QtCore.QPoint:
        iso = np.asarray(self.view.session.plan.isocenter_mm[:2])
        shown = self.view.view_box.viewRect()
        room = min(iso[0] - shown.left(), shown.right() - iso[0], iso[1] - shown.top(),
                   shown.bottom() - iso[1])
        radius = self.reach * room
        a = math.radians(angle_deg)
        point = self.view.view_to_widget(*(iso + radius * np.array([math.sin(a), -math.cos(a)])))
        if not self.view.plot.viewport().rect().contains(point):
            raise ValueError(f"gantry {angle_deg:.1f} deg at {radius:.0f} mm from the isocentre "
                             "lies outside the view: use a smaller reach")
        return point

    def _script(self) -> list[Callable[[], None]]:
        viewport = self.view.plot.viewport()
        steps: list[Callable[[], None]] = []
        for target in self.angles:
            def press() -> None:
                current = self.view.session.plan.beams[self.beam].gantry_deg
                QtTest.QTest.mousePress(viewport, LEFT, pos=self._point(current))

            steps.append(press)
            for k in range(1, self.moves + 1):
                def move(target: float = target, k: int = k) -> None:
                    current = self.view.session.plan.beams[self.beam].gantry_deg
                    turn = (target - current + 180.0) % 360.0 - 180.0
                    QtTest.QTest.mouseMove(viewport,
                                           self._point(current + turn * k / self.moves))

                steps.append(move)
            steps.append(lambda target=target: QtTest.QTest.mouseRelease(
                viewport, LEFT, pos=self._point(target)))
        return steps

    def _step(self) -> None:
        if self.events_sent == len(self._steps):
            self._timer.stop()
            self.finished = True
            self.done.emit()
            return
        self._steps[self.events_sent]()
        self.events_sent += 1


class StallMeter(QtCore.QObject):
    """A timer ticking every ``interval_ms``; the gaps between ticks measure how long the event
    loop was kept from running (seconds)."""

    def __init__(self, interval_ms: int = 10) -> None:
        super().__init__()
        self.ticks: list[float] = []
        self._timer = QtCore.QTimer(self)
        self._timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    @property
    def gaps(self) -> np.ndarray:
        return np.diff(np.asarray(self.ticks))


@dataclass
class ShownResults:
    """Which plan each dose result was computed for, and what the window showed when."""

    computed_for: dict[int, Any] = field(default_factory=dict)  # id(result) -> plan
    shown: list[tuple[Any, Any, Any]] = field(default_factory=list)  # (result, its plan, on screen)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, result: Any, plan: Any) -> Any:
        with self._lock:
            self.computed_for[id(result)] = plan
        return result

    def on_result(self, session: Any) -> Callable[[Any], None]:
        def shown(result: Any) -> None:
            if result is not None:
                with self._lock:
                    plan = self.computed_for.get(id(result))
                self.shown.append((result, plan, session.plan))
        return shown

    @property
    def stale(self) -> int:
        """Results shown while the window was on another plan than theirs."""
        return sum(1 for _, plan, on_screen in self.shown if plan != on_screen)


class RecordingEngine:
    """The window's dose engine, noting the plan of every result it returns."""

    def __init__(self, engine: Any, record: ShownResults) -> None:
        self.engine = engine
        self.record = record

    def preview(self, case: Any, plan: Any, cancel: threading.Event | None = None) -> Any:
        return self.record.record(self.engine.preview(case, plan, cancel), plan)

    def predict(self, case: Any, plan: Any, steps: int = 10, seeds: tuple[int, ...] = (0,),
                progress: Callable[..., None] | None = None,
                cancel: threading.Event | None = None) -> Any:
        return self.record.record(
            self.engine.predict(case, plan, steps=steps, seeds=seeds, progress=progress,
                                cancel=cancel), plan)


async def _storm(window: Any, drags: int, moves: int, interval_ms: int) -> dict:
    controller = window.controller
    while window.session.case is None or controller.predictions_done < 1 or controller.busy:
        await asyncio.sleep(0.05)
    errors: list[str] = []
    controller.failed.connect(errors.append)
    meter = StallMeter()
    others = [b.gantry_deg for b in window.session.plan.beams[1:]]
    storm = DragStorm(window.axial, 0, drag_angles(others, drags), moves=moves,
                      interval_ms=interval_ms)
    previews0, predictions0 = controller.previews_done, controller.predictions_done
    started = controller.runner.started
    meter.start()
    t0 = time.perf_counter()
    storm.start()
    while not storm.finished:
        await asyncio.sleep(0.02)
    t_released = time.perf_counter()
    while controller.busy or window.session.result.kind != "predict":
        await asyncio.sleep(0.02)
    t_end = time.perf_counter()
    meter.stop()
    gaps = meter.gaps
    ends = np.asarray(meter.ticks[1:])
    dragging, final = gaps[ends <= t_released], gaps[ends > t_released]
    return {"drags": drags, "events": storm.events_sent, "seconds_dragging": t_released - t0,
            "seconds_to_final": t_end - t_released, "max_gap_ms": 1000 * float(gaps.max()),
            "max_gap_dragging_ms": 1000 * float(dragging.max()),
            "max_gap_final_ms": 1000 * float(final.max()) if final.size else 0.0,
            "p99_gap_ms": 1000 * float(np.percentile(gaps, 99)),
            "median_gap_ms": 1000 * float(np.median(gaps)), "ticks": len(meter.ticks),
            "jobs_started": controller.runner.started - started,
            "previews_shown": controller.previews_done - previews0,
            "predictions_shown": controller.predictions_done - predictions0, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drags", type=int, default=200)
    parser.add_argument("--moves", type=int, default=3, help="mouse moves per drag")
    parser.add_argument("--interval-ms", type=int, default=4,
                        help="time between successive mouse events")
    parser.add_argument("--model", default=None, help="dose-model bundle (default: shipped)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the "
                        "GUI's choice, all cores but one)")
    parser.add_argument("--steps", type=int, default=10, help="steps of a full prediction")
    args = parser.parse_args()
    if not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        raise SystemExit("needs a display: run under xvfb-run (QT_QPA_PLATFORM=xcb)")
    import qasync
    from PySide6 import QtWidgets

    from engine.runtime import DoseEngine
    from planner_gui.main_window import MainWindow

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    threads = args.threads
    if threads is None:
        from planner_gui.engine_api import inference_threads

        threads = inference_threads()
    record = ShownResults()
    engine = RecordingEngine(DoseEngine.from_checkpoint(args.model, threads=threads), record)
    settings_dir = tempfile.TemporaryDirectory()  # recent patients: not the user's list
    window = MainWindow(engine, settings=QtCore.QSettings(
        os.path.join(settings_dir.name, "bench.ini"), QtCore.QSettings.Format.IniFormat))
    window.controller.steps = args.steps
    window.session.result_changed.connect(record.on_result(window.session))
    window.show()
    window.open_demo()
    with loop:
        out = loop.run_until_complete(_storm(window, args.drags, args.moves, args.interval_ms))
    final, final_plan, on_screen = record.shown[-1]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}, "
          f"{threads} torch thread(s), {args.steps}-step predictions")
    print(f"{out['drags']} drags ({out['events']} mouse events) in {out['seconds_dragging']:.1f} s;"
          f" final prediction {out['seconds_to_final']:.1f} s after the last release")
    print(f"event loop: longest stall {out['max_gap_ms']:.0f} ms (goal <= "
          f"{1000 * STALL_GOAL_S:.0f} ms), 99th percentile {out['p99_gap_ms']:.0f} ms, median "
          f"{out['median_gap_ms']:.1f} ms over {out['ticks']} ticks of a 10 ms timer; longest "
          f"while dragging {out['max_gap_dragging_ms']:.0f} ms, while the final prediction ran "
          f"{out['max_gap_final_ms']:.0f} ms")
    print(f"engine jobs started {out['jobs_started']}, shown: {out['previews_shown']} previews, "
          f"{out['predictions_shown']} predictions; stale results shown {record.stale}; "
          f"final result {final.kind} of the final plan: {final_plan == on_screen}; "
          f"engine errors {len(out['errors'])}")
    window.close()
    settings_dir.cleanup()


if __name__ == "__main__":
    main()
