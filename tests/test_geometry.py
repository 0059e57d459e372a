import numpy as np
import pytest

from engine.case import Geometry, Volume
from engine.geometry import (
    from_sitk,
    geometry_from_sitk,
    grid_around,
    resample,
    to_sitk,
    voxel_centers_lps,
)

A = np.array([0.7, -0.3, 0.5])  # a linear field f(p) = A . p + B is reproduced exactly
B = 12.0


def _linear_volume(geometry: Geometry) -> Volume:
    return Volume((voxel_centers_lps(geometry) @ A + B).astype(np.float64), geometry)


def _rotation_z(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def test_sitk_round_trip_keeps_geometry_and_positions():
    direction = tuple(map(tuple, (np.asarray(((0, 0, 1), (0, 1, 0), (1, 0, 0)))
                                  @ _rotation_z(20).T)))
    g = Geometry((3, 4, 5), (1.0, -2.0, 3.0), (2.5, 1.5, 1.0), direction)
    vol = Volume(np.arange(60, dtype=np.float32).reshape(3, 4, 5), g)
    image = to_sitk(vol)
    back_g = geometry_from_sitk(image)
    assert (back_g.shape, back_g.spacing) == (g.shape, g.spacing)
    assert np.allclose(back_g.origin, g.origin) and np.allclose(back_g.direction, g.direction)
    # SimpleITK's physical point of index (i, j, k) equals ours of [k, j, i]
    assert np.allclose(image.TransformIndexToPhysicalPoint((4, 1, 2)), g.index_to_lps([2, 1, 4]))
    back = from_sitk(image)
    assert np.array_equal(back.array, vol.array)


def test_resample_linear_field_onto_shifted_finer_grid_is_exact():
    src = Geometry((10, 12, 14), (-20.0, -30.0, 5.0), (3.0, 2.0, 2.5))
    target = Geometry((12, 15, 20), (-15.3, -25.1, 9.2), (2.0, 1.1, 1.3))
    out = resample(_linear_volume(src), target, order=1)
    assert out.geometry == target and out.array.dtype == np.float64
    assert np.allclose(out.array, _linear_volume(target).array, atol=1e-9)


@pytest.mark.parametrize(("origin", "direction"), [
    ((20.0, 15.0, 30.0), ((0, 0, -1), (0, -1, 0), (-1, 0, 0))),  # flipped like FFP
    ((2.0, -1.0, 16.0), ((0, 0, 1), (0, 1, 0), (1, 0, 0))),
])
def test_resample_between_flipped_grids_by_position(origin, direction):
    src = Geometry((8, 9, 10), origin, (2.0, 2.0, 2.0), direction)
    target = Geometry((5, 6, 7), (0.0, 0.0, 20.0), (1.5, 1.5, 1.5))
    out = resample(_linear_volume(src), target, order=1, fill=-1.0)
    idx = src.lps_to_index(voxel_centers_lps(target))
    inside = np.all((idx >= -1e-9) & (idx <= np.asarray(src.shape) - 1 + 1e-9), axis=-1)
    assert inside.sum() > 100 and np.all(out.array[inside] != -1.0)
    assert np.allclose(out.array[inside], _linear_volume(target).array[inside], atol=1e-9)


def test_resample_from_oblique_grid():
    axial = np.asarray(((0, 0, 1), (0, 1, 0), (1, 0, 0)), dtype=float)
    direction = tuple(map(tuple, axial @ _rotation_z(30).T))
    src = grid_around((0.0, 0.0, 0.0), (20, 40, 40), (2.0, 2.0, 2.0), direction)
    target = grid_around((0.0, 0.0, 0.0), (10, 20, 20), (2.0, 2.0, 2.0))
    out = resample(_linear_volume(src), target, order=1, fill=np.nan)
    assert not np.isnan(out.array).any()  # the target fits inside the rotated source
    assert np.allclose(out.array, _linear_volume(target).array, atol=1e-9)


def test_outside_source_gets_fill_and_half_voxel_border_gets_edge_value():
    src = Geometry((1, 1, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    vol = Volume(np.array([[[1.0, 2.0, 3.0, 4.0]]], dtype=np.float32), src)
    target = Geometry((1, 1, 4), (-0.4, 0.0, 0.0), (1.0, 1.0, 1.9))  # x = -0.4, 1.5, 3.4, 5.3
    out = resample(vol, target, order=1, fill=-5.0)
    assert out.array.dtype == np.float32
    assert np.allclose(out.array[0, 0], [1.0, 2.5, 4.0, -5.0], atol=1e-6)


def test_nearest_keeps_masks_boolean_and_linear_gives_fractions():
    src = Geometry((4, 4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mask = np.zeros((4, 4, 4), bool)
    mask[:, :, 2:] = True
    vol = Volume(mask, src)
    target = Geometry((4, 4, 3), (0.5, 0.0, 0.0), (1.0, 1.0, 1.0))  # x = 0.5, 1.5, 2.5
    near = resample(vol, target, order=0)
    assert near.array.dtype == bool
    frac = resample(vol, target, order=1)
    assert np.allclose(frac.array[0, 0], [0.0, 0.5, 1.0])


def test_identity_resample_and_bad_order():
    g = Geometry((2, 2, 2), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    vol = Volume(np.arange(8, dtype=np.int16).reshape(2, 2, 2), g)
    assert np.array_equal(resample(vol, g, order=0).array, vol.array)
    assert resample(vol, g, order=1).array.dtype == np.float32
    with pytest.raises(ValueError, match="order"):
        resample(vol, g, order=2)


def test_grid_around_centres_the_grid():
    g = grid_around((10.0, -5.0, 3.0), (97, 128, 160), (2.0, 2.5, 2.5))
    centre = g.index_to_lps((np.asarray(g.shape) - 1) / 2.0)
    assert np.allclose(centre, (10.0, -5.0, 3.0))
    assert np.allclose(g.index_to_lps([48, 0, 0])[2], 3.0)


def test_reorient_axial_undoes_flips_and_transposes():
    from engine.geometry import flip_axes, reorient_axial

    g = Geometry((3, 4, 5), (1.0, 2.0, 3.0), (2.0, 1.5, 1.0))
    vol = Volume(np.arange(60, dtype=np.float32).reshape(3, 4, 5), g)
    flipped = flip_axes(vol, (0, 2))
    assert flipped.geometry.direction[0] == (0.0, 0.0, -1.0)
    assert np.allclose(flipped.geometry.index_to_lps([2, 0, 4]), g.origin)
    back = reorient_axial(flipped)
    assert np.array_equal(back.array, vol.array) and back.geometry == g
    # rows along x, columns along y (array axes 1 and 2 swapped), slices along -z
    turned_dir = ((0.0, 0.0, -1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    turned = Volume(np.ascontiguousarray(vol.array[::-1].transpose(0, 2, 1)),
                    Geometry((3, 5, 4), g.index_to_lps([2, 0, 0]), (2.0, 1.0, 1.5), turned_dir))
    back = reorient_axial(turned)
    assert np.array_equal(back.array, vol.array)
    assert np.allclose(back.geometry.origin, g.origin) and back.geometry.spacing == g.spacing
    axial = np.asarray(((0, 0, 1), (0, 1, 0), (1, 0, 0)), dtype=float)
    oblique = Geometry((3, 4, 5), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                       tuple(map(tuple, axial @ _rotation_z(5).T)))
    with pytest.raises(ValueError, match="oblique"):
        reorient_axial(Volume(vol.array, oblique))
