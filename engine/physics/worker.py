"""Runs INSIDE the isolated physics environment (``.venv-physics``, pyRadPlan): one dose job.

This file is executed as a script by :mod:`engine.physics.dose_calc` with the physics interpreter
(``python -I engine/physics/worker.py JOB_DIR``). It must not import DosePilot (the physics
environment does not have it) and it exchanges plain files only:

* ``JOB_DIR/request.json``: beams, engine settings and, per structure, its kind, overlap priority
  and objectives (written by :func:`engine.physics.dose_calc.write_request`);
* ``JOB_DIR/arrays.npz`` (no pickle): ``ct_hu`` float32 ``[z, y, x]`` in HU and ``masks`` uint8
  ``[n_structures, z, y, x]``, on an axis-aligned grid whose array axes run along +z, +y, +x
  (LPS); the grid's origin (centre of voxel [0, 0, 0], LPS mm) and spacing are in the request;

and it writes ``JOB_DIR/result.npz`` (``dose`` float32 ``[z, y, x]``, Gy per unit fluence scale
chosen by the optimiser, on the CT grid; ``dose_grid``, the same dose on the engine's dose grid
before its linear interpolation onto the CT grid, with ``dose_grid_origin_lps_mm`` (x, y, z of
voxel [0, 0, 0]) and ``dose_grid_spacing_xyz_mm``, axes along +z, +y, +x like the CT) plus
``JOB_DIR/result.json`` (engine version, timings, bixel count, optimiser iterations). On
failure it exits non-zero with the reason on stderr.

The engine is pyRadPlan's photon SVD pencil beam (matRad's ``photons_Generic`` 6 MV machine) with
pyRadPlan's fluence optimisation (SciPy L-BFGS-B). pyRadPlan's gantry geometry is IEC 61217 in
LPS: the source of gantry angle theta (couch 0) sits at ``iso + SAD * (sin theta, -cos theta, 0)``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np


def _load_request(job: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    request = json.loads((job / "request.json").read_text())
    with np.load(job / "arrays.npz", allow_pickle=False) as arrays:
        ct_hu = np.ascontiguousarray(arrays["ct_hu"], dtype=np.float32)
        masks = np.ascontiguousarray(arrays["masks"], dtype=np.uint8)
    return request, ct_hu, masks


def _objective(spec: dict):
    from pyRadPlan.optimization.objectives import (
        MeanDose,
        SquaredDeviation,
        SquaredOverdosing,
        SquaredUnderdosing,
    )

    kinds = {
        "squared_deviation": lambda s: SquaredDeviation(priority=s["priority"], d_ref=s["dose_gy"]),
        "squared_overdosing": lambda s: SquaredOverdosing(priority=s["priority"],
                                                          d_max=s["dose_gy"]),
        "squared_underdosing": lambda s: SquaredUnderdosing(priority=s["priority"],
                                                            d_min=s["dose_gy"]),
        "mean_dose": lambda s: MeanDose(priority=s["priority"], d_ref=s["dose_gy"]),
    }
    return kinds[spec["type"]](spec)


def _without_empty_objectives(ct, cst, dij):
    """The structure set with the objectives removed from structures that keep no voxel once
    the optimiser has applied the overlap priorities and moved to the dose grid (a small OAR
    inside a target, or one thinner than a dose voxel): pyRadPlan's objectives divide by the
    voxel count. Returns (structure set, names of the structures whose objectives went)."""
    on_dose_grid = cst.apply_overlap_priorities().resample_on_new_ct(
        ct.resample_to_grid(dij.dose_grid))
    empty = {v.name for v in on_dose_grid.vois if v.objectives and v.indices_numpy.size == 0}
    if not empty:
        return cst, []
    vois = [v.model_copy(update={"objectives": []}) if v.name in empty else v
            for v in cst.vois]
    return type(cst)(vois=vois, ct_image=cst.ct_image), sorted(empty)


def run(job: Path) -> None:
    t0 = time.perf_counter()
    import SimpleITK as sitk
    from pyRadPlan import (
        CT,
        PhotonPlan,
        calc_dose_influence,
        fluence_optimization,
        generate_stf,
    )
    from pyRadPlan.core._progress import ProgressReporter
    from pyRadPlan.cst import OAR, ExternalVOI, HelperVOI, StructureSet, Target

    ProgressReporter.console_progress = False  # progress bars would flood the caller's stderr
    logging.getLogger("pyRadPlan").setLevel(logging.ERROR)
    t_import = time.perf_counter() - t0

    request, ct_hu, masks = _load_request(job)
    grid = request["grid"]
    image = sitk.GetImageFromArray(ct_hu, isVector=False)
    image.SetSpacing(tuple(float(s) for s in reversed(grid["spacing_zyx_mm"])))  # sitk: x, y, z
    image.SetOrigin(tuple(float(v) for v in grid["origin_lps_mm"]))
    ct = CT(cube_hu=image)

    classes = {"target": Target, "oar": OAR, "helper": HelperVOI, "external": ExternalVOI}
    vois = []
    for index, s in enumerate(request["structures"]):
        vois.append(classes[s["kind"]](
            name=s["name"], mask=masks[index], ct_image=ct,
            overlap_priority=int(s["overlap_priority"]),
            objectives=[_objective(o) for o in s["objectives"]]))
    cst = StructureSet(vois=vois, ct_image=ct)

    beams = request["beams"]
    gantry = np.asarray(beams["gantry_deg"], dtype=np.float64)
    couch = np.asarray(beams["couch_deg"], dtype=np.float64)
    settings = request["settings"]
    pln = PhotonPlan(machine="Generic")
    pln.prop_stf = {
        "gantry_angles": gantry,
        "couch_angles": couch,
        "bixel_width": float(settings["bixel_width_mm"]),
        "iso_center": np.asarray(beams["isocenter_lps_mm"], dtype=np.float64).reshape(1, 3),
    }
    g = float(settings["dose_grid_mm"])
    pln.prop_dose_calc = {"dose_grid": {"resolution": {"x": g, "y": g, "z": g}}}
    pln.prop_opt = {"solver": "scipy", "max_iter": int(settings["max_iter"]), "display": False}

    t = time.perf_counter()
    stf = generate_stf(ct, cst, pln)
    t_stf = time.perf_counter() - t
    t = time.perf_counter()
    dij = calc_dose_influence(ct, cst, stf, pln)
    t_dij = time.perf_counter() - t
    t = time.perf_counter()
    info: dict = {}
    skipped: list[str] = []
    if settings["optimize"]:
        cst, skipped = _without_empty_objectives(ct, cst, dij)
        fluence = fluence_optimization(ct, cst, stf, dij, pln, opt_info=info)
    else:
        fluence = np.ones(dij.total_num_of_bixels)
    t_opt = time.perf_counter() - t
    t = time.perf_counter()
    dose_image = dij.compute_result_ct_grid(fluence)["physical_dose"]
    dose = sitk.GetArrayFromImage(dose_image).astype(np.float32)
    grid_image = dij.compute_result_dose_grid(fluence)["physical_dose"]
    dose_grid = sitk.GetArrayFromImage(grid_image).astype(np.float32)
    t_fwd = time.perf_counter() - t
    if dose.shape != ct_hu.shape:
        raise RuntimeError(f"pyRadPlan returned a dose of shape {dose.shape} for a CT of shape "
                           f"{ct_hu.shape}")

    tmp = job / "result.tmp.npz"
    np.savez(tmp, dose=dose, fluence=np.asarray(fluence, dtype=np.float32), dose_grid=dose_grid,
             dose_grid_origin_lps_mm=np.asarray(grid_image.GetOrigin(), dtype=np.float64),
             dose_grid_spacing_xyz_mm=np.asarray(grid_image.GetSpacing(), dtype=np.float64))
    tmp.replace(job / "result.npz")
    (job / "result.json").write_text(json.dumps({
        "engine": "pyRadPlan",
        "engine_version": version("pyRadPlan"),
        "algorithm": "photon SVD pencil beam (matRad photons_Generic 6 MV)",
        "optimizer": "scipy L-BFGS-B",
        "num_bixels": int(dij.total_num_of_bixels),
        "num_iter": int(info.get("num_iter", -1)),
        "skipped_objectives": skipped,
        "timings_s": {"import": t_import, "stf": t_stf, "dij": t_dij, "optimization": t_opt,
                      "forward": t_fwd, "total": time.perf_counter() - t0},
    }))


def _die_with_parent() -> None:
    """Linux: be killed when the process that started this one dies (a stopped or killed
    ``physics generate`` pool process must not leave engine runs behind). Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import os
    import signal
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    expected = os.environ.get("DOSEPILOT_PHYSICS_PARENT")
    if expected and os.getppid() != int(expected):  # the parent died before prctl took effect
        sys.exit(1)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: worker.py JOB_DIR", file=sys.stderr)
        return 2
    _die_with_parent()
    run(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
