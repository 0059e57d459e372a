"""benchmarks/bench_gpu.py in its reduced CPU mode: one JSON line with every section."""

from __future__ import annotations

import json

import torch

from benchmarks import bench_gpu


def test_reduced_run_prints_one_json_line_with_every_figure(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--reduced", "--device", "cpu", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report == {**json.loads(out.read_text()), "elapsed_s": report["elapsed_s"]}
    shipped = report["inference"]["shipped"]["fp32"]
    assert 0 < shipped["preview_s"] < shipped["predict10_s"]
    assert report["inference"]["paper"]["fp32"]["predict10_s"] > 0
    assert report["fastest_precision"]["shipped"]["all"] == "fp32"  # no bf16 on a CPU
    assert report["training"]["shipped"]["batch_2"]["samples_per_s"] > 0
    paper = report["training"]["paper"]
    assert paper["gradient_checkpointing"] and paper["batch_2"]["samples_per_s"] > 0


def test_a_spent_budget_starts_nothing_new(capsys):
    report = bench_gpu.run(reduced=True, budget_s=0.0, out=None, device="cpu")
    assert "inference" not in report
    assert report["training"]["paper"]["batch_1"] == "skipped (time budget)"


def test_fastest_precision_per_component_and_bf16_accuracy():
    results = {"fp32": {"dit_step_s": 0.2, "dose_decode_s": 0.1, "peak_gb": 3.0},
               "bf16": {"dit_step_s": 0.1, "dose_decode_s": 0.3, "peak_gb": 2.0}}
    dose = torch.linspace(0, 1, 100)
    close = bench_gpu.fastest_precision(results, {"fp32": dose, "bf16": dose + 0.01})
    assert close == {"dit_step_s": "bf16", "dose_decode_s": "fp32",
                     "bf16_max_rel_diff": 0.01, "bf16_accurate": True}
    far = bench_gpu.fastest_precision(results, {"fp32": dose, "bf16": dose * 1.1})
    assert not far["bf16_accurate"]
