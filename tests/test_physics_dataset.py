"""Physics training-set generator: beam arrangements, the OpenKBP-format files, resumability
bookkeeping and the CLI's error handling (no physics environment needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.case import Technique, Volume
from engine.cli import main
from engine.dose_grid import DoseGrid, to_case_grid
from engine.io.openkbp import load_openkbp_npz, to_case_axes
from engine.io.plan_beams import Arrangement, read_plan_beams
from engine.physics import dataset as pd
from engine.physics.dose_calc import OBJECTIVES_VERSION, PhysicsResult, PhysicsSettings


def make_openkbp_case(path, shape=(40, 40, 24), voxel=(4.0, 4.0, 2.5)) -> dict:
    """A small OpenKBP-format case: water cylinder, PTV70 inside PTV56, cord posterior,
    left parotid on the patient's left (higher column), brainstem superior (lower slice)."""
    r, c, s = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    rr, cc = (r - shape[0] / 2) * voxel[0], (c - shape[1] / 2) * voxel[1]
    body = rr ** 2 + cc ** 2 <= 60.0 ** 2
    ct = np.where(body, 1024, 0).astype(np.int16)
    names = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
             "Mandible", "PTV56", "PTV63", "PTV70"]
    masks = {
        "PTV70": (rr ** 2 + cc ** 2 <= 12.0 ** 2) & (s >= 9) & (s < 15),
        "PTV56": (rr ** 2 + cc ** 2 <= 20.0 ** 2) & (s >= 7) & (s < 17),
        "SpinalCord": ((rr - 40.0) ** 2 + cc ** 2 <= 5.0 ** 2) & (s >= 8),
        "LeftParotid": ((rr + 5.0) ** 2 + (cc - 35.0) ** 2 <= 8.0 ** 2) & (s >= 5) & (s < 12),
        "Brainstem": ((rr - 30.0) ** 2 + cc ** 2 <= 6.0 ** 2) & (s < 6),
    }
    bits = np.zeros(shape, np.uint16)
    for k, name in enumerate(names):
        if name in masks:
            bits |= (masks[name].astype(np.uint16) << k)
    bits |= (body.astype(np.uint16) << 15)
    arrays = {"ct": ct, "dose_cgy": np.zeros(shape, np.uint16), "roi_bits": bits,
              "roi_names": np.asarray(names), "present": np.asarray(sorted(masks)),
              "voxel_mm": np.asarray(voxel, np.float32)}
    np.savez_compressed(path, **arrays)
    return arrays


# ---------------------------------------------------------------- arrangements


@pytest.mark.parametrize("n", range(5, 12))
def test_random_static_arrangements_are_spread_and_not_opposed(n):
    for seed in range(25):
        angles = pd.random_static(np.random.default_rng(seed), n)
        assert len(angles) == n and list(angles) == sorted(set(angles))
        assert all(a == int(a) and 0 <= a < 360 for a in angles)
        assert min(pd._circular_gaps(np.asarray(angles))) >= 0.5 * 360 / n
        diff = np.abs((np.subtract.outer(angles, angles) + 180) % 360 - 180)
        assert not np.any(np.abs(diff - 180) < 10)


def test_plausibility_rules():
    assert pd.is_plausible_static([0, 72, 144, 216, 288])
    assert not pd.is_plausible_static([0, 60, 120, 180, 240, 300])  # opposed pairs
    assert not pd.is_plausible_static([0, 10, 144, 216, 288])  # clustered


def test_random_arcs_turn_one_way_with_small_steps():
    for seed in range(30):
        for arc in pd.random_arcs(np.random.default_rng(seed)):
            steps = (np.diff(arc) + 180) % 360 - 180
            assert np.all(np.abs(steps) <= 10.0 + 1e-9) and np.all(np.abs(steps) > 0)
            assert np.all(np.sign(steps) == np.sign(steps[0]))
            assert 180 - 1e-6 <= np.abs(steps).sum() <= 358 + 1e-6


