"""Benchmark scores on small hand-computed examples, and the paired statistics."""

from __future__ import annotations

import numpy as np
import pytest

from engine.metrics.scores import (
    CaseScore,
    compare_paired,
    gdp_hmm_benchmark,
    gdp_hmm_mae,
    openkbp_benchmark,
    openkbp_case_score,
    openkbp_dose_score,
    openkbp_dvh_metrics,
)


def test_openkbp_dose_score_sums_the_whole_volume_over_the_mask_count() -> None:
    ref = np.array([[0.0, 10.0], [20.0, 30.0]])
    pred = np.array([[2.0, 10.0], [17.0, 30.0]])  # |diff| = 2 outside the mask, 3 inside
    mask = np.array([[False, False], [True, True]])
    assert openkbp_dose_score(ref, pred, mask) == pytest.approx((2 + 3) / 2)


def test_openkbp_dose_score_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        openkbp_dose_score(np.zeros(3), np.zeros(4), np.ones(3, bool))
    with pytest.raises(ValueError, match="empty"):
        openkbp_dose_score(np.zeros(3), np.zeros(3), np.zeros(3, bool))


def test_openkbp_oar_metrics_use_voxel_count_percentiles() -> None:
    dose = np.arange(1.0, 11.0)  # an OAR of 10 voxels with doses 1..10 Gy
    mask = np.ones(10, bool)
    # 5 x 5 x 4 mm = 100 mm^3: 0.1 cc is 1 voxel -> percentile 100 - 1/10*100 = 90 -> 9.1 Gy
    m = openkbp_dvh_metrics(dose, {"SpinalCord": mask}, (5.0, 5.0, 4.0))
    assert m[("D_0.1_cc", "SpinalCord")] == pytest.approx(9.1)
    assert m[("mean", "SpinalCord")] == pytest.approx(5.5)
    # 2 x 2 x 5 mm = 20 mm^3: 0.1 cc is round(5) = 5 voxels -> percentile 50 -> 5.5 Gy
    m = openkbp_dvh_metrics(dose, {"SpinalCord": mask}, (2.0, 2.0, 5.0))
    assert m[("D_0.1_cc", "SpinalCord")] == pytest.approx(5.5)
    # big voxels: never fewer than 1 voxel -> percentile 90 again
    m = openkbp_dvh_metrics(dose, {"SpinalCord": mask}, (10.0, 10.0, 10.0))
    assert m[("D_0.1_cc", "SpinalCord")] == pytest.approx(9.1)


def test_openkbp_target_metrics_and_missing_rois() -> None:
    dose = np.arange(0.0, 101.0)  # 101 voxels, doses 0..100 Gy
    masks = {"PTV70": np.ones(101, bool), "Larynx": np.zeros(101, bool), "Body": np.ones(101,
                                                                                         bool)}
    m = openkbp_dvh_metrics(dose, masks, (4.0, 4.0, 2.5))
    assert m == {("D_99", "PTV70"): 1.0, ("D_95", "PTV70"): 5.0, ("D_1", "PTV70"): 99.0}


def test_openkbp_dvh_score_pools_all_metric_differences() -> None:
    masks = {"Brainstem": np.array([True, True, False, False]),
             "PTV70": np.array([False, False, True, True])}
    ref = np.array([10.0, 20.0, 70.0, 70.0])
    a = openkbp_case_score("pt_1", ref, ref + np.array([0.0, 0.0, 3.0, 3.0]), masks,
                           np.ones(4, bool), (5.0, 5.0, 4.0))
    assert a.dvh_errors == {("D_0.1_cc", "Brainstem"): 0.0, ("mean", "Brainstem"): 0.0,
                            ("D_99", "PTV70"): 3.0, ("D_95", "PTV70"): 3.0,
                            ("D_1", "PTV70"): 3.0}
    assert a.dose_score == pytest.approx(6.0 / 4)
    b = openkbp_case_score("pt_2", ref, ref + 1.0, {"Brainstem": masks["Brainstem"]},
                           np.ones(4, bool), (5.0, 5.0, 4.0))
    assert b.dvh_score == pytest.approx(1.0)
    total = openkbp_benchmark([a, b])
    # 7 metric differences pooled: (0 + 0 + 3 + 3 + 3 + 1 + 1) / 7, not the mean of case means
    assert total.dvh_score == pytest.approx(11.0 / 7)
    assert total.dose_score == pytest.approx((1.5 + 1.0) / 2)


