import pytest

from engine.case import Role
from engine.structure_names import (
    canonical_name,
    guess_role,
    prescription_from_name,
    role_from_observation,
)


@pytest.mark.parametrize(("name", "canon"), [
    ("Parotid_L", "Parotid_L"), ("L Parotid", "Parotid_L"), ("LeftParotid", "Parotid_L"),
    ("Lt_Parotid", "Parotid_L"), ("PAROTID LT", "Parotid_L"), ("parotid_left", "Parotid_L"),
    ("ParotidL", "Parotid_L"), ("RightParotid", "Parotid_R"), ("Parotid R", "Parotid_R"),
    ("rt parotid gland", "Parotid_R"),
    ("SpinalCord", "SpinalCord"), ("Cord", "SpinalCord"), ("Spinal_Cord", "SpinalCord"),
    ("spinal cord", "SpinalCord"), ("BrainStem", "Brainstem"), ("Brain_Stem", "Brainstem"),
    ("Mandible", "Mandible"), ("Bone_Mandible", "Mandible"), ("LARYNX", "Larynx"),
    ("Esophagus", "Esophagus"), ("Oesophagus", "Esophagus"),
    ("OpticNerve_L", "OpticNerve_L"), ("Optic Nerve R", "OpticNerve_R"),
    ("OpticNrv_L", "OpticNerve_L"), ("Chiasm", "OpticChiasm"), ("Optic_Chiasm", "OpticChiasm"),
    ("Lung_L", "Lung_L"), ("Right Lung", "Lung_R"), ("Lungs", "Lungs"), ("Heart", "Heart"),
    ("Rectum", "Rectum"), ("Bladder", "Bladder"), ("FemoralHead_L", "FemoralHead_L"),
    ("Femur_Head_R", "FemoralHead_R"), ("Femoral Head Lt", "FemoralHead_L"),
    ("BODY", "Body"), ("External", "Body"), ("Skin", "Body"), ("Outline", "Body"),
    ("PTV70", "PTV70"), ("PTV_70", "PTV70"), ("PTV 70Gy", "PTV70"), ("ptv_7000", "PTV70"),
    ("PTV 54.25 Gy", "PTV54.25"), ("CTV_56", "CTV56"),
])
def test_aliases_map_to_canonical_names(name, canon):
    assert canonical_name(name) == canon


@pytest.mark.parametrize("name", [
    "Cord_PRV5", "SpinalCord+5mm", "Ring_PTV70", "z_opt_Parotid", "Parotid", "Couch Surface",
    "PTV_High", "xyz", "", "PTV70_ring",
])
def test_unknown_helpers_and_ambiguous_names_are_not_mapped(name):
    assert canonical_name(name) is None


@pytest.mark.parametrize(("name", "gy"), [
    ("PTV70", 70.0), ("PTV_70", 70.0), ("PTV 70Gy", 70.0), ("PTV70.0", 70.0),
    ("PTV_7000", 70.0), ("PTV 5400cGy", 54.0), ("PTV_59,4", 59.4), ("PTV_1", None),
    ("PTV_high", None), ("Parotid 26", None), ("GTV", None),
])
def test_prescription_parsed_from_target_names(name, gy):
    assert prescription_from_name(name) == gy


@pytest.mark.parametrize(("name", "role"), [
    ("PTV70", Role.TARGET), ("CTV_High", Role.TARGET), ("GTVp", Role.TARGET),
    ("GTV", Role.TARGET), ("External", Role.EXTERNAL), ("BODY", Role.EXTERNAL),
    ("Parotid_L", Role.OAR), ("Cord_PRV5", Role.OAR), ("Ring_PTV", Role.OTHER),
    ("PTV70_opt", Role.OTHER), ("PTVopt", Role.OTHER), ("CouchSurface", Role.OTHER),
    ("Marker1", Role.OTHER),
])
def test_role_heuristic(name, role):
    assert guess_role(name) is role


def test_observation_types_win_except_generic_organ_on_targets():
    assert role_from_observation("PTV", "Boost") == (Role.TARGET, False)
    assert role_from_observation("EXTERNAL", "Outline2") == (Role.EXTERNAL, False)
    assert role_from_observation("AVOIDANCE", "PTV_ring") == (Role.OAR, False)
    assert role_from_observation("ORGAN", "Brainstem") == (Role.OAR, False)
    assert role_from_observation("ORGAN", "PTV70") == (Role.TARGET, True)
    assert role_from_observation("", "Body") == (Role.EXTERNAL, True)
    assert role_from_observation(None, "Heart") == (Role.OAR, True)
    assert role_from_observation("SUPPORT", "Couch") == (Role.OTHER, False)
