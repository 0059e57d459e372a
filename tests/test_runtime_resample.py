"""The engine's cropped model-to-patient resampling equals resampling onto the whole CT grid."""

import numpy as np
import pytest

from engine.case import Geometry
from engine.features import MODEL_SHAPE, ModelGridTransform
from engine.runtime import model_box_on_patient, to_patient_cropped

HFP = ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))


@pytest.mark.parametrize(("order", "hfp"), [(1, False), (3, True)])
def test_cropped_equals_full_resampling(order, hfp):
    origin, direction = ((273.0, 250.0, -120.0), HFP) if hfp else ((-273.0, -250.0, -120.0),
                                                                    None)
    kwargs = {"direction": direction} if direction else {}
    patient = Geometry(shape=(90, 200, 220), origin=origin, spacing=(3.0, 2.5, 2.5), **kwargs)
    transform = ModelGridTransform.around(patient, (10.3, -20.7, 5.1))
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in MODEL_SHAPE), indexing="ij")
    dose = (60 * np.exp(-(x ** 2 + y ** 2 + z ** 2) * 3) + rng.random(MODEL_SHAPE)
            ).astype(np.float32)
    full = transform.to_patient(dose, order=order, fill=0.0)
    cropped = to_patient_cropped(transform, dose, order)
    assert cropped.geometry == full.geometry == patient
    box = model_box_on_patient(transform)
    assert box is not None
    assert np.prod([b.stop - b.start for b in box]) < 0.5 * np.prod(patient.shape)
    np.testing.assert_allclose(cropped.array, full.array, atol=1e-4)
    assert float(full.array.max()) > 50


def test_grids_that_do_not_overlap_give_zero_dose():
    patient = Geometry(shape=(10, 20, 20), origin=(1000.0, 1000.0, 1000.0),
                       spacing=(3.0, 2.5, 2.5))
    transform = ModelGridTransform.around(patient, (0.0, 0.0, 0.0))
    assert model_box_on_patient(transform) is None
    out = to_patient_cropped(transform, np.ones(MODEL_SHAPE, np.float32), 1)
    assert out.geometry == patient and not out.array.any()