def test_gdp_hmm_mae_by_hand() -> None:
    # 1-D "plan": voxels 0-3 PTV (raw dose 35, dose_scale 2 -> 70 Gy = prescription), voxel 4 at
    # 3 Gy (below 5 in the reference), voxel 5 outside the body
    raw = np.array([35.0, 35.0, 35.0, 35.0, 1.5, 40.0])
    body = np.array([1, 1, 1, 1, 1, 0])
    ptv = np.array([1, 1, 1, 1, 0, 0])
    pred = np.array([68.0, 70.0, 71.0, 70.0, 9.0, 0.0])
    scale = 70.0 / (70.0 + 1e-5)
    ref = raw * 2.0 * scale
    expected = (abs(ref[0] - 68) + abs(ref[1] - 70) + abs(ref[2] - 71) + abs(ref[3] - 70)
                + abs(ref[4] - 9)) / 4  # voxel 4 counts (pred > 5), denominator: ref > 5 only
    assert gdp_hmm_mae(pred, raw, body, ptv, 70.0, dose_scale=2.0) == pytest.approx(expected)


def test_gdp_hmm_mae_normalises_the_reference_to_d97() -> None:
    rng = np.random.default_rng(0)
    ref = rng.uniform(60, 80, size=1000)
    body = np.ones(1000)
    ptv = np.ones(1000)
    scaled = ref * 70.0 / (np.percentile(ref, 3) + 1e-5)
    assert gdp_hmm_mae(scaled, ref, body, ptv, 70.0) == pytest.approx(0.0, abs=1e-9)
    assert gdp_hmm_mae(ref, ref, body, ptv, 70.0) > 1.0
    with pytest.raises(ValueError, match="PTV mask is empty"):
        gdp_hmm_mae(ref, ref, body, np.zeros(1000), 70.0)


def test_gdp_hmm_benchmark_is_the_plan_mean() -> None:
    result = gdp_hmm_benchmark([CaseScore("a", 2.0), CaseScore("b", 3.0)])
    assert result.dose_score == 2.5 and result.dvh_score is None


def test_paired_tests_by_hand() -> None:
    r = compare_paired([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    # t = mean / (sd / sqrt(n)) = 3 / (1.5811 / 2.2361); Wilcoxon: all 5 differences positive,
    # W- = 0, exact two-sided p = 2 / 2^5
    assert r.t_statistic == pytest.approx(3 / (np.sqrt(2.5) / np.sqrt(5)))
    assert r.wilcoxon_statistic == 0.0
    assert r.wilcoxon_pvalue == pytest.approx(2 / 32)
    assert r.mean_difference == 3.0 and r.n == 5
    same = compare_paired([1.0, 2.0], [1.0, 2.0])
    assert same.t_pvalue == 1.0 and same.wilcoxon_pvalue == 1.0
    assert np.isnan(compare_paired([1.0], [2.0]).t_pvalue)
    with pytest.raises(ValueError, match="equal counts"):
        compare_paired([1.0, 2.0], [1.0])


def test_openkbp_tiny_roi_reads_its_minimum() -> None:
    # 0.1 cc = 12 voxels of 8 mm^3 but the ROI has 2: the percentile clips to 0 (its minimum)
    m = openkbp_dvh_metrics(np.array([10.0, 20.0]), {"Larynx": np.ones(2, bool)}, (2, 2, 2))
    assert m[("D_0.1_cc", "Larynx")] == 10.0
