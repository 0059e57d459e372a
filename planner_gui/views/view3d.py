"""The 3D view (pyvistaqt): body surface, targets and organs at risk, the isocentre, and beams
drawn as rays from their source towards the isocentre, each with a handle sphere that the
planner drags to turn the gantry (the handle is kept on the beam's circle around the isocentre).

Without a GPU the scene is rendered in software (llvmpipe), and every render blocks the GUI
thread. Two things keep a beam drag in any view responsive: surfaces are decimated to at most
:data:`MAX_SURFACE_TRIANGLES` triangles each (demo patient: 117k -> 40k triangles, one 800 x 600
render 79 -> 57 ms on an idle machine, ``benchmarks/bench_view3d.py``), and beam moves re-render
the scene at most every :data:`BEAM_RENDER_INTERVAL_MS` (the beam meshes follow every move; the
pixels catch up).
"""

from __future__ import annotations

import numpy as np
import pyvista as pv
from PySide6 import QtCore, QtWidgets
from pyvistaqt import QtInteractor

from engine.case import Case, Role
from engine.features.beam_geometry import source_direction_lps
from planner_gui.beam_geometry import gantry_from_axial_direction
from planner_gui.session import Session
from planner_gui.views.display import OrthoGrid, structure_color

MAX_SURFACE_VOXELS_PER_AXIS = 128
MAX_SURFACE_TRIANGLES = 10_000
BEAM_RENDER_INTERVAL_MS = 150
_OPACITY = {Role.EXTERNAL: 0.15, Role.TARGET: 0.7, Role.OAR: 0.55, Role.OTHER: 0.4}


def structure_surface(mask: np.ndarray, grid: OrthoGrid) -> pv.PolyData:
    """Iso-surface (LPS mm) of a boolean mask oriented by ``grid``; large masks are strided and
    the smoothed surface decimated to at most :data:`MAX_SURFACE_TRIANGLES` triangles."""
    stride = max(1, int(np.ceil(max(mask.shape) / MAX_SURFACE_VOXELS_PER_AXIS)))
    m = grid.orient(mask)[::stride, ::stride, ::stride].astype(np.float32)
    m = np.pad(m, 1)  # close surfaces that touch the grid edge
    step = [float(c[1] - c[0]) * stride if len(c) > 1 else 1.0 for c in (grid.x, grid.y, grid.z)]
    origin = (grid.x[0] - step[0], grid.y[0] - step[1], grid.z[0] - step[2])
    image = pv.ImageData(dimensions=m.shape[::-1], spacing=step, origin=origin)
    image.point_data["mask"] = m.reshape(-1)
    surface = image.contour([0.5], scalars="mask")
    if not surface.n_points:
        return surface
    surface = surface.smooth(n_iter=15)
    if surface.n_cells > MAX_SURFACE_TRIANGLES:
        surface = surface.decimate(1.0 - MAX_SURFACE_TRIANGLES / surface.n_cells)
    return surface


