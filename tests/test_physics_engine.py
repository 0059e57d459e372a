"""The real physics engine (pyRadPlan in its isolated environment): water-phantom beam data,
an optimised arc plan, and the generate/verify commands end to end. Skips, saying how to
install the environment, when ``make physics-env`` has not been run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.case import Beam, Case, Geometry, Plan, Role, Structure, Technique, Volume
from engine.cli import main
from engine.dose_grid import to_case_grid
from engine.io.dicom import load_dicom_case
from engine.io.openkbp import load_openkbp_npz
from engine.io.plan_beams import read_plan_beams
from engine.physics import dataset as pd
from engine.physics.dose_calc import PhysicsSettings, compute_physics_dose
from tests.test_physics_dataset import make_openkbp_case

SPACING = 2.0


@pytest.fixture(scope="module")
def lateral_field(physics_env):
    """One open 6 MV field from gantry 90 (source at the patient's left, +x) on a water slab
    (x in [-90, 90] mm, air outside), field shaped to a 40 x 40 mm target at the isocentre."""
    shape = (21, 41, 111)  # z, y, x
    origin = (-110.0, -40.0, -20.0)
    g = Geometry(shape, origin, (SPACING,) * 3)
    z, y, x = np.meshgrid(*g.axis_coordinates(), indexing="ij")
    ct = np.where(np.abs(x) <= 90.0, 0.0, -1000.0).astype(np.float32)
    target = (np.abs(x) <= 20.0) & (np.abs(y) <= 20.0) & (np.abs(z) <= 20.0)
    case = Case("water", Volume(ct, g), (Structure("PTV", Role.TARGET, target, 2.0),
                                         Structure("Water", Role.EXTERNAL, ct > -500.0)))
    settings = PhysicsSettings(dose_grid_mm=SPACING, optimize=False, target_margin_mm=0.0)
    result = compute_physics_dose(case, Plan((Beam("B", 90.0, (0.0, 0.0, 0.0)),)), settings)
    return case, result, (x[10, 20], y[10, :, 55])


def test_depth_dose_peaks_at_1_to_2_cm_and_falls(lateral_field):
    case, result, (x_axis, _) = lateral_field
    dose = result.dose.array
    central = dose[10, 20, :]  # along x through the isocentre
    depth = 90.0 - x_axis  # from the water surface at x = +90 mm (the beam enters there)
    inside = np.abs(x_axis) <= 90.0  # water
    pdd = central[inside][::-1]  # ordered by increasing depth
    d = depth[inside][::-1]
    assert result.delivery_gantry_deg == (90.0,)
    assert central[np.abs(x_axis) > 92].max() == 0.0  # air outside the body gets nothing
    d_max = d[np.argmax(pdd)]
    assert 10.0 <= d_max <= 20.0
    assert pdd[0] < 0.8 * pdd.max()  # build-up: the surface is well below the maximum
    beyond = pdd[d >= d_max + 10.0]
    assert np.all(np.diff(beyond) < 0)  # then it falls monotonically with depth
    ratio = pdd[np.argmin(np.abs(d - 100.0))] / pdd[np.argmin(np.abs(d - 50.0))]
    assert 0.7 < ratio < 0.9  # about -4 %/cm, as 6 MV in water


def test_penumbra_is_a_few_mm(lateral_field):
    case, result, (_, y_axis) = lateral_field
    profile = result.dose.array[10, :, 55]  # along y at the isocentre depth (x = 0)
    profile = profile / profile[20]
    half = profile[20:]  # from the centre towards +y
    y = y_axis[20:]
    y80 = np.interp(0.8, half[::-1], y[::-1])
    y20 = np.interp(0.2, half[::-1], y[::-1])
    assert 2.0 <= y20 - y80 <= 10.0
    assert 16.0 <= np.interp(0.5, half[::-1], y[::-1]) <= 30.0  # field edge near the target's


def test_entrance_side_follows_iec_gantry(lateral_field):
    _, result, (x_axis, _) = lateral_field
    central = result.dose.array[10, 20, :]
    # gantry 90: source at the patient's left (+x); entrance dose > exit dose
    assert central[np.argmin(np.abs(x_axis - 70))] > 1.3 * central[np.argmin(np.abs(x_axis + 70))]


def test_optimised_arc_plan_is_normalised_and_spares_the_organ(physics_env):
    shape = (12, 40, 40)
    g = Geometry(shape, (-97.5, -97.5, -27.5), (5.0, 5.0, 5.0))
    z, y, x = np.meshgrid(*g.axis_coordinates(), indexing="ij")
    body = x ** 2 + y ** 2 <= 90.0 ** 2
    ct = np.where(body, 0.0, -1000.0).astype(np.float32)
    ptv = (x ** 2 + y ** 2 <= 25.0 ** 2) & (np.abs(z) <= 15.0)
    cord = ((y - 45.0) ** 2 + x ** 2 <= 10.0 ** 2)
    case = Case("cyl", Volume(ct, g), (Structure("PTV", Role.TARGET, ptv, 60.0),
                                       Structure("SpinalCord", Role.OAR, cord)))
    arc = Beam("Arc", 180.0, (0.0, 0.0, 0.0), technique=Technique.ARC,
               control_point_gantry_deg=tuple(float(a % 360) for a in range(180, 541, 10)))
    result = compute_physics_dose(case, Plan((arc,)),
                                  PhysicsSettings(max_iter=80, arc_step_deg=30.0))
    dose = result.dose.array
    assert len(result.delivery_gantry_deg) == 12
    assert np.percentile(dose[ptv], 5) == pytest.approx(60.0, rel=1e-4)
    assert dose[ptv].mean() < 66.0
    assert dose[cord & (np.abs(z) <= 15.0)].max() < 0.8 * 60.0
    assert result.info["engine"] == "pyRadPlan" and result.info["num_bixels"] > 0


def test_an_organ_hidden_inside_the_target_loses_its_objectives_not_the_plan(physics_env):
    """A parotid entirely inside the PTV keeps no voxel once the optimiser applies the overlap
    priorities; pyRadPlan's mean-dose objective then divided by zero (OpenKBP pt_21)."""
    shape = (10, 32, 32)
    g = Geometry(shape, (-77.5, -77.5, -22.5), (5.0, 5.0, 5.0))
    z, y, x = np.meshgrid(*g.axis_coordinates(), indexing="ij")
    ct = np.where(x ** 2 + y ** 2 <= 70.0 ** 2, 0.0, -1000.0).astype(np.float32)
    ptv = (x ** 2 + y ** 2 <= 25.0 ** 2) & (np.abs(z) <= 12.5)
    hidden = (x ** 2 + y ** 2 <= 6.0 ** 2) & (np.abs(z) <= 2.5)
    case = Case("hidden", Volume(ct, g), (Structure("PTV", Role.TARGET, ptv, 60.0),
                                          Structure("RightParotid", Role.OAR, hidden)))
    beams = tuple(Beam(f"B{a}", float(a), (0.0, 0.0, 0.0)) for a in (0, 120, 240))
    result = compute_physics_dose(case, Plan(beams), PhysicsSettings(max_iter=30,
                                                                     dose_grid_mm=7.0))
    assert result.info["skipped_objectives"] == ["RightParotid"]
    assert np.percentile(result.dose.array[ptv], 5) == pytest.approx(60.0, rel=1e-4)
    # the coarse dose grid that packed plans keep gives the engine's own CT-grid dose
    body = ct > -500.0
    np.testing.assert_allclose(to_case_grid(result.dose_grid, g)[body],
                               result.dose.array[body], atol=1e-3)


def test_generate_and_resume(physics_env, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    make_openkbp_case(data / "pt_1.npz")
    out = tmp_path / "out"
    argv = ["physics", "generate", str(data), str(out), "--plans-per-case", "2",
            "--beams", "5..5", "--max-iter", "40"]
    assert main(argv + ["--limit", "1"]) == 0
    assert sorted(p.name for p in out.glob("*.npz")) == ["pt_1_plan0.npz"]
    assert "0 of 2 plans present or rejected; computing 1 with" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"]["engine_version"] and manifest["plans_written"] == 1
    assert manifest["settings"]["physics"]["max_iter"] == 40

    mtime = (out / "pt_1_plan0.npz").stat().st_mtime_ns
    assert main(argv + ["--workers", "2"]) == 0  # resumes: computes only the missing plan
    assert (out / "pt_1_plan0.npz").stat().st_mtime_ns == mtime
    assert json.loads((out / "manifest.json").read_text())["plans_written"] == 2
    assert "1 of 2 plans present or rejected" in capsys.readouterr().err

    plan = pd.load_arrays(out / "pt_1_plan1.npz")
    beams = read_plan_beams(plan)
    assert len(beams.techniques) == 5 and pd.is_plausible_static(
        [a[0] for a in beams.gantry_deg])
    case = load_openkbp_npz(out / "pt_1_plan1.npz")
    assert [b.gantry_deg for b in case.plan.beams] == [a[0] for a in beams.gantry_deg]
    ptv70 = case.structure("PTV70").mask
    assert np.percentile(case.dose.array[ptv70], 5) == pytest.approx(70.0, abs=0.02)
    assert case.dose.array[~case.external.mask].max() == 0.0  # dose only inside the body
    records = json.loads((out / "manifest.json").read_text())["plans"]
    assert sorted(records) == ["pt_1_plan0", "pt_1_plan1"]
    assert records["pt_1_plan1"]["arrangement"] == "static" and records["pt_1_plan1"][
        "targets"]["PTV70"]["d95_gy"] == pytest.approx(70.0, abs=0.02)
    assert isinstance(records["pt_1_plan1"]["rejected"], list)
    # a rejected plan is left out of packs; a run resumed from a pack does not compute it again
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["plans"]["pt_1_plan1"]["rejected"] = ["body Dmax 125.0% > 120%"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "pt_1_plan1.npz").unlink()
    assert main(argv) == 0
    assert "2 of 2 plans present or rejected; computing 0" in capsys.readouterr().err
    assert not (out / "pt_1_plan1.npz").exists()
    assert main(argv[:3] + [str(tmp_path / "other"), "--plans-per-case", "1",
                            "--beams", "5..5", "--max-iter", "40", "--limit", "0"]) == 0
    assert main(argv[:4] + ["--plans-per-case", "3"]) == 2  # other settings, same folder
    assert "other settings" in capsys.readouterr().err


def test_verify_a_dicom_patient_writes_a_linked_rtdose(physics_env, phantom_dicom, tmp_path,
                                                         capsys):
    folder = phantom_dicom.rtplan_path.parent
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    out = tmp_path / "RD_physics.dcm"
    assert main(["physics", "verify", str(folder), "--max-iter", "30", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["primary_target"] == "PTV70" and report["comparison_vs_case_dose"]["mae_gy"] > 0
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # input untouched
    patient = tmp_path / "patient"
    shutil.copytree(folder, patient)
    (patient / phantom_dicom.rtdose_path.relative_to(folder)).unlink()
    shutil.copy(out, patient / out.name)
    reread = load_dicom_case(patient)
    ptv70 = reread.structure("PTV70").mask
    assert np.percentile(reread.dose.array[ptv70], 5) == pytest.approx(70.0, rel=0.02)


def _descendants(pid: int) -> set[int]:
    """Live descendants of ``pid`` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stopping_generate_leaves_no_engine_process_behind(physics_env, tmp_path):
    """SIGTERM to `physics generate --workers 2` mid-plan: the pool and both engine runs stop
    (an engine run orphaned by a killed pool process kept computing and writing plans)."""
    data = tmp_path / "data"
    data.mkdir()
    make_openkbp_case(data / "pt_1.npz")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "physics", "generate", str(data),
                             str(out), "--plans-per-case", "6", "--beams", "9..9",
                             "--workers", "2", "--max-iter", "300"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    engines: set[int] = set()
    while time.time() < deadline and len(engines) < 2 and proc.poll() is None:
        engines = {p for p in _descendants(proc.pid)
                   if "physics/worker.py" in Path(f"/proc/{p}/cmdline").read_bytes().decode(
                       errors="replace")}
        time.sleep(0.1)
    assert len(engines) == 2, "two engine runs should be computing"
    everything = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in everything):
        time.sleep(0.1)
    alive = [p for p in everything if Path(f"/proc/{p}").exists()]
    assert not alive, f"left running: {alive}"
    assert not list(out.glob(".*tmp*"))                   # no half-written plan either
