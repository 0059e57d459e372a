"""Packed physics plans: pack drops the source patient's arrays, unpack restores the exact plan
file from the dataset and refuses a different or missing source (no physics environment
needed: the plan files are written by the generator's own writer from a stand-in dose)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.case import Technique
from engine.cli import main
from engine.dose_grid import DoseGrid
from engine.io.openkbp import from_case_axes, load_openkbp_npz, to_case_axes
from engine.io.plan_beams import Arrangement
from engine.physics import dataset as pd
from engine.physics import pack as pp
from tests.test_physics_dataset import _fake_result, coarse_grid, make_openkbp_case


def _generated(tmp_path, names=("pt_1", "pt_2")):
    """A dataset folder with OpenKBP cases and a generated folder with one plan per case."""
    data, gen = tmp_path / "data", tmp_path / "gen"
    data.mkdir()
    gen.mkdir()
    for k, name in enumerate(names):
        arrays = make_openkbp_case(data / f"{name}.npz")
        case = load_openkbp_npz(data / f"{name}.npz")
        grid = coarse_grid(case, np.random.default_rng(k))
        arrangement = Arrangement((Technique.STATIC,) * 3, ((10.0,), (130.0,), (250.0,)))
        pd.write_npz_atomic(gen / f"{name}_plan0.npz", pd.plan_arrays(
            arrays, case, arrangement, case.plan.isocenter_mm, _fake_result(case, grid), name))
    (gen / "manifest.json").write_text(json.dumps({"plans_written": len(names)}))
    return data, gen


def test_pack_then_unpack_restores_every_array(tmp_path):
    data, gen = _generated(tmp_path)
    assert pp.pack_folder(gen, tmp_path / "pack") == 2
    packed = pd.load_arrays(tmp_path / "pack" / "pt_1_plan0.npz")
    # the CT-grid dose is recreated from the stored dose grid, which is packed in its code
    assert not set(pp.SOURCE_KEYS) & set(packed)
    assert not {"dose_cgy", "dose_grid_cgy"} & set(packed)
    assert {"dose_grid_mask_lzma", "dose_grid_values_lzma"} <= set(packed)
    assert pp.unpack_folder(tmp_path / "pack", data, tmp_path / "out") == 2
    for name in ("pt_1_plan0.npz", "pt_2_plan0.npz"):
        original, restored = pd.load_arrays(gen / name), pd.load_arrays(tmp_path / "out" / name)
        assert sorted(original) == sorted(restored)
        for key in original:
            np.testing.assert_array_equal(restored[key], original[key])
            assert restored[key].dtype == original[key].dtype
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == {"plans_written": 2}
    # the restored plan reads as a case with the generated beams
    case = load_openkbp_npz(tmp_path / "out" / "pt_2_plan0.npz")
    assert [b.gantry_deg for b in case.plan.beams] == [10.0, 130.0, 250.0]


def test_the_dose_grid_code_is_lossless_and_checked():
    rng = np.random.default_rng(5)
    grid = np.zeros((9, 14, 11), np.uint16)
    grid[2:7, 3:12, 1:10] = rng.integers(0, 65536, (5, 9, 9))  # extremes and big jumps too
    grid[4, 5, 5], grid[4, 5, 6] = 65535, 1
    code = pp.encode_dose_grid(grid)
    back = pp.decode_dose_grid(code)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, grid)
    # a smooth dose codes to far fewer bytes than its raw 2 bytes per voxel
    z, y, x = np.meshgrid(*(np.arange(n) for n in (30, 40, 40)), indexing="ij")
    smooth = (3000 + 40 * x + 25 * y - 10 * z).astype(np.uint16)
    small = pp.encode_dose_grid(smooth)
    assert small["dose_grid_values_lzma"].size < 0.05 * smooth.nbytes
    np.testing.assert_array_equal(pp.decode_dose_grid(small), smooth)
    broken = dict(code, dose_grid_values_lzma=code["dose_grid_values_lzma"][:-20])
    with pytest.raises(pp.PackError, match="corrupt packed dose grid"):
        pp.decode_dose_grid(broken)
    other = pp.encode_dose_grid(grid[:, :, :5])
    with pytest.raises(pp.PackError, match="corrupt packed dose grid"):
        pp.decode_dose_grid(dict(code, dose_grid_values_lzma=other["dose_grid_values_lzma"]))


def test_a_format_1_plan_keeps_its_dose_when_packed(tmp_path):
    data, gen = _generated(tmp_path, names=("pt_1",))
    plan = pd.load_arrays(gen / "pt_1_plan0.npz")
    for key in ("dose_grid_cgy", "dose_grid_origin_mm", "dose_grid_spacing_mm"):
        del plan[key]
    pd.write_npz_atomic(gen / "pt_1_plan0.npz", plan)
    pp.pack_folder(gen, tmp_path / "pack")
    assert "dose_cgy" in pd.load_arrays(tmp_path / "pack" / "pt_1_plan0.npz")
    pp.unpack_folder(tmp_path / "pack", data, tmp_path / "out")
    restored = pd.load_arrays(tmp_path / "out" / "pt_1_plan0.npz")
    np.testing.assert_array_equal(restored["dose_cgy"], plan["dose_cgy"])


def test_rejected_plans_are_neither_packed_nor_unpacked(tmp_path):
    data, gen = _generated(tmp_path)
    assert pp.pack_folder(gen, tmp_path / "packed_before") == 2  # no verdicts yet
    manifest = {"plans": {"pt_1_plan0": {"rejected": ["body Dmax 131.0% > 120%"]},
                          "pt_2_plan0": {"rejected": []}}}
    (gen / "manifest.json").write_text(json.dumps(manifest))
    assert pp.pack_folder(gen, tmp_path / "pack") == 1
    assert sorted(p.name for p in (tmp_path / "pack").glob("*.npz")) == ["pt_2_plan0.npz"]
    # the figures of the rejected plan stay in the manifest that travels with the pack
    assert json.loads((tmp_path / "pack" / "manifest.json").read_text()) == manifest
    # a pack made before the verdict still holds the plan: unpack leaves it out
    (tmp_path / "packed_before" / "manifest.json").write_text(json.dumps(manifest))
    assert pp.unpack_folder(tmp_path / "packed_before", data, tmp_path / "out") == 1
    assert [p.name for p in (tmp_path / "out").glob("*.npz")] == ["pt_2_plan0.npz"]


def test_pack_and_unpack_skip_what_is_already_there(tmp_path):
    data, gen = _generated(tmp_path)
    pp.pack_folder(gen, tmp_path / "pack")
    assert pp.pack_folder(gen, tmp_path / "pack") == 0
    pp.unpack_folder(tmp_path / "pack", data, tmp_path / "out")
    assert pp.unpack_folder(tmp_path / "pack", data, tmp_path / "out") == 0


def test_unpack_refuses_a_changed_source_case(tmp_path):
    data, gen = _generated(tmp_path, names=("pt_1",))
    pp.pack_folder(gen, tmp_path / "pack")
    arrays = pd.load_arrays(data / "pt_1.npz")
    arrays["ct"] = arrays["ct"].copy()
    arrays["ct"][0, 0, 0] += 1
    np.savez_compressed(data / "pt_1.npz", **arrays)
    with pytest.raises(pp.PackError, match="pt_1 differs"):
        pp.unpack_folder(tmp_path / "pack", data, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.npz"))


def test_unpack_names_a_missing_source_case(tmp_path):
    data, gen = _generated(tmp_path, names=("pt_1",))
    pp.pack_folder(gen, tmp_path / "pack")
    (data / "pt_1.npz").unlink()
    with pytest.raises(pp.PackError, match="source case .*pt_1.npz is missing"):
        pp.unpack_folder(tmp_path / "pack", data, tmp_path / "out")


def test_pack_refuses_a_file_that_is_not_a_generated_plan(tmp_path):
    (tmp_path / "gen").mkdir()
    np.savez(tmp_path / "gen" / "pt_1_plan0.npz", dose_cgy=np.zeros(3, np.uint16))
    with pytest.raises(pp.PackError, match="not a generated plan file: no ct"):
        pp.pack_folder(tmp_path / "gen", tmp_path / "pack")
    (tmp_path / "gen" / "pt_1_plan0.npz").write_bytes(b"truncated")
    with pytest.raises(pp.PackError, match="cannot be read"):
        pp.pack_folder(tmp_path / "gen", tmp_path / "pack")


def test_cli_pack_and_unpack(tmp_path, capsys):
    data, gen = _generated(tmp_path)
    assert main(["physics", "pack", str(gen), str(tmp_path / "pack")]) == 0
    assert "packed 2 new plan(s)" in capsys.readouterr().err
    assert main(["physics", "unpack", str(tmp_path / "pack"), str(data),
                 str(tmp_path / "out")]) == 0
    assert "restored 2 plan(s)" in capsys.readouterr().err
    (data / "pt_2.npz").unlink()
    (tmp_path / "out" / "pt_2_plan0.npz").unlink()
    assert main(["physics", "unpack", str(tmp_path / "pack"), str(data),
                 str(tmp_path / "out")]) == 2
    assert "is missing" in capsys.readouterr().err
    assert main(["physics", "pack", str(tmp_path / "nope"), str(tmp_path / "p2")]) == 2


def test_cli_evaluate_records_the_verdicts_that_pack_follows(tmp_path, capsys):
    data, gen = _generated(tmp_path)
    # pt_2's plan: a dose a planner accepts (from the stored grid, like the generator)
    arrays = pd.load_arrays(gen / "pt_2_plan0.npz")
    case = load_openkbp_npz(data / "pt_2.npz")
    good = np.full(arrays["dose_grid_cgy"].shape, 3000, np.uint16)
    grid = pd.read_dose_grid(arrays)
    arrays["dose_grid_cgy"] = good
    arrays["dose_cgy"] = pd.dose_cgy_from_grid(arrays, DoseGrid(
        good, grid.origin_lps_mm, grid.spacing_zyx_mm))
    # 70 Gy on the targets' voxels of the CT grid (stand-in for an optimised plan)
    ptv = case.structure("PTV56").mask | case.structure("PTV70").mask
    dose = np.where(ptv, 7000, to_case_axes(arrays["dose_cgy"]))
    arrays["dose_cgy"] = from_case_axes(dose).astype(np.uint16)
    pd.write_npz_atomic(gen / "pt_2_plan0.npz", arrays)
    assert main(["physics", "evaluate", str(gen)]) == 0
    assert "1 of 2 plans accepted" in capsys.readouterr().err
    manifest = json.loads((gen / "manifest.json").read_text())
    assert manifest["plans_written"] == 2  # what was there is kept
    plans = manifest["plans"]
    assert plans["pt_2_plan0"]["rejected"] == [] and plans["pt_1_plan0"]["rejected"]
    assert plans["pt_2_plan0"]["targets"]["PTV70"]["d95_gy"] == 70.0
    assert manifest["plans_accepted"] == 1 and manifest["plans_rejected"] == 1
    assert main(["physics", "pack", str(gen), str(tmp_path / "pack")]) == 0
    assert [p.name for p in (tmp_path / "pack").glob("*.npz")] == ["pt_2_plan0.npz"]
    assert main(["physics", "evaluate", str(tmp_path / "nope")]) == 2
