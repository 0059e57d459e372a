"""Published benchmark scores, computed exactly as their organisers compute them.

* **OpenKBP** (Babier et al., Med. Phys. 48:5549, 2021; code ``ababier/open-kbp``,
  ``provided_code/dose_evaluation_class.py``):

  - dose score of a patient = ``sum(|ref - pred|) / count(possible dose mask)``, the sum over
    the *whole* 128³ volume (not only inside the mask); the benchmark is the mean over patients;
  - DVH metrics on voxel doses with ``numpy.percentile`` (linear interpolation): for OARs
    D_0.1cc = percentile at ``100 - v / n * 100`` with ``v = max(1, round(100 / voxel mm³))``
    voxels and ``n`` the ROI's voxel count (clipped at 0 for ROIs under 0.1 cc, where the
    original code raises), and the mean dose; for targets D99, D95, D1 =
    percentiles 1, 5 and 99; an ROI counts when its mask has any voxel;
  - DVH score = mean of ``|ref metric - pred metric|`` over *all* (patient, metric) pairs
    that exist (the organisers' ``nanmean`` over the whole table).

* **GDP-HMM** (AAPM 2025, ``RiqiangGao/GDP-HMM_AAPMChallenge`` ``evaluation.ipynb``): per plan,
  the reference is scaled so that D97 of the high-dose PTV equals its prescription, then
  ``MAE = sum(|ref - pred| over (ref > 5 | pred > 5) & body) / count((ref > 5) & body)``;
  the benchmark is the mean over plans.

All doses in Gy. Plus paired t and Wilcoxon signed-rank tests for comparing two models case by
case (scipy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

OPENKBP_OARS: tuple[str, ...] = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid",
                                 "Esophagus", "Larynx", "Mandible")
OPENKBP_TARGETS: tuple[str, ...] = ("PTV56", "PTV63", "PTV70")
OPENKBP_OAR_METRICS: tuple[str, ...] = ("D_0.1_cc", "mean")
OPENKBP_TARGET_METRICS: tuple[str, ...] = ("D_99", "D_95", "D_1")


def openkbp_dose_score(reference: np.ndarray, prediction: np.ndarray,
                       possible_dose_mask: np.ndarray) -> float:
    """One patient's OpenKBP dose score: sum |ref - pred| over the volume / mask voxel count."""
    ref = np.asarray(reference, dtype=np.float64)
    pred = np.asarray(prediction, dtype=np.float64)
    if ref.shape != pred.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    count = int(np.count_nonzero(possible_dose_mask))
    if count == 0:
        raise ValueError("the possible-dose mask is empty")
    return float(np.sum(np.abs(ref - pred)) / count)


def openkbp_dvh_metrics(dose: np.ndarray, masks: Mapping[str, np.ndarray],
                        voxel_mm: Iterable[float]) -> dict[tuple[str, str], float]:
    """OpenKBP DVH metrics of one dose: ``{(metric, roi): value}`` for ROIs that have voxels.

    Args:
        dose: dose in Gy.
        masks: ROI name -> bool mask on the dose grid (OpenKBP names, others are ignored).
        voxel_mm: voxel dimensions in mm (their product is the voxel volume).
    """
    flat = np.asarray(dose, dtype=np.float64)
    voxel_mm3 = float(np.prod(np.asarray(list(voxel_mm), dtype=np.float64)))
    voxels_in_tenth_of_cc = max(1.0, float(np.round(100.0 / voxel_mm3)))
    out: dict[tuple[str, str], float] = {}
    for roi in (*OPENKBP_OARS, *OPENKBP_TARGETS):
        mask = masks.get(roi)
        if mask is None or not np.any(mask):
            continue
        roi_dose = flat[np.asarray(mask, dtype=bool)]
        if roi in OPENKBP_OARS:
            # the organisers' formula; clipped only where theirs would raise (ROI < 0.1 cc)
            fraction = max(0.0, 100.0 - voxels_in_tenth_of_cc / len(roi_dose) * 100.0)
            out[("D_0.1_cc", roi)] = float(np.percentile(roi_dose, fraction))
            out[("mean", roi)] = float(roi_dose.mean())
        else:
            out[("D_99", roi)] = float(np.percentile(roi_dose, 1))
            out[("D_95", roi)] = float(np.percentile(roi_dose, 5))
            out[("D_1", roi)] = float(np.percentile(roi_dose, 99))
    return out


@dataclass(frozen=True)
class CaseScore:
    """One case's scores.

    ``dose_score`` is the OpenKBP dose score or the GDP-HMM MAE (Gy). ``dvh_score`` is the mean
    absolute DVH-metric difference of this case (OpenKBP only, else None); ``dvh_errors`` holds
    the case's per-metric absolute differences ``{(metric, roi): Gy}``.
    """

    case: str
    dose_score: float
    dvh_score: float | None = None
    dvh_errors: Mapping[tuple[str, str], float] | None = None


