import numpy as np
import pytest

from engine.case import Beam, Case, Geometry, Plan, Role, Structure, Technique, Volume


def _geometry():
    return Geometry(shape=(4, 5, 6), origin=(-10.0, -20.0, 30.0), spacing=(3.0, 2.0, 1.0))


def test_index_lps_round_trip_and_axes():
    g = _geometry()
    assert np.allclose(g.index_to_lps([0, 0, 0]), (-10, -20, 30))
    # one step along the column axis (x), the row axis (y), the slice axis (z)
    assert np.allclose(g.index_to_lps([0, 0, 1]), (-9, -20, 30))
    assert np.allclose(g.index_to_lps([0, 1, 0]), (-10, -18, 30))
    assert np.allclose(g.index_to_lps([1, 0, 0]), (-10, -20, 33))
    idx = np.array([[1.5, 2.0, 3.25], [0, 4, 5]])
    assert np.allclose(g.lps_to_index(g.index_to_lps(idx)), idx)
    z, y, x = g.axis_coordinates()
    assert np.allclose(z, [30, 33, 36, 39]) and np.allclose(x[:2], [-10, -9])


def test_geometry_rejects_bad_direction_and_spacing():
    with pytest.raises(ValueError, match="orthonormal"):
        Geometry((1, 1, 1), (0, 0, 0), (1, 1, 1), ((1, 0, 0), (1, 0, 0), (0, 0, 1)))
    with pytest.raises(ValueError, match="positive"):
        Geometry((1, 1, 1), (0, 0, 0), (0, 1, 1))


def test_values_are_immutable():
    g = _geometry()
    ct = Volume(np.zeros(g.shape, np.float32), g)
    with pytest.raises(ValueError):
        ct.array[0, 0, 0] = 1
    s = Structure("PTV", Role.TARGET, np.ones(g.shape), prescription_gy=70)
    assert s.mask.dtype == bool and not s.mask.flags.writeable
    assert s.volume_cc(g) == pytest.approx(120 * 6 / 1000)


def test_plan_edit_makes_new_plan_and_arc_keeps_span():
    arc = Beam("A1", 181, (0, 0, 0), technique=Technique.ARC,
               control_point_gantry_deg=(181, 270, 359))
    plan = Plan((Beam("B1", 0, (0, 0, 0)), arc))
    edited = plan.with_gantry(1, 191)
    assert plan.beams[1].gantry_deg == 181  # the original is untouched
    assert edited.beams[1].control_point_gantry_deg == (191, 280, 9)
    assert edited.with_gantry(0, 370).beams[0].gantry_deg == 10


def test_case_checks_grids_and_finds_structures():
    g = _geometry()
    ct = Volume(np.zeros(g.shape, np.float32), g)
    with pytest.raises(ValueError, match="not on the CT grid"):
        Case("x", ct, (Structure("Body", Role.EXTERNAL, np.ones((1, 1, 1))),))
    case = Case("x", ct, (Structure("Body", Role.EXTERNAL, np.ones(g.shape)),
                          Structure("Cord", Role.OAR, np.zeros(g.shape))))
    assert case.structure("body").name == "Body"
    assert case.external.name == "Body" and [s.name for s in case.oars] == ["Cord"]
    with pytest.raises(KeyError, match="Body, Cord"):
        case.structure("PTV")
