"""``dosepilot evaluate``: OpenKBP and GDP-HMM folders scored end to end through the CLI."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main

SHAPE = (128, 128, 128)
NAMES = np.array(["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus",
                  "Larynx", "Mandible", "PTV56", "PTV63", "PTV70"])


def write_reference(folder: Path, pid: str, shift: int) -> np.ndarray:
    """A small OpenKBP-style patient: PTV70 and SpinalCord blocks, dose in cGy."""
    dose = np.zeros(SHAPE, np.uint16)
    bits = np.zeros(SHAPE, np.uint16)
    body = (slice(30, 90), slice(30, 90), slice(30, 90))
    bits[body] |= np.uint16(1 << 15)
    ptv = (slice(50 + shift, 60 + shift), slice(50, 60), slice(50, 60))
    cord = (slice(70, 74), slice(40, 44), slice(40, 80))
    bits[ptv] |= np.uint16(1 << 9)
    bits[cord] |= np.uint16(1 << 1)
    rng = np.random.default_rng(shift)
    dose[body] = 1000 + rng.integers(0, 500, size=(60, 60, 60))
    dose[ptv] = 7000 + rng.integers(-200, 200, size=(10, 10, 10))
    np.savez_compressed(folder / f"{pid}.npz", ct=np.zeros(SHAPE, np.int16), dose_cgy=dose,
                        roi_bits=bits, roi_names=NAMES, present=NAMES[[1, 9]],
                        voxel_mm=np.array([3.906, 3.906, 2.5], np.float32))
    return dose.astype(np.float64) / 100.0


def write_sparse_csv(path: Path, dose: np.ndarray) -> None:
    flat = dose.ravel()
    idx = np.flatnonzero(flat)
    with open(path, "w", encoding="utf-8") as f:
        f.write(",data\n")
        f.writelines(f"{i},{float(v)!r}\n" for i, v in zip(idx, flat[idx]))


@pytest.fixture(scope="module")
def openkbp_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("okbp")
    ref, pred = root / "ref", root / "pred"
    ref.mkdir()
    pred.mkdir()
    d1 = write_reference(ref, "pt_1", 0)
    d2 = write_reference(ref, "pt_2", 5)
    write_reference(ref, "pt_3", 2)  # no prediction: reported, not scored
    mask = np.zeros(SHAPE, bool)
    mask[30:90, 30:90, 30:90] = True
    write_sparse_csv(pred / "pt_1.csv", d1 + mask)  # +1 Gy wherever dose is possible
    np.save(pred / "pt_2.npy", d2)  # exact
    return pred, ref


def run_json(capsys, *args: str) -> dict:
    assert main(["evaluate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_openkbp_scores_by_hand(openkbp_folders, capsys) -> None:
    pred, ref = openkbp_folders
    report = run_json(capsys, str(pred), str(ref))
    rows = {r["case"]: r for r in report["cases"]}
    # pt_1: |diff| = 1 Gy on every possible-dose voxel -> dose score 1; all 5 metrics off by 1
    assert rows["pt_1"]["dose_score"] == pytest.approx(1.0, abs=1e-5)
    assert rows["pt_1"]["dvh_score"] == pytest.approx(1.0, abs=1e-5)
    assert rows["pt_2"]["dose_score"] == pytest.approx(0.0, abs=1e-5)
    assert rows["pt_2"]["dvh_score"] == pytest.approx(0.0, abs=1e-5)
    assert report["dose_score"] == pytest.approx(0.5, abs=1e-5)
    assert report["dvh_score"] == pytest.approx(0.5, abs=1e-5)  # (5 x 1 + 5 x 0) / 10 metrics
    assert report["n_cases"] == 2 and report["benchmark"] == "openkbp"
    assert any("pt_3" in w for w in report["warnings"])


def _gdp_hmm_by_hand(pred: np.ndarray, ref: np.ndarray, ptv: np.ndarray, body: np.ndarray
                     ) -> float:
    ref = ref * 70.0 / np.percentile(ref[ptv], 3)
    union = ((ref > 5) | (pred > 5)) & body
    return float(np.abs(ref - pred)[union].sum() / ((ref > 5) & body).sum())


def test_openkbp_folders_also_get_the_gdp_hmm_style_mae(openkbp_folders, capsys) -> None:
    pred, ref = openkbp_folders
    report = run_json(capsys, str(pred), str(ref))
    rows = {r["case"]: r for r in report["cases"]}
    body = np.zeros(SHAPE, bool)
    body[30:90, 30:90, 30:90] = True
    expected = []
    for pid, shift, offset in (("pt_1", 0, 1.0), ("pt_2", 5, 0.0)):
        dose = np.load(ref / f"{pid}.npz")["dose_cgy"] / 100.0
        ptv = np.zeros(SHAPE, bool)
        ptv[50 + shift:60 + shift, 50:60, 50:60] = True
        expected.append(_gdp_hmm_by_hand(dose + offset * body, dose, ptv, body))
        assert rows[pid]["gdp_hmm_mae"] == pytest.approx(expected[-1], rel=1e-4)
    assert expected[1] > 0.1      # the reference is rescaled: even an exact copy is off
    assert report["gdp_hmm_mae"]["mean"] == pytest.approx(np.mean(expected), rel=1e-4)


def test_openkbp_text_output_is_csv_and_summary(openkbp_folders, capsys) -> None:
    pred, ref = openkbp_folders
    assert main(["evaluate", str(pred), str(ref), "--scorecard", "head_neck"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "case,dose_score,dvh_score,gdp_hmm_mae,scorecard_pred,scorecard_ref"
    assert lines[1].startswith("pt_1,1.0000,1.0000,") and lines[2].startswith("pt_2,0.0000,")
    assert "OpenKBP dose score: 0.5000 Gy over 2 patient(s)" in out
    assert "OpenKBP DVH score: 0.5000 Gy" in out
    assert "GDP-HMM-style MAE (highest PTV D97 = prescription, possible-dose mask)" in out
    pred_card, ref_card = (float(v) for v in lines[2].split(",")[4:6])
    assert pred_card == ref_card and 0.0 <= ref_card <= 1.0  # pt_2 predicted exactly
    assert "pt_3" in err


def test_openkbp_bad_prediction_file(openkbp_folders, tmp_path, capsys) -> None:
    _, ref = openkbp_folders
    (tmp_path / "pt_1.csv").write_text(",data\n5,1.0\n999999999,2.0\n", encoding="utf-8")
    assert main(["evaluate", str(tmp_path), str(ref)]) == 2
    err = capsys.readouterr().err
    assert "pt_1.csv" in err and "indices must be integers" in err


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no prediction matches"),
    (lambda p: np.save(p / "pt_1.npy", np.zeros((4, 4))), "shape (4, 4)"),
    (lambda p: (p / "pt_1.csv").write_text("hello\n", encoding="utf-8"), "header"),
])
def test_openkbp_errors(openkbp_folders, tmp_path, capsys, make, message) -> None:
    _, ref = openkbp_folders
    make(tmp_path)
    assert main(["evaluate", str(tmp_path), str(ref)]) == 2
    assert message in capsys.readouterr().err


def test_missing_folder(tmp_path, capsys) -> None:
    assert main(["evaluate", str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert "not a folder" in capsys.readouterr().err


def write_gdp_plan(folder: Path, plan: str) -> dict:
    rng = np.random.default_rng(1)
    dose = rng.uniform(0, 40, size=(8, 10, 12)).astype(np.float32)  # raw, x dose_scale -> Gy
    ptv = np.zeros(dose.shape, np.uint8)
    ptv[3:6, 4:7, 4:8] = 1
    dose[ptv == 1] = 35.0
    body = np.ones(dose.shape, np.uint8)
    body[:, :, 0] = 0
    data = {"dose": dose, "dose_scale": np.float32(2.0), "Body": body, "PTVHighOPT": ptv,
            "img": np.zeros(dose.shape, np.int16), "isVMAT": False}
    np.savez_compressed(folder / f"{plan}.npz", data)
    return data


def test_gdp_hmm_mae_through_the_cli(tmp_path, capsys) -> None:
    from engine.metrics.scores import gdp_hmm_mae

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    data = write_gdp_plan(ref, "HNC_001+A4Ac+MOS_1")
    (ref / "PTV_DICT.json").write_text(json.dumps(
        {"HNC_001": {"PTV_High": {"OPTName": "PTVHighOPT", "PDose": 70}}}), encoding="utf-8")
    guess = np.full(data["dose"].shape, 30.0)
    np.save(pred / "HNC_001+A4Ac+MOS_1_pred.npy", guess)
    report = run_json(capsys, str(pred), str(ref), "--format", "gdp-hmm")
    expected = gdp_hmm_mae(guess, data["dose"], data["Body"], data["PTVHighOPT"], 70.0, 2.0)
    assert report["dose_score"] == pytest.approx(expected)
    assert report["cases"][0]["case"] == "HNC_001+A4Ac+MOS_1"
    # without the prescriptions the command says what it needs
    (ref / "PTV_DICT.json").unlink()
    assert main(["evaluate", str(pred), str(ref), "--format", "gdp-hmm"]) == 2
    assert "PTV_DICT.json" in capsys.readouterr().err


class Payload:
    """Unpickling this would run a command: the reader must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_gdp_hmm_reader_refuses_code_in_pickles(tmp_path, capsys) -> None:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    arr = np.empty((), dtype=object)
    arr[()] = {"dose": np.zeros((2, 2, 2)), "evil": Payload()}
    with open(tmp_path / "arr_0.npy", "wb") as f:
        np.lib.format.write_array(f, arr, allow_pickle=True)
    import zipfile

    with zipfile.ZipFile(ref / "X_1+p.npz", "w") as zf:
        zf.write(tmp_path / "arr_0.npy", "arr_0.npy")
    (ref / "PTV_DICT.json").write_text(json.dumps(
        {"X_1": {"PTV_High": {"OPTName": "PTV", "PDose": 60}}}), encoding="utf-8")
    np.save(pred / "X_1+p_pred.npy", np.zeros((2, 2, 2)))
    assert main(["evaluate", str(pred), str(ref), "--format", "gdp-hmm"]) == 2
    captured = capsys.readouterr()
    assert "refused to load" in captured.err and "builtins.print" in captured.err
    assert "pwned" not in captured.out
    assert pickle.dumps(Payload())  # the payload itself is a valid pickle


def test_openkbp_shared_validation_reference_scores_zero(openkbp_dir, tmp_path, capsys) -> None:
    with np.load(openkbp_dir / "validation" / "pt_201.npz") as z:
        dose_gy = z["dose_cgy"] / 100.0
    write_sparse_csv(tmp_path / "pt_201.csv", dose_gy)
    report = run_json(capsys, str(tmp_path), str(openkbp_dir / "validation"))
    assert report["n_cases"] == 1
    # the case model holds doses in float32: about 1e-6 Gy from the float64 CSV values
    assert report["dose_score"] == pytest.approx(0.0, abs=1e-5)
    assert report["dvh_score"] == pytest.approx(0.0, abs=1e-5)
