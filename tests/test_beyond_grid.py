"""Dose beyond the model grid: the nearest dose inside it, falling off per axis."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import beyond_grid_falloff
from engine.case import Geometry
from engine.features.model_grid import BEYOND_GRID_FALLOFF_MM, MODEL_SHAPE, ModelGridTransform

# a patient grid of 4 mm voxels reaching 60 mm beyond the model grid superior-inferiorly
PATIENT = Geometry(shape=(80, 100, 120), origin=(-238.0, -198.0, -158.0), spacing=(4.0, 4.0, 4.0))


def test_voxels_beyond_the_grid_get_the_nearest_dose_falling_off_per_axis():
    transform = ModelGridTransform.around(PATIENT, (0.0, 0.0, 0.0))
    dose = np.full(MODEL_SHAPE, 50.0, dtype=np.float32)
    plain = transform.to_patient(dose, order=1, fill=0.0, floor=0.0).array
    extended = transform.to_patient(dose, order=1, fill=0.0, floor=0.0,
                                    beyond_mm=(10.0, 80.0, 80.0)).array
    z = PATIENT.axis_coordinates()[0]
    model_z = transform.model.axis_coordinates()[0]
    column = extended[:, 50, 60]
    inside = (z >= model_z[1]) & (z <= model_z[-2])
    np.testing.assert_allclose(column[inside], 50.0, rtol=1e-6)
    assert plain[:, 50, 60][~inside & (np.abs(z) > 100)].max() == 0  # the old 0 Gy
    below = np.nonzero(z < model_z[1])[0]
    gap = z[below[-1] + 1] - z[below]
    np.testing.assert_allclose(column[below], 50.0 * np.exp(-gap / 10.0), rtol=1e-5)
    # in-plane the dose reaches further; a corner voxel gets the product of both factors
    y = PATIENT.axis_coordinates()[1]
    assert y[0] < transform.model.axis_coordinates()[1][0]
    row = extended[40, :, 60]
    edge = np.nonzero(row == row.max())[0][0]
    np.testing.assert_allclose(row[0], 50.0 * np.exp(-(y[edge] - y[0]) / 80.0), rtol=1e-5)
    np.testing.assert_allclose(extended[0, 0, 60], column[0] * row[0] / 50.0, rtol=1e-5)
    # falloff 0: nothing beyond the grid
    none = transform.to_patient(dose, order=1, fill=0.0, floor=0.0, beyond_mm=(0, 0, 0)).array
    assert none[below].max() == 0 and none[40, 50, 60] == 50.0


def test_a_grid_that_is_not_axial_is_left_as_it_is():
    sagittal = Geometry(shape=PATIENT.shape, origin=PATIENT.origin, spacing=PATIENT.spacing,
                        direction=((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)))
    transform = ModelGridTransform.around(sagittal, (0.0, 0.0, 0.0))
    dose = np.full(MODEL_SHAPE, 50.0, dtype=np.float32)
    plain = transform.to_patient(dose, order=1, fill=0.0, floor=0.0).array
    extended = transform.to_patient(dose, order=1, fill=0.0, floor=0.0,
                                    beyond_mm=(10.0, 80.0, 80.0)).array
    np.testing.assert_array_equal(plain, extended)


def test_the_falloff_benchmark_beats_zero_beyond_the_grid(openkbp_dir, capsys):
    assert beyond_grid_falloff.main(["--dataset", str(openkbp_dir / "train"), "--cases", "3",
                                     "--z", "0", "10", "--xy", "0", "80"]) == 0
    summary = json.loads(capsys.readouterr().out)
    scores = summary["round_trip_dose_score_gy"]
    engine = "{:g}/{:g}".format(*BEYOND_GRID_FALLOFF_MM[:2])
    assert set(scores) == {"0/0", "0/80", "10/0", "10/80", engine}
    assert summary["engine_gy"] == scores[engine]
    # on reference doses carrying the dose out beats 0 Gy beyond the grid, along both axes
    assert scores["10/80"] < scores["10/0"] < scores["0/0"] == summary["zero_beyond_gy"]
    assert scores["0/80"] < scores["0/0"] and summary["best_mm"] == [10, 80, 80]
