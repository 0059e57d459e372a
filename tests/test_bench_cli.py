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
    memory_bandwidth_gbs,
    peer_figures,
)


@pytest.fixture(scope="module")
def report(tiny_dose_bundle):
    assert (demo_patient() / "RTPLAN.dcm").is_file()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["bench", "--model", str(tiny_dose_bundle), "--runs", "1", "--threads",
                     "1", "--json", "--no-peers"])
    assert code == 0
    return json.loads(out.getvalue())


def test_bench_json_has_the_budget_keys_and_the_breakdown(report):
    assert {"preview_s", "predict10_s", "dvh_ms", "plates_ms", "device", "threads",
            "breakdown", "load_average"} <= set(report)
    assert report["device"] == "cpu" and report["threads"] == 1
    assert report["steps"] == 10 and report["runs"] == 1 and report["beams"] == 9
    for key in ("preview_s", "predict10_s", "dvh_ms", "plates_ms", "preview_cpu_s",
                "predict10_cpu_s", "preview_first_s", "predict10_first_s"):
        assert 0 < report[key] < 1e4
    for kind in ("preview", "predict10"):
        stages = report["breakdown"][kind]
        assert set(stages) == set(STAGES)
        assert stages["dit"] > 0 and stages["decode"] > 0 and stages["encode"] > 0
        assert sum(stages[k] for k in STAGES if k != "total") <= stages["total"] * 1.01
    # the preview runs one DiT step, the prediction ten
    assert report["breakdown"]["predict10"]["dit"] > report["breakdown"]["preview"]["dit"]
    assert 1.0 < report["reference_gflops"] < 1e4 and 0.1 < report["reference_membw_gbs"] < 1e4
    scale = report["reference_gflops"] / REFERENCE_GEMM_GFLOPS
    assert report["preview_norm_s"] == pytest.approx(report["preview_s"] * scale)
    assert report["predict10_norm_s"] == pytest.approx(report["predict10_s"] * scale)
    assert report["mednext_s"] is None and report["peers_note"] == "skipped (--no-peers)"


def test_gemm_rate_is_a_plausible_cpu_figure_and_scales_with_the_work():
    import torch

    threads = torch.get_num_threads()
    rate = gemm_gflops(size=512, repeats=3)
    # any CPU this runs on does between 1 and 10,000 GFLOP/s on one thread in fp32
    assert 1.0 < rate < 1e4
    assert torch.get_num_threads() == threads  # restored


def test_memory_bandwidth_is_plausible_and_restores_threads():
    import torch

    threads = torch.get_num_threads()
    assert 0.1 < memory_bandwidth_gbs(megabytes=64, repeats=2) < 1e4
    assert torch.get_num_threads() == threads


def test_mednext_peer_runs_and_gives_the_speed_ups():
    pytest.importorskip("monai", reason="the MedNeXt peer needs MONAI (dosepilot[bench])")
    report = {"preview_s": 0.01, "predict10_s": 0.1}
    peer = peer_figures(report, runs=1, peers=True, grid=(16, 32, 32))
    assert peer["mednext_s"] > 0
    assert peer["preview_vs_mednext"] == pytest.approx(peer["mednext_s"] / 0.01)
    assert peer["predict10_vs_mednext"] == pytest.approx(peer["mednext_s"] / 0.1)
    assert "MedNeXt-B (MONAI), 1 x 8 x 16 x 32 x 32" in peer["peers_note"]
    assert "peer MedNeXt-B forward" in _text({**_fake_text_report(), **peer})


def _fake_text_report() -> dict:
    stages = dict.fromkeys(STAGES, 0.1)
    return {"device": "cpu", "threads": 1, "runs": 1, "structures": 3, "beams": 9, "steps": 10,
            "preview_s": 0.01, "predict10_s": 0.1, "preview_cpu_s": 0.01, "predict10_cpu_s": 0.1,
            "preview_first_s": 0.02, "predict10_first_s": 0.2,
            "reference_gflops": 69.0, "reference_membw_gbs": 10.0, "preview_norm_s": 0.01,
            "predict10_norm_s": 0.1, "dvh_ms": 1.0, "plates_ms": 1.0,
            "breakdown": {"preview": stages, "predict10": stages}, "load_average": None}


def test_bench_text_output(report):
    text = _text(report)
    for label in ("preview after a beam-angle change", "10-step prediction", "the case's first",
                  "DVH + metrics",
                  "beam + angle plates", "breakdown", "load average", "1 thread(s)",
                  "process CPU time", "GEMM", "scaled to the reference machine",
                  "peer MedNeXt: skipped (--no-peers)",
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