def test_random_arrangement_mixes_arcs_at_the_requested_fraction():
    rng = np.random.default_rng(3)
    draws = [pd.random_arrangement(rng, (5, 7), 0.5) for _ in range(200)]
    arcs = [d for d in draws if d.techniques[0] is Technique.ARC]
    assert 70 < len(arcs) < 130
    static = [d for d in draws if d.techniques[0] is Technique.STATIC]
    assert all(5 <= len(d.techniques) <= 7 for d in static)
    assert {len(d.techniques) for d in static} == {5, 6, 7}
    assert all(t is Technique.STATIC for d in (pd.random_arrangement(rng, (9, 9), 0.0)
                                               for _ in range(20)) for t in d.techniques)


@pytest.mark.parametrize("fields", [(5,), (7,), (9,)])
def test_class_solutions_are_equispaced(fields):
    for seed in range(20):
        angles = pd.class_solution(np.random.default_rng(seed), fields)
        n = fields[0]
        assert len(angles) == n and list(angles) == sorted(set(angles))
        assert all(a == int(a) and 0 <= a < 360 for a in angles)
        assert np.all(np.abs(pd._circular_gaps(np.asarray(angles)) - 360 / n) <= 1.0)
        assert min(angles) < 360 / n  # the start angle lies in the first sector


def test_partial_and_full_arcs():
    seen = set()
    for seed in range(40):
        arcs = pd.partial_arcs(np.random.default_rng(seed))
        seen.add(len(arcs))
        spans, directions = [], []
        for arc in arcs:
            steps = (np.diff(arc) + 180) % 360 - 180
            assert np.all(np.abs(steps) <= 10.0 + 1e-9) and np.all(np.abs(steps) > 0)
            assert np.all(np.sign(steps) == np.sign(steps[0]))
            spans.append(np.abs(steps).sum())
            directions.append(np.sign(steps[0]))
        assert all(180 - 1e-6 <= span <= 300 + 1e-6 for span in spans)
        if len(arcs) == 2:
            assert directions[0] == -directions[1]
        (full,) = pd.full_arc(np.random.default_rng(seed))
        steps = (np.diff(full) + 180) % 360 - 180
        assert np.abs(steps).sum() == pytest.approx(358.0) and np.all(np.abs(steps) <= 10.0)
    assert seen == {1, 2}


def test_the_arrangement_mix_draws_every_kind_at_its_rate():
    rng = np.random.default_rng(7)
    draws = [pd.mixed_arrangement(rng, (3, 11)) for _ in range(600)]
    counts = {kind: sum(1 for k, _ in draws if k == kind) for kind, _ in pd.ARRANGEMENT_MIX}
    for kind, p in pd.ARRANGEMENT_MIX:
        assert abs(counts[kind] / 600 - p) < 0.06, (kind, counts)
    static = [a for k, a in draws if k == "static"]
    assert {len(a.techniques) for a in static} == set(range(3, 12))
    assert {len(a.techniques) for k, a in draws if k == "class"} == {5, 7, 9}
    for kind, a in draws:
        arc = kind.endswith("arc")
        assert all((t is Technique.ARC) == arc for t in a.techniques)
        if kind == "full_arc":
            assert len(a.techniques) == 1


def test_plan_arrangement_follows_the_config():
    mixed = pd.GenerateConfig(plans_per_case=4, beams=(3, 11), mix=True)
    kinds = {pd.plan_arrangement(mixed, f"pt_{i}", k)[0] for i in range(30) for k in range(4)}
    assert kinds == {"static", "class", "partial_arc", "full_arc"}
    assert pd.plan_arrangement(mixed, "pt_3", 2) == pd.plan_arrangement(mixed, "pt_3", 2)
    plain = pd.GenerateConfig(plans_per_case=1, beams=(5, 7))
    assert {pd.plan_arrangement(plain, f"pt_{i}", 0)[0] for i in range(20)} == {"static"}


