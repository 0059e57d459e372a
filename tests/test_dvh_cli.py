"""``dosepilot dvh`` on a real DICOM pair: the phantom's RTDOSE and RTSTRUCT (pydicom)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest

from engine.cli import main
from engine.metrics.dvh import dvh

REQUIRED = {"volume_cc", "mean_gy", "max_gy", "d95_gy", "d2_gy", "d98_gy"}


def test_json_report_matches_the_ground_truth(phantom_dicom, capsys) -> None:
    case = phantom_dicom.case
    assert main(["dvh", "--dose", str(phantom_dicom.rtdose_path),
                 "--structures", str(phantom_dicom.rtstruct_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["structures"]
    assert set(rows) == {s.name for s in case.structures}
    g = case.geometry
    for s in case.structures:
        row = rows[s.name]
        assert REQUIRED | {"v20gy_pct", "v20gy_cc", "coverage_fraction"} <= set(row)
        truth = dvh(case.dose.array, s.mask, g)  # the dose on the CT grid, whole voxels
        if truth.volume_cc >= 5.0:
            # whole-voxel counts on the 3 mm CT differ from the contours' volume by a few %
            assert row["volume_cc"] == pytest.approx(truth.volume_cc, rel=0.05), s.name
            assert row["mean_gy"] == pytest.approx(truth.mean_gy, rel=0.02, abs=0.1), s.name
        assert row["coverage_fraction"] == pytest.approx(1.0, abs=1e-6)
        assert row["d98_gy"] <= row["d95_gy"] <= row["d2_gy"] <= row["max_gy"] + 1e-9
    # a tube with one polygon per slice: its exact volume is the shoelace area x slice spacing
    trachea = case.structure("Trachea")
    area_mm2 = sum(0.5 * abs(np.dot(c[:, 0], np.roll(c[:, 1], -1))
                             - np.dot(c[:, 1], np.roll(c[:, 0], -1))) for c in trachea.contours)
    assert rows["Trachea"]["volume_cc"] == pytest.approx(area_mm2 * g.spacing[0] / 1000, rel=0.005)
    ptv = rows["PTV70"]
    assert ptv["d95_gy"] == pytest.approx(dvh(case.dose.array, case.structure("PTV70").mask,
                                              g).dose_at_volume_pct(95), rel=0.01)
    assert ptv["v20gy_pct"] == pytest.approx(100.0)
    assert ptv["v20gy_cc"] == pytest.approx(ptv["volume_cc"], rel=1e-6)


def test_table_and_plot(phantom_dicom, tmp_path, capsys) -> None:
    png = tmp_path / "dvh.png"
    assert main(["dvh", "--dose", str(phantom_dicom.rtdose_path),
                 "--structures", str(phantom_dicom.rtstruct_path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:7] == ["structure", "volume_cc", "mean_gy", "max_gy", "d95_gy", "d2_gy",
                          "d98_gy"]
    assert any(line.startswith("PTV70") for line in out.splitlines())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dose_grid_not_covering_a_structure_is_reported(phantom_dicom, tmp_path,
                                                        capsys) -> None:
    # keep only the upper half of the dose frames: the lower structures lose their dose
    ds = pydicom.dcmread(phantom_dicom.rtdose_path)
    frames = int(ds.NumberOfFrames)
    keep = frames // 2
    arr = ds.pixel_array[keep:]
    offsets = [float(v) for v in ds.GridFrameOffsetVector][keep:]
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ipp[2] += offsets[0] - float(ds.GridFrameOffsetVector[0])
    ds.ImagePositionPatient = ipp
    ds.GridFrameOffsetVector = [o - offsets[0] for o in offsets]
    ds.NumberOfFrames = arr.shape[0]
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    cut = tmp_path / "RTDOSE_half.dcm"
    ds.save_as(cut)
    original = phantom_dicom.rtdose_path.read_bytes()
    assert main(["dvh", "--dose", str(cut), "--structures", str(phantom_dicom.rtstruct_path),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    coverage = [r["coverage_fraction"] for r in report["structures"].values()]
    assert min(coverage) < 0.9
    assert any("outside the dose grid" in w for w in report["warnings"])
    assert phantom_dicom.rtdose_path.read_bytes() == original  # inputs are never modified


@pytest.mark.parametrize("swap, message", [
    (True, "expected an RTDOSE object"),
    (False, "no such file"),
])
def test_bad_input(phantom_dicom, tmp_path, capsys, swap: bool, message: str) -> None:
    dose = phantom_dicom.rtstruct_path if swap else tmp_path / "missing.dcm"
    assert main(["dvh", "--dose", str(dose), "--structures",
                 str(phantom_dicom.rtstruct_path)]) == 2
    assert message in capsys.readouterr().err


def test_not_dicom(phantom_dicom, tmp_path, capsys) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 10)
    copy = tmp_path / "RS.dcm"
    shutil.copy(phantom_dicom.rtstruct_path, copy)
    assert main(["dvh", "--dose", str(junk), "--structures", str(copy)]) == 2
    assert "not a DICOM file" in capsys.readouterr().err
