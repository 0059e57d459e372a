"""Resampling between the patient grid and the model grid touches only the patient box around
the model grid, and gives the values of resampling the whole patient grid (the reference here is
:func:`engine.geometry.resample` on the whole grid): exactly for nearest neighbour, within
float32 rounding for trilinear and cubic B-spline interpolation (the box's other origin changes
the last bit of a continuous index)."""

import numpy as np
import pytest

from engine.case import Geometry, Volume
from engine.features import MODEL_SHAPE, ModelGridTransform, Normalization, Slot, build_modalities
from engine.features.oar_coding import oar_codes
from engine.geometry import resample
from engine.phantom import PhantomSpec, make_phantom

HFP = ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))


def _patient(hfp: bool) -> Geometry:
    origin, direction = ((273.0, 250.0, -120.0), HFP) if hfp else ((-273.0, -250.0, -120.0),
                                                                    None)
    kwargs = {"direction": direction} if direction else {}
    return Geometry(shape=(90, 200, 220), origin=origin, spacing=(3.0, 2.5, 2.5), **kwargs)


@pytest.mark.parametrize(("order", "hfp"), [(1, False), (3, True)])
def test_to_patient_equals_whole_grid_resampling(order, hfp):
    patient = _patient(hfp)
    transform = ModelGridTransform.around(patient, (10.3, -20.7, 5.1))
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in MODEL_SHAPE), indexing="ij")
    dose = (60 * np.exp(-(x ** 2 + y ** 2 + z ** 2) * 3) + rng.random(MODEL_SHAPE)
            ).astype(np.float32)
    full = resample(Volume(dose, transform.model), patient, order=order, fill=0.0)
    cropped = transform.to_patient(dose, order=order, fill=0.0)
    assert cropped.geometry == full.geometry == patient
    box = transform.patient_box()
    assert box is not None
    assert np.prod([b.stop - b.start for b in box]) < 0.5 * np.prod(patient.shape)
    np.testing.assert_allclose(cropped.array, full.array, atol=1e-4)
    assert float(full.array.max()) > 50
    floored = transform.to_patient(dose - 30.0, order=order, fill=0.0, floor=0.0)
    assert floored.array.min() == 0.0 and floored.array.max() > 20


@pytest.mark.parametrize(("order", "hfp", "rtol"), [(0, False, 0.0), (1, True, 1e-6),
                                                    (3, False, 1e-6)])
def test_to_model_equals_whole_grid_resampling(order, hfp, rtol):
    patient = _patient(hfp)
    transform = ModelGridTransform.around(patient, (10.3, -20.7, 100.0))  # near the CT's end
    rng = np.random.default_rng(1)
    values = (rng.random(patient.shape) * 70).astype(np.float32)
    if order == 0:
        values = np.floor(values / 10)
    whole = resample(Volume(values, patient), transform.model, order=order, fill=-5.0).array
    boxed = transform.to_model(values, order=order, fill=-5.0)
    assert boxed.dtype == whole.dtype
    np.testing.assert_allclose(boxed, whole, rtol=rtol, atol=1e-5 if rtol else 0.0)
    assert (boxed == -5.0).any() and (boxed != -5.0).any()  # partly outside the patient grid


def test_grids_that_do_not_overlap():
    patient = Geometry(shape=(10, 20, 20), origin=(1000.0, 1000.0, 1000.0),
                       spacing=(3.0, 2.5, 2.5))
    transform = ModelGridTransform.around(patient, (0.0, 0.0, 0.0))
    assert transform.patient_box() is None
    out = transform.to_patient(np.ones(MODEL_SHAPE, np.float32), 1)
    assert out.geometry == patient and not out.array.any()
    model = transform.to_model(np.ones(patient.shape, np.float32), order=1, fill=-7.0)
    assert model.shape == MODEL_SHAPE and (model == -7.0).all()


def test_model_inputs_of_a_ct_longer_than_the_model_grid_equal_whole_grid_ones():
    """The CT (250 mm long) is cut to the model grid's 194 mm before the label maps are made;
    every channel is what composing and resampling on the whole CT gives."""
    case = make_phantom(PhantomSpec(shape=(100, 64, 72), spacing=(2.5, 3.0, 3.0),
                                    with_dose=True))
    norm = Normalization()
    inputs = build_modalities(case, normalization=norm)
    tf = inputs.transform
    box = tf.patient_box()
    assert box[0].stop - box[0].start < case.geometry.shape[0]  # really cut

    def whole(array, order, fill=0.0):
        return resample(Volume(array, case.geometry), tf.model, order=order, fill=fill).array

    def label(pairs):
        out = np.zeros(case.geometry.shape, np.float32)
        for mask, value in pairs:
            out = np.maximum(out, np.where(mask, np.float32(value), np.float32(0)))
        return out

    rx = label([(t.mask, t.prescription_gy) for t in case.targets])
    oar = label([(s.mask, code) for s, code in oar_codes(case)])
    np.testing.assert_allclose(inputs[Slot.CT], norm.ct(whole(case.ct.array, 1, norm.ct_min_hu)),
                               atol=1e-6, rtol=0)
    assert np.array_equal(inputs[Slot.PTV], norm.ptv(whole(rx, 0)))
    assert np.array_equal(inputs[Slot.OAR], norm.oar(whole(oar, 0)))
    assert np.array_equal(inputs[Slot.BODY], norm.binary(whole(case.external.mask, 0)))
    dose = norm.dose(np.maximum(whole(case.dose.array, 3), np.float32(0)))
    np.testing.assert_allclose(inputs[Slot.DOSE], dose, atol=1e-5)
    assert (inputs[Slot.PTV] > -1).any() and (inputs[Slot.OAR] > -1).any()


def test_parotid_sides_use_the_exact_centroids():
    """Ipsi-/contralateral parotid coding compares centroids; they are computed from voxel
    counts per axis, which must equal the mean of the voxel indices."""
    case = make_phantom(PhantomSpec(shape=(20, 48, 56)))
    from engine.features.oar_coding import _centroid_x_mm

    for s in case.structures:
        expected = case.geometry.index_to_lps(np.argwhere(s.mask).mean(axis=0))[0]
        assert _centroid_x_mm(s, case) == pytest.approx(expected, abs=1e-9)


def test_model_inputs_of_a_large_ct_allocate_about_the_model_grid_only():
    """A CT (420 x 512 x 512 mm) four times the model grid's size: composing the label maps on
    the whole CT allocated 10x the CT's bytes (369 MB for a 37 MB CT); on the box around the
    model grid the allocations are the seven model-grid volumes plus about one CT's worth."""
    import tracemalloc

    case = make_phantom(PhantomSpec(shape=(140, 256, 256), spacing=(3.0, 2.0, 2.0)))
    tracemalloc.start()
    try:
        inputs = build_modalities(case)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < inputs.volumes.nbytes + 1.5 * case.ct.array.nbytes, peak / 1e6
