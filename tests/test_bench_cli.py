"""``dosepilot bench`` on the demo patient with a tiny real model (timings are not asserted)."""

import contextlib
import io
import json

import pytest

from engine.cli import main
from engine.commands.bench_cmd import (
    REFERENCE_GEMM_GFLOPS,
    STAGES,
    _text,
    demo_patient,
    gemm_gflops,
)


@pytest.fixture(scope="module")
def report(tiny_dose_bundle):
    assert (demo_patient() / "RTPLAN.dcm").is_file()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["bench", "--model", str(tiny_dose_bundle), "--runs", "1", "--threads",
                     "1", "--json"])
    assert code == 0
    return json.loads(out.getvalue())


def test_bench_json_has_the_budget_keys_and_the_breakdown(report):
    assert {"preview_s", "predict10_s", "dvh_ms", "plates_ms", "device", "threads",
            "breakdown", "load_average"} <= set(report)
    assert report["device"] == "cpu" and report["threads"] == 1
    assert report["steps"] == 10 and report["runs"] == 1 and report["beams"] == 9
    for key in ("preview_s", "predict10_s", "dvh_ms", "plates_ms", "preview_cpu_s",
                "predict10_cpu_s"):
        assert 0 < report[key] < 1e4
    for kind in ("preview", "predict10"):
        stages = report["breakdown"][kind]
        assert set(stages) == set(STAGES)
        assert stages["dit"] > 0 and stages["decode"] > 0 and stages["encode"] > 0
        assert sum(stages[k] for k in STAGES if k != "total") <= stages["total"] * 1.01
    # the preview runs one DiT step, the prediction ten
    assert report["breakdown"]["predict10"]["dit"] > report["breakdown"]["preview"]["dit"]
    assert 1.0 < report["gemm_gflops"] < 1e4


def test_gemm_rate_is_a_plausible_cpu_figure_and_scales_with_the_work():
    import torch

    threads = torch.get_num_threads()
    rate = gemm_gflops(size=512, repeats=3)
    # any CPU this runs on does between 1 and 10,000 GFLOP/s on one thread in fp32
    assert 1.0 < rate < 1e4
    assert torch.get_num_threads() == threads  # restored


def test_bench_text_output(report):
    text = _text(report)
    for label in ("preview after a beam-angle change", "10-step prediction", "DVH + metrics",
                  "beam + angle plates", "breakdown", "load average", "1 thread(s)",
                  "process CPU time", "GEMM",
                  f"the reference machine: {REFERENCE_GEMM_GFLOPS:.0f}"):
        assert label in text


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--json"]])
def test_missing_default_model_is_a_clear_error(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOSEPILOT_RESOURCES", str(tmp_path))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "no default model is installed" in err and "--model" in err


def test_bad_runs_is_a_clear_error(tiny_dose_bundle, capsys):
    assert main(["bench", "--model", str(tiny_dose_bundle), "--runs", "0"]) == 2
    assert "--runs must be >= 1" in capsys.readouterr().err
