"""GDP-HMM case files: the reader on a synthetic file in the challenge format, and refusal of
pickles that would run code."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from engine.case import Role, Technique
from engine.io.gdp_hmm import GdpHmmFormatError, load_gdp_hmm_npz
from engine.io.safe_unpickle import UnsafePickleError, load_npz_restricted, safe_loads


@pytest.fixture
def meta_dir(tmp_path):
    d = tmp_path / "meta_files"
    d.mkdir()
    (d / "PTV_DICT.json").write_text(json.dumps({
        "HNC_001": {"PTV_High": {"OPTName": "PTVHighOPT", "PDose": 70, "RingName": "Ring"},
                    "PTV_Low": {"OPTName": "PTVLowOPT", "StructName": "PTVLow", "PDose": 56.1}},
        "0617-259694": {"PTV_High": {"OPTName": "PTV", "PDose": 60,
                                     "RingName": "PTV_Ring.3-2"}}}))
    (d / "Pat_Obj_DICT.json").write_text(json.dumps({
        "HNC_001": ["PTVHighOPT", "PTVLowOPT", "SpinalCord_05", "BrainStem_03"],
        "0617-259694": ["PTV", "PTV_Ring.3-2", "Heart", "SpinalCord"]}))
    return d


def _han_dict(vmat=False):
    shape = (30, 40, 50)
    img = np.full(shape, -1000.0, np.float32)
    body = np.zeros(shape, np.uint8)
    body[5:25, 5:35, 5:45] = 1
    img[body > 0] = 30.0
    high = np.zeros(shape, np.uint8)
    high[12:18, 15:22, 20:30] = 1
    low = np.zeros(shape, np.uint8)
    low[10:20, 13:24, 18:32] = 1
    cord = np.zeros(shape, np.uint8)
    cord[:, 28:30, 24:26] = 1
    return {
        "img": img, "Body": body, "PTVHighOPT": high, "PTVLowOPT": low, "PTVLow": low,
        "SpinalCord_05": cord, "RingPTVHigh": np.zeros(shape, np.uint8),
        "dose": high * np.float32(7000) + low * np.float32(5000), "dose_scale": 0.01,
        "isVMAT": vmat, "isocenter": np.array([15, 18, 25], np.float32),
        "angle_list": [np.float32(a) for a in ([320, 0, 40, 80] if not vmat
                                               else np.arange(0, 358, 2))],
        "origin": (-100.0, -80.0, 40.0), "spacing": (2.5, 2.5, 2.0),
        "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), "size": (50, 40, 30),
        "angle_plate": np.zeros((40, 50)), "beam_plate": np.zeros(shape, np.float32),
        "all_mask": ["Body", "PTVHighOPT", "PTVLowOPT", "PTVLow", "SpinalCord_05"],
    }


def _write(path, data):
    np.savez_compressed(path, data)  # the challenge's own writer: a pickled dict in arr_0
    return path


def test_reads_a_challenge_format_case(tmp_path, meta_dir):
    path = _write(tmp_path / "HNC_001+9Ag+MOS_25934.npz", _han_dict())
    case = load_gdp_hmm_npz(path)
    assert case.name == "HNC_001+9Ag+MOS_25934"
    g = case.geometry
    assert g.shape == (30, 40, 50) and g.spacing == (2.0, 2.5, 2.5)
    assert g.origin == (-100.0, -80.0, 40.0)
    roles = {s.name: (s.role, s.prescription_gy) for s in case.structures}
    assert roles["PTVHighOPT"] == (Role.TARGET, 70.0)
    assert roles["PTVLowOPT"] == (Role.TARGET, 56.1) and roles["PTVLow"] == (Role.TARGET, 56.1)
    assert roles["SpinalCord_05"][0] is Role.OAR
    assert roles["Body"][0] is Role.EXTERNAL and roles["RingPTVHigh"][0] is Role.OTHER
    assert case.dose.array.max() == pytest.approx(70.0 + 50.0)
    assert [b.gantry_deg for b in case.plan.beams] == [0.0, 40.0, 80.0, 320.0]
    np.testing.assert_allclose(case.plan.isocenter_mm, (-100 + 25 * 2.5, -80 + 18 * 2.5, 40 + 30))
    assert case.plan.prescription_gy == 70.0 and case.plan.name == "9Ag"


def test_vmat_becomes_one_arc(tmp_path, meta_dir):
    case = load_gdp_hmm_npz(_write(tmp_path / "HNC_001+A4Ac+MOS_1.npz", _han_dict(vmat=True)),
                            meta_dir=meta_dir)
    (arc,) = case.plan.beams
    assert arc.technique is Technique.ARC and len(arc.control_point_gantry_deg) == 179


def test_missing_metadata_or_keys_are_reported(tmp_path, meta_dir):
    data = _han_dict()
    path = _write(tmp_path / "UNKNOWN+9Ag+MOS_1.npz", data)
    with pytest.raises(GdpHmmFormatError, match="not in PTV_DICT"):
        load_gdp_hmm_npz(path, meta_dir)
    del data["img"]
    with pytest.raises(GdpHmmFormatError, match="missing keys"):
        load_gdp_hmm_npz(_write(tmp_path / "HNC_001+x+MOS_1.npz", data), meta_dir)
    with pytest.raises(GdpHmmFormatError, match="no PTV_DICT.json"):
        load_gdp_hmm_npz(path, tmp_path / "nowhere")


class _Payload:
    """Pickles into a call of os.system that would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_a_callable_is_refused_without_running(tmp_path, meta_dir):
    marker = tmp_path / "pwned"
    data = _han_dict()
    data["dose_scale"] = _Payload(marker)
    path = _write(tmp_path / "HNC_001+9Ag+MOS_666.npz", data)
    with zipfile.ZipFile(path) as z:  # the payload really is in the file
        assert b"system" in z.read("arr_0.npy")
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system|nothing was executed"):
        load_gdp_hmm_npz(path, meta_dir)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(_Payload(marker)))
    assert not marker.exists()


def test_restricted_loader_reads_plain_arrays_and_values(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.arange(6).reshape(2, 3), d={"k": [1.5, "s", None]})
    out = load_npz_restricted(tmp_path / "a.npz")
    np.testing.assert_array_equal(out["x"], np.arange(6).reshape(2, 3))
    assert out["d"].item() == {"k": [1.5, "s", None]}
    (tmp_path / "b.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not an .npz"):
        load_npz_restricted(tmp_path / "b.npz")
