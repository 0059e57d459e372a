"""OpenKBP readers: sparse-CSV layout, the shared npz cases, and their anatomical orientation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from engine.case import Role
from engine.features.model_grid import ModelGridTransform
from engine.io.openkbp import (
    OPENKBP_SHAPE,
    OpenKBPFormatError,
    load_openkbp,
    load_openkbp_csv,
    load_openkbp_npz,
    to_case_axes,
)


def _write_sparse(path: Path, flat: np.ndarray, values: np.ndarray | None) -> None:
    rows = [f"{i}," if values is None else f"{i},{v:g}" for i, v in
            zip(flat, values if values is not None else flat)]
    path.write_text(",data\n" + "\n".join(rows) + "\n")


@pytest.fixture
def csv_case(tmp_path):
    """A small patient in the original repository's CSV layout, with its dense arrays."""
    rng = np.random.default_rng(0)
    ct = np.zeros(OPENKBP_SHAPE, np.float32)
    ct[40:90, 30:100, 20:110] = 1024 + rng.integers(-50, 50, size=(50, 70, 90))
    dose = np.zeros(OPENKBP_SHAPE, np.float32)
    dose[55:70, 55:75, 50:70] = 70.0
    ptv = dose > 0
    cord = np.zeros(OPENKBP_SHAPE, bool)
    cord[80:84, 62:66, 20:110] = True
    pdm = ct > 0
    folder = tmp_path / "pt_7"
    folder.mkdir()
    for name, arr, vals in (("ct", ct, True), ("dose", dose, True), ("PTV70", ptv, False),
                            ("SpinalCord", cord, False), ("possible_dose_mask", pdm, False)):
        flat = np.flatnonzero(arr)
        _write_sparse(folder / f"{name}.csv", flat, arr.ravel()[flat] if vals else None)
    (folder / "voxel_dimensions.csv").write_text("3.906\n3.906\n2.5\n")
    return folder, dict(ct=ct, dose=dose, ptv=ptv, cord=cord, pdm=pdm)


def test_csv_layout_reads_into_the_same_case_axes(csv_case):
    folder, arrays = csv_case
    case = load_openkbp(folder)
    assert case.name == "pt_7"
    assert case.geometry.shape == (128, 128, 128)
    assert case.geometry.spacing == pytest.approx((2.5, 3.906, 3.906))
    np.testing.assert_array_equal(case.ct.array, to_case_axes(arrays["ct"] - 1024.0))
    np.testing.assert_array_equal(case.dose.array, to_case_axes(arrays["dose"]))
    ptv = case.structure("PTV70")
    assert ptv.role is Role.TARGET and ptv.prescription_gy == 70.0
    np.testing.assert_array_equal(ptv.mask, to_case_axes(arrays["ptv"]))
    assert case.structure("SpinalCord").role is Role.OAR
    assert case.external is not None and case.external.mask.sum() == arrays["pdm"].sum()
    assert [b.gantry_deg for b in case.plan.beams] == [float(a) for a in range(0, 360, 40)]
    iso = np.asarray(case.plan.isocenter_mm)
    np.testing.assert_allclose(iso, case.geometry.index_to_lps(np.argwhere(ptv.mask).mean(0)))


def test_to_case_axes_maps_openkbp_axes_to_lps():
    a = np.zeros(OPENKBP_SHAPE, bool)
    a[10, 20, 30] = True  # i0 posterior-ward, i1 left-ward, i2 foot-ward
    (z, y, x), = np.argwhere(to_case_axes(a))
    assert (z, y, x) == (127 - 30, 10, 20)


def test_bad_csv_input_is_reported(csv_case):
    folder, _ = csv_case
    (folder / "PTV70.csv").write_text("index,value\n1,2\n")
    with pytest.raises(OpenKBPFormatError, match="header"):
        load_openkbp_csv(folder)
    (folder / "ct.csv").unlink()
    with pytest.raises(OpenKBPFormatError, match="no ct.csv"):
        load_openkbp(folder)


def test_bad_npz_input_is_reported(tmp_path):
    with pytest.raises(OpenKBPFormatError, match="no such file"):
        load_openkbp_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "x.npz", ct=np.zeros((2, 2, 2)))
    with pytest.raises(OpenKBPFormatError, match="missing arrays"):
        load_openkbp_npz(tmp_path / "x.npz")


def _centroid(case, name):
    s = case.structure(name)
    return case.geometry.index_to_lps(np.argwhere(s.mask).mean(axis=0)) if s.mask.any() else None


@pytest.fixture(scope="module")
def all_cases(openkbp_dir):
    """Every shared case loaded once (about 0.2 s each on an idle machine)."""
    t0 = time.perf_counter()
    paths = sorted(openkbp_dir.glob("*/pt_*.npz"))
    cases = [load_openkbp_npz(p) for p in paths]
    return cases, time.perf_counter() - t0


def test_all_shared_cases_load(all_cases):
    cases, seconds = all_cases
    assert len(cases) == 202
    for case in cases:
        assert len(case.plan.beams) == 9
        assert case.structure("PTV70").mask.any() or case.structure("PTV63").mask.any() or \
            case.structure("PTV56").mask.any()
        assert case.dose is not None and 50.0 < case.dose.array.max() < 100.0
        assert 500.0 < case.external.volume_cc(case.geometry) < 30000.0
        assert case.ct.array.min() >= -1024.0  # CT numbers from 0 (air) up, minus 1024
    print(f"loaded {len(cases)} OpenKBP cases in {seconds:.1f} s")


def test_orientation_from_anatomy_on_every_case(all_cases):
    """LPS: +x patient left, +y posterior, +z superior."""
    cases, _ = all_cases
    checked = {"mandible": 0, "brainstem": 0, "parotids": 0}
    for case in cases:
        names = {s.name for s in case.structures}
        cord = _centroid(case, "SpinalCord") if "SpinalCord" in names else None
        if "Mandible" in names and cord is not None:
            assert _centroid(case, "Mandible")[1] < cord[1] - 10.0, case.name  # anterior
            checked["mandible"] += 1
        lower = [n for n in ("Larynx", "Esophagus") if n in names]
        if "Brainstem" in names and lower:
            for n in lower:  # brainstem superior of larynx and oesophagus
                assert _centroid(case, "Brainstem")[2] > _centroid(case, n)[2] + 20.0, case.name
            checked["brainstem"] += 1
        if {"LeftParotid", "RightParotid"} <= names:
            assert _centroid(case, "LeftParotid")[0] > _centroid(case, "RightParotid")[0] + 40
            checked["parotids"] += 1
    assert min(checked.values()) > 100, checked


def test_round_trip_through_the_model_grid_keeps_the_reference_dose(openkbp_dir):
    case = load_openkbp_npz(openkbp_dir / "train" / "pt_1.npz")
    tf = ModelGridTransform.around(case.geometry, case.plan.isocenter_mm)
    dose = case.dose.array
    back = tf.dose_to_patient(tf.dose_to_model(dose)).array
    inside_roi = tf.to_patient(np.ones(tf.model.shape, np.float32), order=0).array > 0
    body = case.external.mask & inside_roi  # the model only sees its ROI
    assert body.sum() > 0.9 * case.external.mask.sum()
    assert np.abs(back - dose)[body].mean() <= 0.3

    def centroid(a):
        w = np.where(inside_roi, a, 0.0)
        idx = np.indices(a.shape).reshape(3, -1)
        return case.geometry.index_to_lps((idx * w.ravel()).sum(1) / w.sum())

    assert np.linalg.norm(centroid(back) - centroid(dose)) <= 1.0