class View3D(QtWidgets.QWidget):
    """The 3D scene following a :class:`Session`."""

    def __init__(self, session: Session, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.plotter = QtInteractor(self, off_screen=False, auto_update=False, multi_samples=0)
        self.plotter.set_background("#101418")
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plotter)
        self.structure_actors: dict[str, object] = {}
        self.beam_meshes: list[pv.PolyData] = []
        self.beam_actors: list[object] = []
        self.handles: list[object] = []
        self._ray_length = 300.0
        self._dragging = -1
        self._render_timer = QtCore.QTimer(self, singleShot=True,
                                           interval=BEAM_RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self.plotter.update)
        session.case_changed.connect(self._on_case)
        session.plan_changed.connect(lambda *_: self._update_beams())
        session.selection_changed.connect(lambda _i: self._update_beams())
        session.visibility_changed.connect(self._on_visibility)

    def _on_case(self, case: Case) -> None:
        self.plotter.clear()
        self.plotter.clear_sphere_widgets()
        self.structure_actors.clear()
        self.beam_meshes.clear()
        self.beam_actors.clear()
        self.handles.clear()
        grid = OrthoGrid.from_geometry(case.geometry)
        for i, s in enumerate(case.structures):
            surface = structure_surface(s.mask, grid)
            if surface.n_points == 0:
                continue
            color = np.asarray(structure_color(i, s.color)) / 255.0
            self.structure_actors[s.name] = self.plotter.add_mesh(
                surface, color=color, opacity=_OPACITY[s.role], smooth_shading=True,
                name=f"structure:{s.name}", reset_camera=False, render=False)
        extent = max(np.ptp(grid.x), np.ptp(grid.y))
        self._ray_length = 0.75 * extent
        iso = np.asarray(self.session.plan.isocenter_mm)
        self.plotter.add_mesh(pv.Sphere(radius=0.02 * extent, center=iso), color="white",
                              name="isocentre", reset_camera=False, render=False)
        self._build_beams()
        self.plotter.camera.focal_point = iso
        self.plotter.camera.position = iso + np.array([0.35, -1.0, 0.45]) * 2.2 * extent
        self.plotter.camera.up = (0.0, 0.0, 1.0)
        self.plotter.update()

    def _source_point(self, index: int) -> np.ndarray:
        plan = self.session.plan
        beam = plan.beams[index]
        d = source_direction_lps(beam.gantry_deg, beam.couch_deg, plan.patient_position)
        return np.asarray(beam.isocenter_mm) + self._ray_length * d

    def _build_beams(self) -> None:
        self.plotter.clear_sphere_widgets()
        for actor in self.beam_actors:
            self.plotter.remove_actor(actor)
        self.beam_meshes, self.beam_actors, self.handles = [], [], []
        plan = self.session.plan
        for i, beam in enumerate(plan.beams):
            mesh = pv.Line(self._source_point(i), beam.isocenter_mm)
            self.beam_meshes.append(mesh)
            self.beam_actors.append(self.plotter.add_mesh(mesh, color="gold", line_width=3,
                                                          name=f"beam:{i}", reset_camera=False,
                                                          render=False))
            widget = self.plotter.add_sphere_widget(
                self._on_handle_moved, center=self._source_point(i),
                radius=0.04 * self._ray_length, color="gold", selected_color="white",
                pass_widget=True, interaction_event="always")
            widget.AddObserver("StartInteractionEvent", lambda *_a, k=i: self._start_drag(k))
            widget.AddObserver("EndInteractionEvent", lambda *_a: self._end_drag())
            self.handles.append(widget)

    def _update_beams(self) -> None:
        plan = self.session.plan
        if plan is None:
            return
        if len(plan.beams) != len(self.beam_meshes):
            self._build_beams()
        for i, beam in enumerate(plan.beams):
            src = self._source_point(i)
            self.beam_meshes[i].points = np.array([src, beam.isocenter_mm], dtype=float)
            color = "white" if i == self.session.selected_beam else "gold"
            self.beam_actors[i].prop.color = color
            if i != self._dragging:
                self.handles[i].SetCenter(*src)
        if not self._render_timer.isActive():
            self._render_timer.start()

    def _start_drag(self, index: int) -> None:
        self._dragging = index
        self.session.select_beam(index)
        self.session.begin_edit()

    def _end_drag(self) -> None:
        index, self._dragging = self._dragging, -1
        if index >= 0:
            self.session.commit_edit()

    def _on_handle_moved(self, center: np.ndarray, widget: object) -> None:
        """A handle moved to ``center`` (LPS mm): turn its beam to the matching gantry angle."""
        if widget not in self.handles or self.session.plan is None:
            return
        index = self.handles.index(widget)
        plan = self.session.plan
        iso = np.asarray(plan.beams[index].isocenter_mm)
        dx, dy = np.asarray(center)[:2] - iso[:2]
        if np.hypot(dx, dy) < 1e-6:
            return
        angle = round(gantry_from_axial_direction(dx, dy, plan.patient_position), 1)
        if abs(angle - plan.beams[index].gantry_deg) > 0.05:
            self.session.set_gantry(index, angle, transient=self._dragging == index)

    def _on_visibility(self, name: str, visible: bool) -> None:
        actor = self.structure_actors.get(name)
        if actor is not None:
            actor.SetVisibility(visible)
            self.plotter.update()

    def close_scene(self) -> None:
        """Release the VTK render window (call before the widget is destroyed)."""
        self._render_timer.stop()
        self.plotter.close()