def test_plan_rng_depends_only_on_seed_case_and_index():
    a = pd.plan_rng(0, "pt_1", 1).random(4)
    np.testing.assert_array_equal(a, pd.plan_rng(0, "pt_1", 1).random(4))
    assert not np.array_equal(a, pd.plan_rng(0, "pt_2", 1).random(4))
    assert not np.array_equal(a, pd.plan_rng(0, "pt_1", 2).random(4))
    assert not np.array_equal(a, pd.plan_rng(1, "pt_1", 1).random(4))


def test_jobs_are_plan_major_in_natural_case_order(tmp_path):
    for name in ("pt_10", "pt_2", "pt_1"):
        (tmp_path / f"{name}.npz").write_bytes(b"")
    cases = pd.list_cases(tmp_path)
    assert [c.stem for c in cases] == ["pt_1", "pt_2", "pt_10"]
    jobs = pd.plan_jobs(cases, tmp_path / "out", 2)
    assert [j.out.name for j in jobs[:4]] == ["pt_1_plan0.npz", "pt_2_plan0.npz",
                                              "pt_10_plan0.npz", "pt_1_plan1.npz"]
    per_patient = pd.plan_jobs(cases, tmp_path / "out", 2, per_patient=True)
    assert [j.out.name for j in per_patient[:3]] == ["pt_1_plan0.npz", "pt_1_plan1.npz",
                                                     "pt_2_plan0.npz"]
    assert sorted(j.out.name for j in per_patient) == sorted(j.out.name for j in jobs)


# ---------------------------------------------------------------- plan files


def coarse_grid(case, rng=None) -> DoseGrid:
    """A 5 mm engine dose grid covering ``case``: linear in LPS position with whole-cGy values
    on the grid (so its interpolation onto the case grid is known exactly, with nothing lost to
    the cGy rounding), or random values with ``rng``."""
    g = case.geometry
    lo = np.asarray(g.origin)[::-1] - 2.0  # (z, y, x)
    shape = tuple(int(np.ceil((g.shape[a] - 1) * g.spacing[a] / 5.0)) + 2 for a in range(3))
    if rng is not None:
        return DoseGrid(rng.uniform(0, 75, shape), tuple(lo[::-1]), (5.0, 5.0, 5.0))
    z, y, x = (lo[a] + 5.0 * np.arange(shape[a]) for a in range(3))
    dose = 40.0 + 0.2 * x[None, None, :] - 0.1 * y[None, :, None] + 0.4 * z[:, None, None]
    return DoseGrid(np.broadcast_to(dose, shape).copy(), tuple(lo[::-1]), (5.0, 5.0, 5.0))


def linear_dose_on_case(case) -> np.ndarray:
    """The case-grid dose (Gy, [z, y, x]) that :func:`coarse_grid`'s linear dose gives."""
    g = case.geometry
    z, y, x = (g.origin[::-1][a] + g.spacing[a] * np.arange(g.shape[a]) for a in range(3))
    return 40.0 + 0.2 * x[None, None, :] - 0.1 * y[None, :, None] + 0.4 * z[:, None, None]


def _fake_result(case, grid):
    dose = to_case_grid(grid, case.geometry).astype(np.float32)
    return PhysicsResult(Volume(dose, case.geometry), 1.25, "PTV70", (10.0, 30.0),
                         PhysicsSettings(), {"engine": "pyRadPlan", "engine_version": "x"},
                         grid)


