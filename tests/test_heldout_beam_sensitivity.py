"""The held-out beam-sensitivity benchmark: pairs of arrangements of one patient, restored from
a packed held-out folder, compared model change vs physics change."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import heldout_beam_sensitivity as hb
from engine.case import Technique
from engine.io.openkbp import load_openkbp_npz
from engine.io.plan_beams import Arrangement
from engine.physics import dataset as pd
from engine.physics import pack as pp
from tests.test_physics_dataset import _fake_result, coarse_grid, make_openkbp_case


def _heldout(tmp_path, plans_per_patient):
    """OpenKBP-format validation cases and a packed held-out folder of their plans."""
    data, gen = tmp_path / "validation", tmp_path / "gen"
    data.mkdir()
    gen.mkdir()
    for name, n in plans_per_patient.items():
        arrays = make_openkbp_case(data / f"{name}.npz")
        case = load_openkbp_npz(data / f"{name}.npz")
        for k in range(n):
            arrangement = Arrangement((Technique.STATIC,) * 3,
                                         ((10.0 + 40 * k,), (130.0,), (250.0,)))
            grid = coarse_grid(case, np.random.default_rng(k))
            pd.write_npz_atomic(gen / f"{name}_plan{k}.npz", pd.plan_arrays(
                arrays, case, arrangement, case.plan.isocenter_mm, _fake_result(case, grid),
                name))
    pp.pack_folder(gen, tmp_path / "heldout")
    return data, tmp_path / "heldout"


def _row(case, corr, model_abs, physics_abs):
    figures = {"correlation": corr, "sign_agreement": 0.5, "physics_mean_abs_gy": physics_abs,
               "model_mean_abs_gy": model_abs, "model_mean_abs_elsewhere_gy": 0.1}
    return {"case": case, "models": {"m": {"predict": figures, "preview": figures}}}


def test_summary_means_over_pairs_skipping_undefined_figures():
    rows = [_row("a", 0.2, 1.0, 4.0), _row("a", 0.6, 3.0, 8.0), _row("b", math.nan, 2.0, 6.0)]
    summary = hb.summarize(rows, ["m"])["m"]
    assert summary["predict_mean_correlation"] == pytest.approx(0.4)
    assert summary["predict_mean_model_mean_abs_gy"] == pytest.approx(2.0)
    assert summary["predict_change_ratio"] == pytest.approx(2.0 / 6.0, abs=1e-3)


def test_a_patient_with_one_accepted_arrangement_gives_no_pair(tmp_path, tiny_dose_bundle):
    data, heldout = _heldout(tmp_path, {"pt_201": 1})
    with pytest.raises(SystemExit, match="no patient .* has two accepted arrangements"):
        hb.main(["--model", str(tiny_dose_bundle), "--heldout", str(heldout),
                 "--dataset", str(data)])


def test_every_pair_of_a_patient_is_compared(tmp_path, tiny_dose_bundle, capsys):
    data, heldout = _heldout(tmp_path, {"pt_201": 2, "pt_202": 1})
    assert hb.main(["--model", str(tiny_dose_bundle), "--heldout", str(heldout),
                    "--dataset", str(data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = json.loads(lines[0])
    assert row["case"] == "pt_201" and row["plans"] == ["pt_201_plan0", "pt_201_plan1"]
    assert row["threshold_gy"] == 3.5
    figures = row["models"][str(tiny_dose_bundle)]
    assert set(figures) == {"predict", "preview"}
    # the physics change of two random stand-in doses is large almost everywhere in the body
    assert figures["predict"]["changed_fraction"] > 0.5
    summary = json.loads("\n".join(lines[1:]))
    assert summary["pairs"] == 1 and summary["patients"] == 1
    assert set(summary["models"][str(tiny_dose_bundle)]) >= {
        "predict_mean_correlation", "preview_change_ratio"}
