"""``dosepilot predict`` on a DICOM phantom and a synthetic OpenKBP case, with a tiny real model."""

import csv
import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from engine.cli import main
from engine.io.dicom import load_dicom_case
from engine.io.openkbp import OPENKBP_ROIS, load_openkbp, to_case_axes
from engine.metrics.benchmark_io import (
    openkbp_predictions,
    read_openkbp_prediction,
    read_openkbp_reference,
)
from engine.metrics.scores import openkbp_case_score
from engine.reports import DVH_COLUMNS, read_dvh_csv
from engine.runtime import DoseEngine

DCIODVFY = shutil.which("dciodvfy")
OUTPUTS = {"dose.dcm", "dvh.csv", "metrics.json", "report.png"}


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_openkbp_npz(path, seed=0, with_ptv=True):
    """A synthetic 128³ OpenKBP case in the shared npz layout (see data/openkbp/README.md)."""
    i0, i1, i2 = np.meshgrid(*(np.arange(128),) * 3, indexing="ij", sparse=True)
    body = ((i0 - 64) ** 2 + (i1 - 64) ** 2 < 40 ** 2) & (i2 > 16) & (i2 < 112)
    rois = {
        "Brainstem": ((i0 - 72) ** 2 + (i1 - 64) ** 2 < 5 ** 2) & (i2 > 30) & (i2 < 50),
        "SpinalCord": ((i0 - 90) ** 2 + (i1 - 64) ** 2 < 3 ** 2) & (i2 >= 50) & (i2 < 100),
        "LeftParotid": (i0 - 60) ** 2 + (i1 - 84) ** 2 + (i2 - 55) ** 2 < 6 ** 2,
        "RightParotid": (i0 - 60) ** 2 + (i1 - 44) ** 2 + (i2 - 55) ** 2 < 6 ** 2,
        "PTV56": (i0 - 64) ** 2 + (i1 - 64) ** 2 + (i2 - 66) ** 2 < 14 ** 2,
        "PTV70": (i0 - 64) ** 2 + (i1 - 64) ** 2 + (i2 - 66) ** 2 < 8 ** 2,
    }
    if not with_ptv:
        rois = {k: v for k, v in rois.items() if not k.startswith("PTV")}
    bits = np.zeros((128,) * 3, np.uint16)
    for k, name in enumerate(OPENKBP_ROIS):
        if name in rois:
            bits |= (np.broadcast_to(rois[name], bits.shape).astype(np.uint16) << k)
    bits |= np.broadcast_to(body, bits.shape).astype(np.uint16) << 15
    rng = np.random.default_rng(seed)
    ct = np.where(body, 1024 + rng.normal(0, 10, bits.shape), 24).astype(np.int16)
    r2 = (i0 - 64) ** 2 + (i1 - 64) ** 2 + (i2 - 66) ** 2
    dose = np.where(body, 7000 * np.exp(-r2 / (2 * 14.0 ** 2)), 0).astype(np.uint16)
    np.savez_compressed(path, ct=ct, dose_cgy=dose, roi_bits=bits,
                        roi_names=np.array(OPENKBP_ROIS), present=np.array(sorted(rois)),
                        voxel_mm=np.array([3.906, 3.906, 2.5], np.float32))
    return path


@pytest.fixture(scope="module")
def dicom_patient(phantom_dicom, tmp_path_factory):
    src = tmp_path_factory.mktemp("dicom") / "patient"
    shutil.copytree(phantom_dicom.rtplan_path.parent, src)
    return src


