"""The dose-path ceiling benchmark: held-out physics doses through the model grid, the VAE, the
preview codec, judged like a model."""

from __future__ import annotations

import json

from benchmarks import dose_codec_ceiling as dc
from tests.test_heldout_beam_sensitivity import _heldout


def test_every_path_is_judged_on_every_pair(tmp_path, tiny_dose_bundle, capsys):
    data, heldout = _heldout(tmp_path, {"pt_201": 2})
    assert dc.main(["--model", str(tiny_dose_bundle), "--heldout", str(heldout),
                    "--dataset", str(data), "--validation", str(data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = json.loads(lines[0])
    assert row["plans"] == ["pt_201_plan0", "pt_201_plan1"]
    assert set(row["paths"]) == set(dc.PATHS)
    # resampling to the model grid and back keeps the change; an untrained VAE does not
    assert row["paths"]["grid"]["correlation"] > 0.9
    assert row["paths"]["grid"]["mae_gy"] < row["paths"]["vae"]["mae_gy"]
    summary = json.loads("\n".join(lines[1:]))
    assert summary["pairs"] == 1
    assert set(summary["paths"]["vae"]) >= {"correlation", "change_ratio", "mae_gy"}
    # the OpenKBP scores of the clinical dose after each path: a perfect DiT's floor
    floor = summary["validation_floor"]
    assert set(floor) == set(dc.PATHS) and floor["grid"]["cases"] == 1
    assert floor["grid"]["dose_score"] < floor["vae"]["dose_score"]
