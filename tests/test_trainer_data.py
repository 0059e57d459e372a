"""Dataset manifests (formats, deterministic splits) and dose-valid augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import UserError
from trainer.caches import Cache, apply_variant, variants_for
from trainer.data import Augment, hash_fraction, scan_dataset, shift_volumes
from trainer.stages.volumes import random_crop


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_openkbp_explicit_split(openkbp_dir):
    m = scan_dataset(openkbp_dir, val_fraction=0.5)
    assert m.format == "openkbp"
    assert len(m.train) == len(list((openkbp_dir / "train").glob("pt_*.npz")))
    assert len(m.val) == len(list((openkbp_dir / "validation").glob("pt_*.npz")))
    assert all(c.name.startswith("validation/") for c in m.val)


def test_hash_split_is_deterministic_and_keeps_patients_together(tmp_path):
    for pid in range(30):
        for plan in ("9Ag", "VMAT"):
            _touch(tmp_path / f"HaN/{pid:04d}+{plan}+MOS_1.npz")
    a = scan_dataset(tmp_path, val_fraction=0.3)
    b = scan_dataset(tmp_path, val_fraction=0.3)
    assert a.format == "gdp_hmm" and a == b
    assert 0 < len(a.val) < len(a.cases)
    by_patient = {}
    for c in a.cases:
        by_patient.setdefault(c.group, set()).add(c.split)
    assert all(len(splits) == 1 for splits in by_patient.values())
    assert {c.split for c in a.cases if hash_fraction(c.group) < 0.3} == {"val"}
    # adding a patient does not move the others
    _touch(tmp_path / "HaN/9999+9Ag+MOS_1.npz")
    c = scan_dataset(tmp_path, val_fraction=0.3)
    old = {x.name: x.split for x in a.cases}
    assert all(old[x.name] == x.split for x in c.cases if x.name in old)


def test_generated_physics_plans_join_their_patient(tmp_path):
    for name in ("train/pt_1.npz", "train/pt_2.npz", "train/physics/pt_1_plan0.npz",
                 "train/physics/pt_1_plan1.npz", "validation/pt_201.npz", "train/notes.npz"):
        _touch(tmp_path / name)
    m = scan_dataset(tmp_path, val_fraction=0.5)
    assert m.format == "openkbp"
    assert [(c.name, c.group, c.split) for c in m.cases] == [
        ("train/physics/pt_1_plan0", "pt_1", "train"),
        ("train/physics/pt_1_plan1", "pt_1", "train"),
        ("train/pt_1", "pt_1", "train"), ("train/pt_2", "pt_2", "train"),
        ("validation/pt_201", "pt_201", "val")]
    # a linked folder of generated plans is read too (and a link loop does not hang the scan)
    linked = tmp_path / "linked"
    (linked / "train").mkdir(parents=True)
    (linked / "train" / "physics").symlink_to(tmp_path / "train" / "physics")
    (linked / "train" / "loop").symlink_to(linked)
    _touch(linked / "train" / "pt_1.npz")
    assert [c.name for c in scan_dataset(linked, 0.5).cases] == [
        "train/physics/pt_1_plan0", "train/physics/pt_1_plan1", "train/pt_1"]
    # without split folders the hash of the patient decides, so plans follow their patient
    flat = tmp_path / "flat"
    for pid in range(40):
        _touch(flat / f"pt_{pid}.npz")
        _touch(flat / f"pt_{pid}_plan0.npz")
    split = {c.name: c.split for c in scan_dataset(flat, val_fraction=0.3).cases}
    assert "val" in split.values()
    assert all(split[f"pt_{pid}"] == split[f"pt_{pid}_plan0"] for pid in range(40))


def test_dicom_case_folders_and_missing_data(tmp_path):
    _touch(tmp_path / "dicom/patient_a/CT/ct_1.dcm")
    _touch(tmp_path / "dicom/patient_a/rtplan.dcm")
    _touch(tmp_path / "dicom/patient_b/rtplan.dcm")
    m = scan_dataset(tmp_path / "dicom", 0.0)
    assert m.format == "dicom" and [c.name for c in m.cases] == ["patient_a", "patient_b"]
    with pytest.raises(UserError, match="dataset folder not found"):
        scan_dataset(tmp_path / "nothing", 0.1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no cases found .* OpenKBP pt_"):
        scan_dataset(tmp_path / "empty", 0.1)


def _stack():
    g = torch.Generator().manual_seed(0)
    return torch.rand((7, 5, 6, 8), generator=g) * 2 - 1


def test_random_crop_cuts_every_slot_at_one_place():
    stack = torch.arange(7 * 9 * 16 * 24, dtype=torch.float32).reshape(7, 9, 16, 24)
    corners = set()
    for seed in range(20):
        crop = random_crop(stack, (5, 8, 8), torch.Generator().manual_seed(seed))
        assert crop.shape == (7, 5, 8, 8)
        z, y, x = np.unravel_index(int(crop[0, 0, 0, 0]), (9, 16, 24))
        assert torch.equal(crop, stack[:, z:z + 5, y:y + 8, x:x + 8])
        corners.add((z, y, x))
    assert len(corners) > 10                                 # positions vary with the draw
    assert random_crop(stack, (0, 0, 0), torch.Generator()) is stack


def test_flips_move_every_slot_together():
    x = _stack()
    flip = Augment(flip_lr=True)
    outs = [flip(x, [-1.0] * 7, torch.Generator().manual_seed(s)) for s in range(8)]
    flipped = [o for o in outs if not torch.equal(o, x)]
    assert flipped and len(flipped) < 8                    # random, both outcomes happen
    for o in flipped:
        # anatomy and beam/angle plates are mirrored together (the mirrored plan)
        assert torch.equal(o, x.flip(-1))
    assert torch.equal(apply_variant(x, "flip_lr_si"), x.flip(-1).flip(-3))
    assert variants_for(True, False) == ("identity", "flip_lr")


def test_shift_fills_each_slot_with_its_background():
    x = _stack()
    bg = [-1.0, -0.5, 0.0, -1.0, -1.0, -1.0, -1.0]
    out = shift_volumes(x, (1, 0, -2), bg)
    assert torch.equal(out[:, 1:, :, :-2], x[:, :-1, :, 2:])
    assert torch.all(out[1, 0] == -0.5) and torch.all(out[2, :, :, -2:] == 0.0)


def test_volume_cache_round_trip(tmp_path):
    cache = Cache(tmp_path)
    vols = np.random.default_rng(0).uniform(-1, 1, (7, 5, 8, 8)).astype(np.float32)
    bits = np.zeros((5, 8, 8), dtype=np.int64)
    bits[2, 3:5, 3:5] = 0b101
    cache.write_volumes("train/pt_1", vols, bits, [{"name": "PTV70"}, {"name": "x"},
                                                   {"name": "Cord"}])
    back = cache.read_volumes("train/pt_1")
    assert torch.allclose(back.volumes, torch.from_numpy(vols), atol=1e-3)   # float16 on disk
    assert back.mask(0).sum() == 4 and back.mask(1).sum() == 0 and back.mask(2).sum() == 4
    with pytest.raises(UserError, match="missing from the volume cache"):
        cache.read_volumes("train/pt_2")


def test_a_dicom_case_becomes_training_volumes(phantom_dicom, tmp_path):
    import shutil

    from trainer.data import load_case, model_inputs
    shutil.copytree(phantom_dicom.rtplan_path.parent, tmp_path / "dataset" / "patient_1")
    m = scan_dataset(tmp_path / "dataset", val_fraction=0.0)
    assert m.format == "dicom" and [c.name for c in m.cases] == ["patient_1"]
    case = load_case(m.cases[0])
    inputs = model_inputs(case, (9, 32, 32))
    assert inputs.volumes.shape == (7, 9, 32, 32)
    assert inputs.volumes[4].max() > -1.0                    # the reference dose is there
    names = [s["name"] for s in inputs.structure_info]
    assert len(names) == len(case.structures) or len(names) == 63
    target = next(k for k, s in enumerate(inputs.structure_info) if s["role"] == "target")
    assert ((inputs.structures >> target) & 1).any()
