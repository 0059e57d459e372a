"""One software render of the 3D view's structure surfaces: undecimated vs decimated.

``xvfb-run -a python -m benchmarks.bench_view3d [--runs 10] [--size 800 600]``

The demo patient's surfaces are built as ``planner_gui.views.view3d.structure_surface`` builds
them, once without the triangle cap (the view before it was decimated) and once with
:data:`~planner_gui.views.view3d.MAX_SURFACE_TRIANGLES`; each set is rendered off screen with
the view's opacities and smooth shading, turning the camera by one degree per render so that no
render is skipped. Prints the triangle counts and the median render time of each, same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from unittest import mock

import numpy as np
import pyvista as pv

from engine.io.dicom import load_dicom_case
from engine.resources import resources_dir
from planner_gui.views import view3d
from planner_gui.views.display import OrthoGrid


def surfaces(case, cap: int) -> list[tuple[object, pv.PolyData]]:
    grid = OrthoGrid.from_geometry(case.geometry)
    with mock.patch.object(view3d, "MAX_SURFACE_TRIANGLES", cap):
        return [(s.role, view3d.structure_surface(s.mask, grid)) for s in case.structures]


def render_s(meshes: list[tuple[object, pv.PolyData]], size: tuple[int, int], runs: int) -> float:
    plotter = pv.Plotter(off_screen=True, window_size=size)
    for role, mesh in meshes:
        if mesh.n_points:
            plotter.add_mesh(mesh, opacity=view3d._OPACITY[role], smooth_shading=True)
    plotter.render()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        plotter.camera.Azimuth(1.0)
        plotter.render_window.Render()
        times.append(time.perf_counter() - t0)
    plotter.close()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 600))
    args = parser.parse_args(argv)
    case = load_dicom_case(resources_dir() / "demo")
    report = {}
    for label, cap in (("undecimated", np.iinfo(np.int64).max),
                       ("decimated", view3d.MAX_SURFACE_TRIANGLES)):
        meshes = surfaces(case, cap)
        report[label] = {"triangles": int(sum(m.n_cells for _, m in meshes)),
                         "render_ms": round(1000 * render_s(meshes, tuple(args.size),
                                                            args.runs), 1)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
