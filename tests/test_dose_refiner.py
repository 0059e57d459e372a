"""The dose refiner: its target geometry, its correction, and the bundle that carries it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.dose_model import load_dose_model, save_dose_model
from engine.models.checkpoint import CheckpointError
from engine.models.dose_refiner import (
    FEATURES,
    DoseRefiner,
    RefinerConfig,
    beam_fraction,
    refiner_inputs,
    target_geometry,
)

SPACING = (2.0, 2.5, 2.5)
SHAPE = (20, 24, 40)


def _two_targets() -> tuple[np.ndarray, np.ndarray]:
    """A 70 Gy box and a 56 Gy box side by side along x, inside a body box."""
    rx = np.zeros(SHAPE, np.float32)
    rx[5:15, 8:16, 6:14] = 70.0
    rx[5:15, 8:16, 26:34] = 56.0
    body = np.zeros(SHAPE, bool)
    body[1:19, 2:22, 2:38] = True
    return rx, body


def _row(geometry, zyx) -> np.ndarray:
    flat = np.ravel_multi_index(zyx, geometry.shape)
    where = np.flatnonzero(geometry.index == flat)
    assert where.size == 1, f"voxel {zyx} is not corrected"
    return geometry.features[where[0]]


def test_target_geometry_distances_and_prescriptions():
    rx, body = _two_targets()
    config = RefinerConfig(near_mm=10.0, band_mm=20.0)
    geometry = target_geometry(rx, body, SPACING, config)
    assert geometry.features.shape == (len(geometry.index), len(FEATURES) - 1)
    # the centre of the 70 Gy box: 4 x-voxels (10 mm) from its surface along x, deeper along z
    centre = _row(geometry, (10, 12, 10))
    np.testing.assert_allclose(centre[:3], [1.0, 1.0, 1.0])       # rx, nearest rx, max rx / 70
    assert centre[3] == pytest.approx(-1.0)                        # -10 mm / near 10 mm, clipped
    # 3 voxels (7.5 mm) outside the 56 Gy box along +x: nearest target is the 56 Gy one, and
    # the primary (70 Gy) target is 23 voxels away, beyond the band: clipped at +band
    outside = _row(geometry, (10, 12, 36))
    np.testing.assert_allclose(outside[:3], [0.0, 56 / 70, 1.0], rtol=1e-6)
    assert outside[3] == pytest.approx(7.5 / 10.0)
    assert outside[4] == pytest.approx(20.0 / 10.0)
    # inside the 56 Gy box, 1 voxel from its x edge: negative distance to the targets, positive
    # (outside) to the primary target
    edge = _row(geometry, (10, 12, 26))
    assert edge[3] == pytest.approx(-2.5 / 10.0) and edge[4] > 0


def test_target_geometry_keeps_body_voxels_within_the_band():
    rx, body = _two_targets()
    geometry = target_geometry(rx, body, SPACING, RefinerConfig(band_mm=5.0))
    zyx = np.unravel_index(geometry.index, SHAPE)
    assert body[zyx].all()
    # a body voxel 15 mm from both targets (y = 2, 6 voxels of 2.5 mm below y = 8) is left out
    assert np.ravel_multi_index((10, 2, 10), SHAPE) not in set(geometry.index.tolist())
    assert np.ravel_multi_index((10, 6, 10), SHAPE) in set(geometry.index.tolist())
    with pytest.raises(ValueError, match="target with a prescription"):
        target_geometry(np.zeros(SHAPE, np.float32), body, SPACING, RefinerConfig())


def _constant_refiner(gy: float, config: RefinerConfig | None = None) -> DoseRefiner:
    """A refiner that adds ``gy`` everywhere it corrects."""
    refiner = DoseRefiner(config)
    with torch.no_grad():
        for p in refiner.parameters():
            p.zero_()
        refiner.net[-1].bias.fill_(gy / refiner.config.reference_gy)
    return refiner.eval()


def test_refine_corrects_only_its_voxels_and_clips_at_zero():
    rx, body = _two_targets()
    config = RefinerConfig(band_mm=5.0)
    geometry = target_geometry(rx, body, SPACING, config)
    doses = np.stack([np.full(SHAPE, 10.0, np.float32), np.full(SHAPE, 2.0, np.float32)])
    before = doses.copy()
    out = _constant_refiner(-3.0, config).refine(doses, geometry)
    np.testing.assert_array_equal(doses, before)                   # the input is not modified
    corrected = np.zeros(SHAPE, bool)
    corrected.flat[geometry.index] = True
    np.testing.assert_allclose(out[0][corrected], 7.0)
    np.testing.assert_allclose(out[1][corrected], 0.0)             # 2 - 3 Gy, clipped at 0
    np.testing.assert_array_equal(out[:, ~corrected], before[:, ~corrected])
    with pytest.raises(ValueError, match="dose grid"):
        _constant_refiner(1.0).refine(np.zeros((4, 4, 4), np.float32), geometry)


def test_refiner_inputs_put_the_dose_first_in_reference_units():
    rx, body = _two_targets()
    config = RefinerConfig(reference_gy=50.0)
    geometry = target_geometry(rx, body, SPACING, config)
    dose = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    rows = refiner_inputs(dose, geometry, config)
    np.testing.assert_allclose(rows[:, 0], dose.ravel()[geometry.index] / 50.0)
    np.testing.assert_array_equal(rows[:, 1:], geometry.features)


def test_bundle_carries_the_refiner_and_refuses_mismatched_weights(tiny_dose_bundle, tmp_path):
    model = load_dose_model(tiny_dose_bundle)
    assert model.refiner is None
    refiner = DoseRefiner(RefinerConfig(hidden=8))
    with torch.no_grad():
        refiner.net[0].weight.normal_()
    path = save_dose_model(tmp_path / "refined", model.dit, model.vae, model.codec,
                           normalisation=model.normalisation, refiner=refiner)
    loaded = load_dose_model(path)
    assert loaded.refiner is not None and loaded.refiner.config == refiner.config
    for a, b in zip(refiner.state_dict().values(), loaded.refiner.state_dict().values()):
        assert torch.equal(a, b)
    # weights of another width than the config says: refused when saved and when loaded
    wide = DoseRefiner(RefinerConfig(hidden=16))
    with pytest.raises(CheckpointError, match="refiner"):
        from engine.models.checkpoint import Component, save_bundle
        save_bundle(tmp_path / "bad", {"refiner": Component(
            "DoseRefiner", RefinerConfig(hidden=8).to_dict(), wide.state_dict())},
            normalisation=model.normalisation)
    with pytest.raises(ValueError, match="unknown refiner config keys"):
        RefinerConfig.from_dict({"hidden": 8, "depth": 3})


def test_the_beam_plate_is_a_seventh_input_in_beams_per_angle():
    rx, body = _two_targets()
    config = RefinerConfig(beam_plate=True)
    assert config.features == FEATURES + ("beam_fraction",)
    assert RefinerConfig.from_dict(config.to_dict()) == config
    geometry = target_geometry(rx, body, SPACING, config)
    plate = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    beam = beam_fraction(plate, 4.0, geometry)
    np.testing.assert_allclose(beam, plate.ravel()[geometry.index] / 4.0)
    dose = np.full(SHAPE, 35.0, np.float32)
    rows = refiner_inputs(dose, geometry, config, beam)
    assert rows.shape == (len(geometry.index), 7)
    np.testing.assert_array_equal(rows[:, -1], beam)
    np.testing.assert_array_equal(rows[:, :6], refiner_inputs(dose, geometry, RefinerConfig()))
    with pytest.raises(ValueError, match="beam plate"):
        refiner_inputs(dose, geometry, config)
    with pytest.raises(ValueError, match="beam plate grid"):
        beam_fraction(plate[:-1], 4.0, geometry)
    refiner = DoseRefiner(config)
    assert refiner.net[0].in_features == 7
    with pytest.raises(ValueError, match="beam plate"):
        refiner.refine(dose, geometry)
    assert refiner.refine(dose, geometry, beam).shape == SHAPE


def test_the_quick_plan_dose_is_the_last_input_in_reference_units():
    rx, body = _two_targets()
    config = RefinerConfig(beam_plate=True, quick_plan=True)
    assert config.features == FEATURES + ("beam_fraction", "quick_plan_dose")
    assert RefinerConfig.from_dict(config.to_dict()) == config
    assert RefinerConfig.from_dict({"beam_plate": True}).quick_plan is False  # older bundles
    geometry = target_geometry(rx, body, SPACING, config)
    beam = np.ones(geometry.index.shape, np.float32)
    quick = np.linspace(0.0, 77.0, geometry.index.size, dtype=np.float32)
    dose = np.full(SHAPE, 35.0, np.float32)
    rows = refiner_inputs(dose, geometry, config, beam, quick)
    assert rows.shape == (len(geometry.index), 8)
    np.testing.assert_allclose(rows[:, -1], quick / 70.0)
    np.testing.assert_array_equal(rows[:, :7], refiner_inputs(dose, geometry,
                                                              RefinerConfig(beam_plate=True), beam))
    with pytest.raises(ValueError, match="quick-plan dose"):
        refiner_inputs(dose, geometry, config, beam)
    with pytest.raises(ValueError, match="quick-plan dose"):
        refiner_inputs(dose, geometry, config, beam, quick[:-1])
    refiner = DoseRefiner(config)
    assert refiner.net[0].in_features == 8
    assert refiner.refine(dose, geometry, beam, quick).shape == SHAPE


def test_the_clinical_style_input_comes_last_and_is_one_for_predictions():
    rx, body = _two_targets()
    config = RefinerConfig(beam_plate=True, quick_plan=True, clinical_style=True)
    assert config.features[-1] == "clinical_plan" and len(config.features) == 9
    assert RefinerConfig.from_dict({"quick_plan": True}).clinical_style is False  # older bundles
    geometry = target_geometry(rx, body, SPACING, config)
    beam = np.ones(geometry.index.shape, np.float32)
    quick = np.full(geometry.index.shape, 70.0, np.float32)
    dose = np.full(SHAPE, 35.0, np.float32)
    rows = refiner_inputs(dose, geometry, config, beam, quick)
    np.testing.assert_array_equal(rows[:, -1], 1.0)  # the engine predicts clinical plans
    assert np.all(refiner_inputs(dose, geometry, config, beam, quick, clinical=False)[:, -1] == 0)
    plain = RefinerConfig(beam_plate=True, quick_plan=True)
    np.testing.assert_array_equal(rows[:, :-1], refiner_inputs(dose, geometry, plain, beam, quick))
    # the network reads the style: the same voxel as a clinical and as a physics plan differs
    refiner = DoseRefiner(config)
    with torch.no_grad():
        refiner.net[-1].bias.zero_()
        as_physics = refiner(torch.from_numpy(refiner_inputs(dose, geometry, config, beam, quick,
                                                             clinical=False)))
    refined = refiner.refine(dose, geometry, beam, quick)
    assert not np.allclose(refined.ravel()[geometry.index],
                           np.maximum(35.0 + as_physics.numpy(), 0.0))
