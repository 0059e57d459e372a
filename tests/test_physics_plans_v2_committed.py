"""The version-2 physics plans kept in the repository (issue 15): the training set
(``datasets/openkbp-physics-plans-v2``) and the held-out beam-sensitivity set
(``datasets/openkbp-heldout-beams``). Only accepted plans are packed, each restores into a plan
whose figures are exactly the manifest's, and the held-out set is of validation patients only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.io.openkbp import load_openkbp_npz
from engine.physics import dataset as pd
from engine.physics.pack import unpack_folder
from tests.conftest import REPO

SETS = {"openkbp-physics-plans-v2": "train", "openkbp-heldout-beams": "validation"}


def _plans(folder):
    return [p for p in pd.list_cases(folder) if "_plan" in p.stem]


@pytest.mark.parametrize("name", sorted(SETS))
def test_only_accepted_plans_of_the_recorded_recipe_are_packed(name):
    folder = REPO / "datasets" / name
    manifest = json.loads((folder / "manifest.json").read_text())
    settings = manifest["settings"]
    assert settings["mix"] and settings["format_version"] == 2
    assert settings["objectives_version"] == 2 and settings["physics"]["max_iter"] == 200
    assert settings["dataset_dir"].endswith(f"openkbp/{SETS[name]}")
    records = manifest["plans"]
    accepted = sorted(n for n, r in records.items() if not r["rejected"])
    assert sorted(p.stem for p in _plans(folder)) == accepted and accepted
    assert manifest["plans_accepted"] == len(accepted)
    assert manifest["plans_evaluated"] == len(records) == manifest["plans_written"]
    for path in _plans(folder):
        packed = pd.load_arrays(path)
        assert "dose_cgy" not in packed and "ct" not in packed  # only what the restore needs
        assert json.loads(str(packed["physics_json"]))["objectives_version"] == 2


@pytest.mark.parametrize("name", sorted(SETS))
def test_a_restored_plan_has_the_recorded_figures(name, openkbp_dir, tmp_path):
    folder = REPO / "datasets" / name
    first = _plans(folder)[0]
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / first.name).symlink_to(first)
    assert unpack_folder(pack, openkbp_dir / SETS[name], tmp_path / "out") == 1
    restored = pd.load_arrays(tmp_path / "out" / first.name)
    case = load_openkbp_npz(tmp_path / "out" / first.name)
    record = json.loads((folder / "manifest.json").read_text())["plans"][first.stem]
    figures = pd.quality_record(case, restored)
    for key in ("targets", "oars", "body_dmax_gy", "rejected"):
        assert figures[key] == record[key]
    assert np.percentile(case.dose.array[case.structure("PTV70").mask], 5) == pytest.approx(
        70.0, abs=0.02)
