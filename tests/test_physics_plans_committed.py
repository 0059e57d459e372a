"""The angle-varied physics training plans kept in the repository
(``datasets/openkbp-physics-plans``, issue 9): the generator's settings and times, every plan's
quality figures, the plans a planner would accept (issue 15) packed and restorable into plans
the trainer reads with their patient."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from engine.io.openkbp import load_openkbp_npz
from engine.io.plan_beams import read_plan_beams
from engine.physics.dataset import list_cases, load_arrays
from engine.physics.pack import unpack_folder
from tests.conftest import REPO
from trainer.data import scan_dataset

PACK = REPO / "datasets" / "openkbp-physics-plans"


def _packed():
    return [p for p in list_cases(PACK) if "_plan" in p.stem]


def test_every_accepted_plan_is_packed_with_its_settings_times_and_figures():
    plans = _packed()
    manifest = json.loads((PACK / "manifest.json").read_text())
    assert manifest["plans_written"] == 200 and not manifest["failures"]
    # every plan written has its quality figures; only those a planner would accept are packed
    records = manifest["plans"]
    assert len(records) == manifest["plans_written"] == manifest["plans_evaluated"]
    accepted = sorted(name for name, r in records.items() if not r["rejected"])
    assert sorted(p.stem for p in plans) == accepted
    assert len(accepted) == manifest["plans_accepted"] == 73
    for record in records.values():
        assert record["targets"]["PTV70"]["d95_rel"] == pytest.approx(1.0, abs=0.01)
        assert (record["body_dmax_rel"] > 1.2) == any(r.startswith("body Dmax")
                                                      for r in record["rejected"])
    assert manifest["engine"]["engine"] == "pyRadPlan"
    assert manifest["settings"]["beams"] == [5, 11]
    physics = manifest["settings"]["physics"]
    assert (physics["dose_grid_mm"], physics["bixel_width_mm"], physics["max_iter"]) == \
        (5.0, 7.0, 150)
    assert len(manifest["seconds_per_plan"]) >= len(plans) and manifest["median_s_per_plan"] > 0
    counts = {len(read_plan_beams(load_arrays(p)).techniques) for p in plans}
    assert min(counts) >= 5 and max(counts) <= 11 and len(counts) >= 5  # varied arrangements


def test_plans_restore_and_join_their_patient_in_the_trainer(openkbp_dir, tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    plans = _packed()
    some = plans[:: max(1, len(plans) // 3)][:3]
    pack = tmp_path / "pack"
    pack.mkdir()
    for p in some:
        os.symlink(p, pack / p.name)
    assert unpack_folder(pack, openkbp_dir / "train", data / "train" / "physics") == len(some)
    for p in some:
        source = p.stem.split("_plan")[0]
        os.symlink(openkbp_dir / "train" / f"{source}.npz", data / "train" / f"{source}.npz")
        case = load_openkbp_npz(data / "train" / "physics" / p.name)
        assert 5 <= len(case.plan.beams) <= 11
        # normalised like the clinical plans: the primary target's D95 is its prescription
        info = json.loads(str(load_arrays(p)["physics_json"]))
        target = case.structure(info["primary_target"])
        d95 = np.percentile(case.dose.array[target.mask], 5)
        assert d95 == pytest.approx(target.prescription_gy, abs=1.0)
    manifest = scan_dataset(data, val_fraction=0.0)
    groups = {c.name: c.group for c in manifest.cases}
    for p in some:
        assert groups[f"train/physics/{p.stem}"] == p.stem.split("_plan")[0]