def test_plan_file_round_trip_through_the_openkbp_reader(tmp_path):
    arrays = make_openkbp_case(tmp_path / "c.npz")
    case = load_openkbp_npz(tmp_path / "c.npz")
    arrangement = Arrangement((Technique.STATIC, Technique.ARC),
                              ((15.0,), (100.0, 110.0, 120.0)))
    iso = (3.0, -4.0, 5.0)
    out = pd.plan_arrays(arrays, case, arrangement, iso, _fake_result(case, coarse_grid(case)),
                         "c")
    path = tmp_path / "out" / "c_plan0.npz"
    path.parent.mkdir()
    pd.write_npz_atomic(path, out)
    assert [p.name for p in path.parent.iterdir()] == ["c_plan0.npz"]
    back = pd.load_arrays(path)
    for key in ("ct", "roi_bits", "roi_names", "present", "voxel_mm"):
        np.testing.assert_array_equal(back[key], arrays[key])
    # the CT-grid dose is the stored grid's, in cGy, inside the body only
    body = case.external.mask
    expected = np.where(body, np.rint(100.0 * linear_dose_on_case(case)), 0)
    assert back["dose_cgy"].dtype == np.uint16
    np.testing.assert_array_equal(to_case_axes(back["dose_cgy"]), expected)
    # the stored grid keeps only what the body's dose is read from, in cGy
    grid = pd.read_dose_grid(back)
    assert back["dose_grid_cgy"].dtype == np.uint16 and grid.spacing_zyx_mm == (5.0, 5.0, 5.0)
    assert grid.array.size < coarse_grid(case).array.size
    kept = grid.array > 0
    assert kept.mean() < 1.0
    np.testing.assert_array_equal(to_case_axes(pd.dose_cgy_from_grid(arrays, grid)),
                                  expected)
    np.testing.assert_array_equal(back["gantry_deg"], [15, 100, 110, 120])
    np.testing.assert_array_equal(back["beam_index"], [0, 1, 1, 1])
    assert read_plan_beams(back) == arrangement
    assert str(back["source_case"]) == "c"
    physics = json.loads(str(back["physics_json"]))
    assert physics["normalization"] == 1.25 and physics["format_version"] == 2
    assert physics["objectives_version"] == OBJECTIVES_VERSION
    # the reader gives the generated case its stored beams, isocentre and dose
    read = load_openkbp_npz(path)
    assert [b.technique for b in read.plan.beams] == [Technique.STATIC, Technique.ARC]
    assert read.plan.beams[0].gantry_deg == 15.0
    assert read.plan.beams[1].control_point_gantry_deg == (100.0, 110.0, 120.0)
    for beam in read.plan.beams:
        np.testing.assert_allclose(beam.isocenter_mm, iso, atol=1e-3)
    assert read.plan.prescription_gy == case.plan.prescription_gy
    np.testing.assert_allclose(read.dose.array, expected / 100.0, atol=1e-4)


def test_quality_record_of_a_plan_file(tmp_path):
    arrays = make_openkbp_case(tmp_path / "c.npz")
    case = load_openkbp_npz(tmp_path / "c.npz")
    arrangement = Arrangement((Technique.STATIC,) * 3, ((10.0,), (130.0,), (250.0,)))
    out = pd.plan_arrays(arrays, case, arrangement, case.plan.isocenter_mm,
                         _fake_result(case, coarse_grid(case)), "c")
    record = pd.quality_record(case, out)
    dose = to_case_axes(out["dose_cgy"]) / 100.0
    ptv70 = case.structure("PTV70").mask
    assert record["beams"] == 3
    assert record["targets"]["PTV70"]["d95_gy"] == pytest.approx(
        np.percentile(dose[ptv70], 5), abs=1e-3)
    assert record["body_dmax_gy"] == pytest.approx(dose.max(), abs=1e-3)
    # a linear 30..60 Gy ramp covers no target to 93 % of 70 Gy
    assert any(r.startswith("PTV70 D95") for r in record["rejected"])
    summary = pd.acceptance_summary({"a": record, "b": {**record, "rejected": []}})
    assert summary["plans_accepted"] == 1 and summary["plans_rejected"] == 1
    assert summary["rejections_by_limit"]["PTV70 D95"] == 1


