"""``dosepilot convert``: dataset cases become DICOM patients that re-open with ``inspect``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_gdp_hmm import _han_dict

from engine.cli import main
from engine.io.dicom import load_dicom_case
from engine.io.openkbp import load_openkbp_npz


def _d95(dose, mask):
    return float(np.percentile(dose[mask], 5))


def test_openkbp_patient_converts_and_reopens(openkbp_dir, tmp_path, capsys):
    src = openkbp_dir / "train" / "pt_1.npz"
    out = tmp_path / "pt_1_dicom"
    assert main(["convert", str(src), str(out), "--to", "dicom"]) == 0
    original = load_openkbp_npz(src)
    case = load_dicom_case(out)
    assert [b.gantry_deg for b in case.plan.beams] == [float(a) for a in range(0, 360, 40)]
    np.testing.assert_allclose(case.plan.isocenter_mm, original.plan.isocenter_mm, atol=0.01)
    for s in original.structures:
        got = case.structure(s.name)
        assert got.role is s.role and got.prescription_gy == s.prescription_gy
        ref_cc = s.volume_cc(original.geometry)
        assert got.volume_cc(case.geometry) == pytest.approx(ref_cc, rel=0.1), s.name
    assert case.dose is not None
    d95_npz = _d95(original.dose.array, original.structure("PTV70").mask)
    d95_dicom = _d95(case.dose.array, case.structure("PTV70").mask)
    assert abs(d95_dicom - d95_npz) <= 0.5
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["beams"]) == 9
    assert {s["name"] for s in report["structures"]} >= {"PTV70", "SpinalCord", "Body"}
    assert report["dose"]["max_gy"] == pytest.approx(float(original.dose.array.max()), abs=0.1)


def test_gdp_hmm_case_converts(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "PTV_DICT.json").write_text(json.dumps(
        {"HNC_001": {"PTV_High": {"OPTName": "PTVHighOPT", "PDose": 70}}}))
    (meta / "Pat_Obj_DICT.json").write_text(json.dumps({"HNC_001": ["SpinalCord_05"]}))
    src = tmp_path / "HNC_001+9Ag+MOS_1.npz"
    np.savez_compressed(src, _han_dict())
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--meta", str(meta)]) == 0
    case = load_dicom_case(out)
    assert len(case.plan.beams) == 4
    assert case.structure("PTVHighOPT").prescription_gy == 70.0
    assert case.dose.array.max() == pytest.approx(120.0, abs=0.5)


def test_existing_output_and_bad_sources_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(tmp_path / "missing.npz"), str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["convert", str(tmp_path / "missing.npz"), str(tmp_path / "new")]) == 2
    assert "no such file" in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    assert main(["convert", str(tmp_path / "other.npz"), str(tmp_path / "new2")]) == 2
    assert "neither an OpenKBP case" in capsys.readouterr().err
