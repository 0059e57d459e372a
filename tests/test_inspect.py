"""`dosepilot inspect PATH [--json]` through the real CLI entry point."""

import json
import shutil

import pytest

from engine.cli import main
from engine.phantom import PhantomSpec, write_phantom


def test_inspect_json_reports_ct_structures_beams_dose(phantom_dicom, capsys):
    folder = phantom_dicom.rtplan_path.parent
    assert main(["inspect", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"ct", "structures", "beams", "dose", "warnings"} <= set(report)
    truth = phantom_dicom.case
    g = truth.geometry
    assert report["ct"]["shape"] == list(g.shape)
    assert report["ct"]["spacing_mm"] == list(g.spacing)
    assert report["ct"]["origin_mm"] == pytest.approx(list(g.origin))
    by_name = {s["name"]: s for s in report["structures"]}
    assert set(by_name) == {s.name for s in truth.structures}
    assert by_name["PTV70"] == {"name": "PTV70", "role": "target", "prescription_gy": 70.0,
                                "on_ct": True,
                                "volume_cc": pytest.approx(truth.structure("PTV70")
                                                           .volume_cc(g), abs=1e-3)}
    assert by_name["BODY"]["role"] == "external" and by_name["BODY"]["prescription_gy"] is None
    assert by_name["Parotid_L"]["role"] == "oar"
    assert len(report["beams"]) == 7
    b = report["beams"][1]
    assert b["name"] == "B02" and b["technique"] == "static"
    assert b["gantry_deg"] == pytest.approx(51.4) and b["couch_deg"] == 0.0
    assert b["isocenter_mm"] == pytest.approx(list(truth.plan.isocenter_mm), abs=0.01)
    assert report["dose"]["max_gy"] == pytest.approx(float(truth.dose.array.max()), abs=1e-3)
    assert report["dose"]["own_grid"]["shape"] == list(g.shape)  # written on the CT grid
    assert report["plan"]["fractions"] == 35
    assert report["warnings"] == []


def test_inspect_arc_and_warnings_in_text_and_json(tmp_path, capsys):
    write_phantom(tmp_path, PhantomSpec(shape=(8, 24, 28), arc=True, arc_step_deg=20.0))
    (tmp_path / "photo.png").write_bytes(b"\x89PNG not DICOM")
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    arc = report["beams"][0]
    assert arc["technique"] == "arc" and "gantry_deg" not in arc
    assert (arc["gantry_start_deg"], arc["gantry_stop_deg"]) == (181.0, 161.0)
    assert report["dose"] is None
    assert report["warnings"] == ["skipped 1 non-DICOM file(s)"]
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "arc 181 -> 161 deg" in text and "skipped 1 non-DICOM file(s)" in text
    assert "PTV70" in text and "Rx 70 Gy" in text


def test_inspect_bad_folder_is_a_one_line_error(tmp_path, capsys, phantom_dicom):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dosepilot inspect: error:") and "does not exist" in err
    broken = tmp_path / "broken"
    shutil.copytree(phantom_dicom.rtplan_path.parent, broken)
    sorted((broken / "CT").glob("*.dcm"))[3].unlink()
    assert main(["inspect", str(broken), "--json"]) == 2
    assert "slice(s) missing" in capsys.readouterr().err


def test_bundled_demo_patient_opens_cleanly(capsys):
    from engine.resources import resource_path

    demo = resource_path("demo")
    assert sum(p.stat().st_size for p in demo.rglob("*") if p.is_file()) < 15e6
    assert main(["inspect", str(demo), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["warnings"] == []
    assert report["ct"]["shape"] == [128, 128, 128]
    assert {s["name"] for s in report["structures"] if s["role"] == "target"} == {
        "PTV70", "PTV63", "PTV56"}
    # OpenKBP plans: nine equispaced coplanar fields, gantry 0, 40, ..., 320 degrees
    assert [b["gantry_deg"] for b in report["beams"]] == [40.0 * i for i in range(9)]
    assert 70 < report["dose"]["max_gy"] < 80