def test_a_stopped_run_is_reconciled(tmp_path):
    """Plan 0 recorded but its file absent (rejected, so a folder restored from a pack lacks
    it), plan 1 written but not recorded (the run stopped in between), plan 2 not computed."""
    (tmp_path / "data").mkdir()
    source = tmp_path / "data" / "pt_1.npz"
    arrays = make_openkbp_case(source)
    case = load_openkbp_npz(source)
    config = pd.GenerateConfig(3, beams=(3, 3))
    jobs = pd.plan_jobs([source], tmp_path, 3)
    kind, arrangement = pd.plan_arrangement(config, "pt_1", 1)
    plan1 = pd.plan_arrays(arrays, case, arrangement, case.plan.isocenter_mm,
                           _fake_result(case, coarse_grid(case)), "pt_1")
    pd.write_npz_atomic(jobs[1].out, plan1)
    rejected = {"arrangement": "class", "rejected": ["SpinalCord max 53.0 Gy > 50.0 Gy"]}
    manifest = {"plans": {"pt_1_plan0": rejected}, "plans_written": 0,
                "seconds_per_plan": [100.0]}
    assert pd.reconcile_manifest(manifest, jobs, config) is manifest
    assert manifest["plans"] == {"pt_1_plan0": rejected,
                                 "pt_1_plan1": {"arrangement": kind,
                                                **pd.quality_record(case, plan1)}}
    assert manifest["plans_written"] == manifest["plans_evaluated"] == 2
    assert manifest["plans_rejected"] == 2 and manifest["plans_timed"] == 1


def test_manifest_refuses_other_settings(tmp_path):
    config = pd.GenerateConfig(plans_per_case=2)
    first = pd.prepare_manifest(tmp_path, config, tmp_path, {"engine_version": "0.5.0"})
    again = pd.prepare_manifest(tmp_path, config, tmp_path, {"engine_version": "0.5.0"})
    assert first["settings"] == again["settings"]
    with pytest.raises(ValueError, match="other settings"):
        pd.prepare_manifest(tmp_path, pd.GenerateConfig(plans_per_case=3), tmp_path, {})
    with pytest.raises(ValueError, match="other settings"):
        pd.prepare_manifest(tmp_path, pd.GenerateConfig(plans_per_case=2, mix=True), tmp_path,
                            {})
    # plans made with other objectives are never mixed into a folder
    old = json.loads((tmp_path / "manifest.json").read_text())
    del old["settings"]["objectives_version"]
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="other settings"):
        pd.prepare_manifest(tmp_path, config, tmp_path, {})


def test_generate_config_is_validated():
    with pytest.raises(ValueError, match="beam range"):
        pd.GenerateConfig(plans_per_case=1, beams=(7, 5))
    with pytest.raises(ValueError, match="plans_per_case"):
        pd.GenerateConfig(plans_per_case=0)


# ---------------------------------------------------------------- CLI errors


def test_generate_without_physics_env_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOSEPILOT_PHYSICS_PYTHON", str(tmp_path / "missing"))
    make_openkbp_case(tmp_path / "pt_1.npz")
    rc = main(["physics", "generate", str(tmp_path), str(tmp_path / "out"),
               "--plans-per-case", "1"])
    assert rc == 2 and "make physics-env" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["physics", "generate", "{tmp}/nope", "{tmp}/out", "--plans-per-case", "1"],
     "does not exist"),
    (["physics", "generate", "{tmp}", "{tmp}/out", "--plans-per-case", "1"], "no case .npz"),
    (["physics", "verify", "{tmp}/nope.npz"], "no such file"),
    (["physics", "verify", "{tmp}/nope"], "neither a DICOM folder nor an OpenKBP case"),
])
def test_cli_input_errors(tmp_path, capsys, argv, message):
    rc = main([a.format(tmp=tmp_path) for a in argv])
    assert rc == 2 and message in capsys.readouterr().err


def test_verify_rejects_a_non_openkbp_npz(tmp_path, capsys):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    assert main(["physics", "verify", str(tmp_path / "x.npz")]) == 2
    assert "missing arrays" in capsys.readouterr().err


def test_beam_range_argument(capsys):
    with pytest.raises(SystemExit):
        main(["physics", "generate", "a", "b", "--plans-per-case", "1", "--beams", "11..5"])
    assert "1 <= lo <= hi" in capsys.readouterr().err