@dataclass(frozen=True)
class BenchmarkScore:
    """Scores over a set of cases: the benchmark figures and the rows they came from."""

    benchmark: str
    dose_score: float
    dvh_score: float | None
    cases: tuple[CaseScore, ...]


def openkbp_case_score(case: str, reference: np.ndarray, prediction: np.ndarray,
                       masks: Mapping[str, np.ndarray], possible_dose_mask: np.ndarray,
                       voxel_mm: Iterable[float]) -> CaseScore:
    """Dose score and DVH-metric differences of one OpenKBP patient."""
    voxel_mm = tuple(voxel_mm)
    ref_metrics = openkbp_dvh_metrics(reference, masks, voxel_mm)
    pred_metrics = openkbp_dvh_metrics(prediction, masks, voxel_mm)
    errors = {k: abs(ref_metrics[k] - pred_metrics[k]) for k in ref_metrics}
    return CaseScore(case=case,
                     dose_score=openkbp_dose_score(reference, prediction, possible_dose_mask),
                     dvh_score=float(np.mean(list(errors.values()))) if errors else None,
                     dvh_errors=errors)


def openkbp_benchmark(cases: Iterable[CaseScore]) -> BenchmarkScore:
    """The OpenKBP dose score (mean over patients) and DVH score (mean over all metrics)."""
    cases = tuple(cases)
    if not cases:
        raise ValueError("no cases to score")
    errors = [e for c in cases for e in (c.dvh_errors or {}).values()]
    return BenchmarkScore("openkbp", float(np.mean([c.dose_score for c in cases])),
                          float(np.mean(errors)) if errors else None, cases)


def gdp_hmm_mae(prediction_gy: np.ndarray, reference: np.ndarray, body: np.ndarray,
                ptv_high: np.ndarray, prescription_gy: float, dose_scale: float = 1.0) -> float:
    """GDP-HMM leaderboard MAE of one plan, Gy.

    Args:
        prediction_gy: predicted dose in Gy on the plan's npz grid.
        reference: the npz ``dose`` array (multiplied by ``dose_scale`` to give Gy).
        body: the npz ``Body`` mask.
        ptv_high: mask of the high-dose PTV (``PTVHighOPT`` for head-and-neck, ``PTV`` for lung).
        prescription_gy: the high PTV's prescription (``PTV_DICT[pid]["PTV_High"]["PDose"]``).
        dose_scale: the npz ``dose_scale``.
    """
    pred = np.asarray(prediction_gy, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64) * float(dose_scale)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    ptv = np.asarray(ptv_high) > 0
    if not ptv.any():
        raise ValueError("the high-dose PTV mask is empty")
    ref = ref * (float(prescription_gy) / (np.percentile(ref[ptv], 3) + 1e-5))
    inside = np.asarray(body) > 0
    union = ((ref > 5) | (pred > 5)) & inside
    ref_region = (ref > 5) & inside
    count = int(np.count_nonzero(ref_region))
    if count == 0:
        raise ValueError("no body voxel receives more than 5 Gy in the reference")
    return float(np.sum(np.abs(ref - pred)[union]) / count)


def gdp_hmm_benchmark(cases: Iterable[CaseScore]) -> BenchmarkScore:
    """The GDP-HMM score: mean of the per-plan MAEs."""
    cases = tuple(cases)
    if not cases:
        raise ValueError("no cases to score")
    return BenchmarkScore("gdp-hmm", float(np.mean([c.dose_score for c in cases])), None, cases)


@dataclass(frozen=True)
class PairedComparison:
    """Two models' per-case scores compared (``a - b``; lower scores are better for errors)."""

    n: int
    mean_a: float
    mean_b: float
    mean_difference: float
    t_statistic: float
    t_pvalue: float
    wilcoxon_statistic: float
    wilcoxon_pvalue: float


def compare_paired(a: Iterable[float], b: Iterable[float]) -> PairedComparison:
    """Paired t-test and Wilcoxon signed-rank test of per-case scores of two models.

    Both tests are two-sided. With all differences zero the p-values are 1.0; with fewer than
    two cases they are NaN.
    """
    x = np.asarray(list(a), dtype=np.float64)
    y = np.asarray(list(b), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need equal counts, got {len(x)} and {len(y)}")
    n = len(x)
    nan = float("nan")
    if n < 2:
        return PairedComparison(n, float(np.mean(x)) if n else nan,
                                float(np.mean(y)) if n else nan,
                                float(np.mean(x - y)) if n else nan, nan, nan, nan, nan)
    diff = x - y
    if np.all(diff == 0):
        t_stat, t_p, w_stat, w_p = 0.0, 1.0, 0.0, 1.0
    else:
        from scipy import stats  # scipy.stats costs ~1 s to import: only when comparing

        t = stats.ttest_rel(x, y)
        w = stats.wilcoxon(x, y)
        t_stat, t_p, w_stat, w_p = (float(t.statistic), float(t.pvalue), float(w.statistic),
                                    float(w.pvalue))
    return PairedComparison(n, float(x.mean()), float(y.mean()), float(diff.mean()),
                            t_stat, t_p, w_stat, w_p)