@pytest.fixture(scope="module")
def dicom_run(dicom_patient, tiny_dose_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred") / "out"
    before = {p: p.read_bytes() for p in dicom_patient.rglob("*") if p.is_file()}
    code = main(["predict", str(dicom_patient), "--model", str(tiny_dose_bundle), "--out",
                 str(out), "--steps", "2", "--threads", "1", "--json"])
    after = {p: p.read_bytes() for p in dicom_patient.rglob("*") if p.is_file()}
    assert before == after  # the user's files are never modified
    return code, out / dicom_patient.name


@pytest.fixture(scope="module")
def dicom_result(dicom_patient, tiny_dose_bundle):
    """The same prediction straight from the engine."""
    engine = DoseEngine.from_checkpoint(tiny_dose_bundle, threads=1)  # as the CLI run
    case = load_dicom_case(dicom_patient)
    return case, engine.predict(case, steps=2, seeds=(0,))


def test_dicom_prediction_writes_every_output(dicom_run):
    code, folder = dicom_run
    assert code == 0
    assert {p.name for p in folder.iterdir()} == OUTPUTS  # no dose.npy for a DICOM case
    png = (folder / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_rtdose_reopens_on_the_ct_grid_with_the_predicted_dose(dicom_run, dicom_patient,
                                                               dicom_result, tmp_path, capsys):
    _, folder = dicom_run
    case, result = dicom_result
    patient = tmp_path / "patient"
    shutil.copytree(dicom_patient, patient)
    for old in patient.glob("RTDOSE*.dcm"):
        old.unlink()
    shutil.copy(folder / "dose.dcm", patient / "predicted.dcm")
    reopened = load_dicom_case(patient)
    assert reopened.dose is not None
    assert reopened.dose.geometry == case.geometry
    scaling = float(pydicom.dcmread(folder / "dose.dcm").DoseGridScaling)
    assert np.abs(reopened.dose.array - result.dose.array).max() <= scaling
    assert float(result.dose.array.max()) > 0
    code, out, _ = run_cli(capsys, "inspect", patient, "--json")
    report = json.loads(out)
    assert code == 0 and report["dose"]["shape"] == list(case.geometry.shape)
    assert report["dose"]["max_gy"] == pytest.approx(float(result.dose.array.max()), abs=0.01)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) missing")
def test_rtdose_passes_dciodvfy(dicom_run):
    _, folder = dicom_run
    out = subprocess.run([DCIODVFY, str(folder / "dose.dcm")], capture_output=True, text=True,
                         timeout=60)
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert not errors and "Abort" not in text, text


def test_dvh_csv_and_metrics_json_match_the_engine_result(dicom_run, dicom_result):
    _, folder = dicom_run
    case, result = dicom_result
    with open(folder / "dvh.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == DVH_COLUMNS
    curves = read_dvh_csv(folder / "dvh.csv")
    assert set(curves) == set(result.dvhs) == {s.name for s in case.structures}
    for name, table in curves.items():
        ref = result.dvhs[name]
        np.testing.assert_allclose(table[:, 0], ref.dose_gy, atol=1e-4)
        np.testing.assert_allclose(table[:, 1], ref.cumulative_cc, rtol=1e-5, atol=1e-9)
    doc = json.loads((folder / "metrics.json").read_text())
    assert doc["steps"] == 2 and doc["seeds"] == [0] and doc["kind"] == "predict"
    assert set(doc["structures"]) == set(result.metrics)
    for name, m in result.metrics.items():
        got = doc["structures"][name]
        for field in ("mean_gy", "max_gy", "d95_gy", "d0_1cc_gy", "volume_cc"):
            want = getattr(m, field)
            if np.isfinite(want):
                assert got[field] == pytest.approx(want, rel=1e-4, abs=1e-4), (name, field)
            else:
                assert got[field] is None
    assert doc["dose"]["max_gy"] == pytest.approx(float(result.dose.array.max()), rel=1e-5)
    assert {"features", "encode", "dit", "decode", "to_patient", "dvh"} <= set(doc["timings_s"])


@pytest.fixture(scope="module")
def openkbp_run(tiny_dose_bundle, tmp_path_factory):
    ref_dir = tmp_path_factory.mktemp("openkbp_ref")
    write_openkbp_npz(ref_dir / "pt_7.npz")
    out = tmp_path_factory.mktemp("openkbp_pred") / "out"
    code = main(["predict", str(ref_dir / "pt_7.npz"), "--model", str(tiny_dose_bundle),
                 "--out", str(out), "--steps", "1", "--seeds", "2"])
    return code, ref_dir, out


def test_openkbp_case_gets_dose_npy_in_the_dataset_layout(openkbp_run):
    code, ref_dir, out = openkbp_run
    assert code == 0
    folder = out / "pt_7"
    assert {p.name for p in folder.iterdir()} == OUTPUTS | {"dose.npy", "plan.dcm"}
    pred = np.load(folder / "dose.npy")
    assert pred.shape == (128, 128, 128) and pred.dtype == np.float32
    case = load_openkbp(ref_dir / "pt_7.npz")
    ds = pydicom.dcmread(folder / "dose.dcm")
    dcm = ds.pixel_array * float(ds.DoseGridScaling)
    # the RTDOSE holds the CT-grid dose; dose.npy is the same dose in OpenKBP's (i0, i1, i2),
    # inside the possible-dose mask (the body)
    body = next(s.mask for s in case.structures if s.name == "Body")
    np.testing.assert_allclose(to_case_axes(pred), np.where(body, dcm, 0),
                               atol=float(ds.DoseGridScaling))
    assert dcm[~body].max() > 0  # the RTDOSE is not masked
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(case.geometry.origin)
    # the dose is where the model grid is: high inside the PTV relative to far outside
    assert float(pred.max()) > 0
    doc = json.loads((folder / "metrics.json").read_text())
    assert doc["seeds"] == [0, 1] and doc["uncertainty"]["max_std_gy"] > 0
    plan = pydicom.dcmread(folder / "plan.dcm")
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert ds.FrameOfReferenceUID == plan.FrameOfReferenceUID


def test_evaluate_reads_the_predict_output(openkbp_run, capsys):
    _, ref_dir, out = openkbp_run
    preds = openkbp_predictions(out)
    assert preds == {"pt_7": out / "pt_7" / "dose.npy"}
    ref = read_openkbp_reference(ref_dir / "pt_7.npz")
    pred = read_openkbp_prediction(preds["pt_7"])
    score = openkbp_case_score("pt_7", ref.dose_gy, pred, ref.masks, ref.possible_dose_mask,
                               ref.voxel_mm)
    body = ref.possible_dose_mask
    assert not pred[~body].any()  # masked as the challenge's own predictions are
    assert score.dose_score == pytest.approx(np.abs(ref.dose_gy - pred)[body].mean(), rel=1e-6)
    code, text, _ = run_cli(capsys, "evaluate", out, ref_dir, "--format", "openkbp", "--json")
    assert code == 0
    report = json.loads(text)
    assert report["n_cases"] == 1
    assert report["dose_score"] == pytest.approx(score.dose_score, rel=1e-6)


def test_cohort_runs_past_a_failing_case_and_loads_the_model_once(
        tiny_dose_bundle, dicom_patient, tmp_path, capsys, monkeypatch):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copytree(dicom_patient, cohort / "patient_a")
    write_openkbp_npz(cohort / "pt_3.npz", with_ptv=False)  # no target: cannot be planned
    loads = []
    original = DoseEngine.from_checkpoint.__func__

    def counting(cls, *a, **k):
        loads.append(a)
        return original(cls, *a, **k)

    monkeypatch.setattr(DoseEngine, "from_checkpoint", classmethod(counting))
    code, out, err = run_cli(capsys, "predict", cohort, tmp_path / "missing", "--model",
                             tiny_dose_bundle, "--out", tmp_path / "out", "--steps", "1",
                             "--json")
    assert code == 1
    assert len(loads) == 1
    summary = json.loads(out)
    assert {"model", "device", "threads", "steps", "seeds", "timings_s", "cases",
            "n_failed"} <= set(summary)
    assert summary["n_cases"] == 3 and summary["n_failed"] == 2
    by_case = {c["case"]: c for c in summary["cases"]}
    assert by_case["missing"]["status"] == "failed"
    assert "no such file" in by_case["missing"]["error"]
    assert by_case["pt_3"]["status"] == "failed" and "PTV" in by_case["pt_3"]["error"]
    ok = by_case["patient_a"]
    assert ok["status"] == "ok" and OUTPUTS <= set(ok["files"])
    assert {"load", "dit", "decode", "dvh", "write", "total"} <= set(ok["timings_s"])
    assert {s for s in ok["metrics"]} == {s.name for s in load_dicom_case(dicom_patient)
                                          .structures}
    assert "mean_gy" in next(iter(ok["metrics"].values()))
    assert (tmp_path / "out" / "patient_a" / "dose.dcm").is_file()
    assert not (tmp_path / "out" / "pt_3").exists()


def test_text_mode_reports_failures_on_stderr(tiny_dose_bundle, tmp_path, capsys):
    bad = write_openkbp_npz(tmp_path / "pt_1.npz", with_ptv=False)
    code, out, err = run_cli(capsys, "predict", bad, "--model", tiny_dose_bundle, "--out",
                             tmp_path / "out", "--steps", "1")
    assert code == 1
    assert "pt_1: FAILED" in err and "0 of 1 case(s)" in out


def test_missing_default_model_is_a_clear_error(tmp_path, monkeypatch, capsys, dicom_patient):
    monkeypatch.setenv("DOSEPILOT_RESOURCES", str(tmp_path / "resources"))
    code, _, err = run_cli(capsys, "predict", dicom_patient, "--out", tmp_path / "out")
    assert code == 2
    assert "no default model is installed" in err and "--model" in err
    assert "Traceback" not in err


def test_nothing_to_predict_is_a_clear_error(tmp_path, capsys, tiny_dose_bundle):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "predict", tmp_path / "empty", "--model", tiny_dose_bundle)
    assert code == 2 and "nothing to predict" in err


def test_gdp_hmm_case_gets_dose_npy_on_its_own_grid(tiny_dose_bundle, tmp_path, capsys):
    shape = (40, 96, 112)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij", sparse=True)
    body = np.broadcast_to(((y - 48) / 40.0) ** 2 + ((x - 56) / 48.0) ** 2 < 1, shape)
    ptv = np.broadcast_to((z - 20) ** 2 + (y - 48) ** 2 + (x - 56) ** 2 < 64, shape)
    data = {"img": np.where(body, 0.0, -1000.0).astype(np.float32),
            "Body": body.astype(np.uint8), "PTV70": ptv.astype(np.uint8),
            "isocenter": np.array([20, 48, 56]), "angle_list": np.array([0.0, 120.0, 240.0]),
            "isVMAT": False, "dose": np.where(ptv, 70.0, 20.0).astype(np.float32)}
    np.savez_compressed(tmp_path / "HN1+A+MOS_1.npz", data)
    (tmp_path / "PTV_DICT.json").write_text(json.dumps(
        {"HN1": {"PTV_High": {"OPTName": "PTV70", "PDose": 70.0}}}))
    code, out, _ = run_cli(capsys, "predict", tmp_path / "HN1+A+MOS_1.npz", "--model",
                           tiny_dose_bundle, "--out", tmp_path / "out", "--steps", "1",
                           "--json")
    assert code == 0, out
    folder = tmp_path / "out" / "HN1+A+MOS_1"
    pred = np.load(folder / "dose.npy")
    assert pred.shape == shape
    ds = pydicom.dcmread(folder / "dose.dcm")
    np.testing.assert_allclose(pred, ds.pixel_array * float(ds.DoseGridScaling),
                               atol=float(ds.DoseGridScaling))
    # and `dosepilot evaluate --format gdp-hmm` scores predict's output folder as it is
    from engine.metrics.scores import gdp_hmm_mae

    code, out, err = run_cli(capsys, "evaluate", tmp_path / "out", tmp_path, "--format",
                             "gdp-hmm", "--json")
    assert code == 0, err
    expected = gdp_hmm_mae(pred, data["dose"], data["Body"], data["PTV70"], 70.0)
    assert json.loads(out)["dose_score"] == pytest.approx(expected)


def test_find_cases_tells_a_patient_from_a_cohort(phantom_dicom, tmp_path):
    from engine.commands.predict_cmd import find_cases
    from engine.phantom import PhantomSpec, write_phantom

    src = phantom_dicom.rtplan_path.parent
    series = tmp_path / "series_layout"  # one patient, each object in its own sub-folder
    shutil.copytree(src / "CT", series / "CT")
    for name in ("RTSTRUCT", "RTPLAN"):
        (series / name).mkdir()
        shutil.copy(src / f"{name}.dcm", series / name / "1.dcm")
    assert [(c.path, c.kind) for c in find_cases(series)] == [(series, "dicom")]

    cohort = tmp_path / "cohort"
    shutil.copytree(src, cohort / "a")
    write_phantom(cohort / "b", PhantomSpec(shape=(8, 24, 24), name="OTHER"))
    write_openkbp_npz(cohort / "pt_2.npz")
    (cohort / "notes.txt").write_text("not a case")
    found = [(c.name, c.kind) for c in find_cases(cohort)]
    assert found == [("a", "dicom"), ("b", "dicom"), ("pt_2", "openkbp")]
    assert [c.kind for c in find_cases(cohort / "pt_2.npz")] == ["openkbp"]
    assert find_cases(cohort / "notes.txt") == []


def test_solver_choice_reaches_the_engine_and_the_summary(tiny_dose_bundle, tmp_path, capsys):
    from engine.diffusion import SOLVERS

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    write_openkbp_npz(ref_dir / "pt_7.npz")
    for solver in SOLVERS:  # the CLI's spelled-out choices are the engine's solvers
        out = tmp_path / solver
        assert main(["predict", str(ref_dir / "pt_7.npz"), "--model", str(tiny_dose_bundle),
                     "--out", str(out), "--steps", "3", "--solver", solver, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["solver"] == solver  # the engine's
        assert (out / "pt_7" / "dose.npy").is_file()


def test_preview_option_runs_the_planners_preview(tiny_dose_bundle, tmp_path, capsys):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    write_openkbp_npz(ref_dir / "pt_7.npz")
    args = ["predict", str(ref_dir / "pt_7.npz"), "--model", str(tiny_dose_bundle), "--json"]
    assert main([*args, "--out", str(tmp_path / "preview"), "--preview"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["preview"] is True and summary["steps"] == 1
    assert main([*args, "--out", str(tmp_path / "one"), "--steps", "1"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["preview"] is False and one["decoder"] == "vae"   # this bundle has no refiner
    case = load_openkbp(ref_dir / "pt_7.npz")
    expected = DoseEngine.from_checkpoint(tiny_dose_bundle, threads=1).preview(case)
    preview = np.load(tmp_path / "preview" / "pt_7" / "dose.npy")
    one_step = np.load(tmp_path / "one" / "pt_7" / "dose.npy")
    np.testing.assert_allclose(to_case_axes(preview), expected.dose.array * (
        to_case_axes(preview) > 0), atol=1e-4)
    assert np.abs(preview - one_step).max() > 0.01  # the codec's decode, not the VAE's
    rtdose = pydicom.dcmread(tmp_path / "preview" / "pt_7" / "dose.dcm")
    assert rtdose.DoseComment == "DosePilot preview (1 steps)"
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "bad", "--preview", "--seeds", 2)
    assert code == 2 and "takes no --steps, --seeds or --solver" in err
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "bad", "--preview", "--full-vae")
    assert code == 2 and "--full-vae is for full predictions" in err
