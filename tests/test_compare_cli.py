"""``dosepilot compare`` on a DICOM phantom: RTPLAN files predicted with a tiny real model,
RTDOSE files and the patient's reference dose, and the input errors it reports."""

from __future__ import annotations

import json
import re
import shutil

import pydicom
import pytest

from engine.cli import main


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def patient(phantom_dicom, tmp_path_factory):
    src = tmp_path_factory.mktemp("dicom") / "patient"
    shutil.copytree(phantom_dicom.rtplan_path.parent, src)
    return src


@pytest.fixture(scope="module")
def turned_plan(phantom_dicom, tmp_path_factory):
    """The patient's RTPLAN with every beam turned by 40 degrees, outside the patient folder."""
    ds = pydicom.dcmread(phantom_dicom.rtplan_path)
    for beam in ds.BeamSequence:
        for cp in beam.ControlPointSequence:
            if "GantryAngle" in cp:
                cp.GantryAngle = (float(cp.GantryAngle) + 40.0) % 360.0
    ds.RTPlanLabel = "Turned"
    path = tmp_path_factory.mktemp("plans") / "turned.dcm"
    ds.save_as(path)
    return path


def test_rtdose_against_the_reference_is_no_difference(patient, phantom_dicom, tmp_path,
                                                       capsys):
    out = tmp_path / "same.png"
    code, stdout, err = run_cli(capsys, "compare", patient, "--a", phantom_dicom.rtdose_path,
                                "--b", "reference", "--out", out, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["diff_gy"]["max_abs_in_body"] == pytest.approx(0.0, abs=1e-4)
    assert doc["a"]["name"].startswith("RTDOSE") and doc["b"]["name"] == "Reference"
    assert doc["scorecard_template"] and doc["scorecard_total_delta"] == pytest.approx(0.0)
    deltas = [o["delta"] for o in doc["objectives"] if o["delta"] is not None]
    assert deltas and max(abs(d) for d in deltas) < 1e-3
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_plans_are_predicted_and_compared(patient, phantom_dicom, turned_plan,
                                              tiny_dose_bundle, tmp_path, capsys):
    out = tmp_path / "report" / "plans.pdf"
    code, stdout, err = run_cli(capsys, "compare", patient, "--a", turned_plan,
                                "--b", phantom_dicom.rtplan_path, "--preview", "--model",
                                tiny_dose_bundle, "--threads", "1", "--out", out, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    original = [b.gantry_deg for b in phantom_dicom.case.plan.beams]
    assert doc["a"]["plan"]["gantry_deg"] == pytest.approx([(g + 40) % 360 for g in original])
    assert doc["b"]["plan"]["gantry_deg"] == pytest.approx(original)
    assert "AI preview" in doc["a"]["source"] and doc["a"]["name"] == "Turned"
    assert doc["diff_gy"]["max_abs_in_body"] > 0  # other beams, another dose
    for row in doc["objectives"]:
        if row["delta"] is not None:
            assert row["delta"] == pytest.approx(row["a"] - row["b"], abs=1e-6)
    data = out.read_bytes()
    assert data[:5] == b"%PDF-" and len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) == 2


def test_input_errors_are_clear(patient, phantom_dicom, tmp_path, capsys):
    out = tmp_path / "r.pdf"

    def error(*args):
        code, _, err = run_cli(capsys, "compare", patient, *args)
        assert code == 2
        return err

    assert "no such file" in error("--a", tmp_path / "nope.dcm", "--b", "reference",
                                   "--out", out)
    ct = phantom_dicom.ct_paths[0]
    assert "expected an RTPLAN or RTDOSE, found modality CT" in error(
        "--a", ct, "--b", "reference", "--out", out)
    assert ".pdf or a .png" in error("--a", "reference", "--b", "reference", "--out",
                                     tmp_path / "r.txt")
    other = pydicom.dcmread(phantom_dicom.rtdose_path)
    other.FrameOfReferenceUID = pydicom.uid.generate_uid()
    other.save_as(tmp_path / "other_frame.dcm")
    assert "another frame of reference" in error("--a", tmp_path / "other_frame.dcm", "--b",
                                                 "reference", "--out", out)
    other = pydicom.dcmread(phantom_dicom.rtplan_path)
    other.PatientID = "SOMEONE-ELSE"
    other.save_as(tmp_path / "other_patient.dcm")
    assert "belongs to patient 'SOMEONE-ELSE'" in error(
        "--a", tmp_path / "other_patient.dcm", "--b", "reference", "--out", out)
    assert not out.exists()


def test_reference_without_a_dose_is_a_clear_error(patient, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(patient, bare)
    for p in bare.rglob("*.dcm"):
        if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTDOSE":
            p.unlink()
    code, _, err = run_cli(capsys, "compare", bare, "--a", "reference", "--b", "reference",
                           "--out", tmp_path / "r.png")
    assert code == 2 and "has no reference dose" in err


def test_text_output_lists_the_objective_deltas(patient, phantom_dicom, tmp_path, capsys):
    ds = pydicom.dcmread(phantom_dicom.rtdose_path)
    ds.DoseGridScaling = float(ds.DoseGridScaling) * 1.2  # 20% hotter everywhere
    ds.save_as(tmp_path / "hot.dcm")
    code, stdout, err = run_cli(capsys, "compare", patient, "--a", tmp_path / "hot.dcm",
                                "--b", "reference", "--out", tmp_path / "r.png")
    assert code == 0, err
    assert "A - B" in stdout and "report written to" in stdout
    row = next(line for line in stdout.splitlines() if "PTV_High D95" in line)
    assert float(row.split("A-B")[1]) > 0  # the hotter dose is A: A - B is positive
