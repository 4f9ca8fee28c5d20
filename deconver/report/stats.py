"""Paired statistics of a study: Wilcoxon tests, Holm correction, bootstrap CIs and ranks across datasets.

Wilcoxon signed-rank tests against the reference model, Holm correction, bootstrap confidence
intervals of mean Dice, and ranks across datasets.

All functions are pure (DataFrames and arrays in, DataFrames and numbers out) so the tests can check
them on hand-made tables. The per-case table they read is `aggregate/per_case.csv` (after the
empty-mask rule): columns dataset, model, fold, case, region, metric, value.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: The exact two-sided Wilcoxon signed-rank test cannot reach p < 0.05 with fewer paired cases
#: (n = 5: the smallest p is 2/2^5 = 0.0625; n = 6: 2/2^6 = 0.03125).
MIN_PAIRED_CASES = 6
TOO_FEW = "too few cases to conclude"
DIFF_DECIMALS = 12

#: Which direction is better for each metric (anything else: higher is better).
LOWER_IS_BETTER = {"hd95", "hd", "assd", "avd", "volume_difference", "lesion_count_difference",
                   "abs_volume_difference", "abs_lesion_count_difference", "object_hausdorff"}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` is better (Dice, NSD, F1) or worse (HD95, differences)."""
    m = metric.lower()
    return not (m in LOWER_IS_BETTER or m.startswith("hd") or "hausdorff" in m or "difference" in m)


@dataclass(frozen=True)
class WilcoxonResult:
    """One paired comparison: n pairs, the signed-rank statistic (scipy's, min(W+, W-) two-sided),
    the p-value (NaN when there are too few pairs) and the median and mean of the differences x - y."""

    n: int
    statistic: float
    p_value: float
    median_diff: float
    mean_diff: float
    enough: bool


#: Largest sample that scipy's `wilcoxon(method="auto")` tests by enumerating all 2^n sign flips when
#: the differences have ties or zeros (2^13 < its 9,999 resamples); above it, the normal approximation.
EXACT_PERMUTATION_MAX_N = 13


def signed_rank_test(d, alternative: str) -> tuple[float, float]:
    """(statistic, p) of ``scipy.stats.wilcoxon(d, zero_method="wilcox", alternative=alternative,
    method="auto")``, the same numbers, computed faster where scipy enumerates sign flips.

    With ties or zeros among n <= 13 differences scipy runs `permutation_test` over all 2^n sign
    flips with a statistic it evaluates in Python once per flip (a report makes hundreds of such
    tests). The ranks of |d| do not change under a sign flip, so the statistic
    (the sum of the ranks of the positive differences) is vectorised here over the flips and the
    same `permutation_test` does the rest (null distribution, tolerance, two-sided rule). Every
    other case is scipy's `wilcoxon` itself. Tests: tests/test_report_stats.py compares both.
    """
    from scipy.stats import permutation_test, rankdata, wilcoxon

    d = np.asarray(d, dtype=float)
    nonzero = d != 0
    ranks = np.zeros_like(d)
    ranks[nonzero] = rankdata(np.abs(d[nonzero]))  # zeros dropped from the ranking (Wilcox's method)
    ties = len(np.unique(np.abs(d[nonzero]))) < int(nonzero.sum())
    if d.size > EXACT_PERMUTATION_MAX_N or not (ties or not nonzero.all()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns when ties force the normal approximation
            res = wilcoxon(d, zero_method="wilcox", alternative=alternative, method="auto")
        return float(res.statistic), float(res.pvalue)

    def r_plus(x, axis):
        return np.sum((np.moveaxis(x, axis, -1) > 0) * ranks, axis=-1)

    p = permutation_test((d,), r_plus, permutation_type="samples", vectorized=True, alternative=alternative,
                         axis=-1).pvalue
    plus = float(r_plus(d, -1))
    statistic = min(plus, float(ranks.sum()) - plus) if alternative == "two-sided" else plus
    return statistic, float(p)


def wilcoxon_paired(x, y, min_n: int = MIN_PAIRED_CASES) -> WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test of paired samples x, y (NaN pairs dropped).

    With fewer than `min_n` pairs no p-value is computed (it could never be significant) and
    `enough` is False. All-zero differences give statistic 0 and p = 1 (nothing to test).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    # Differences rounded to 1e-12: 0.7 - 0.8 and 0.6 - 0.7 are the same difference (a tie), not two.
    d = np.round(x[keep] - y[keep], DIFF_DECIMALS)
    n = int(d.size)
    med = float(np.median(d)) if n else math.nan
    mean = float(np.mean(d)) if n else math.nan
    if n < min_n:
        return WilcoxonResult(n, math.nan, math.nan, med, mean, False)
    if np.all(d == 0):
        return WilcoxonResult(n, 0.0, 1.0, med, mean, True)
    statistic, p = signed_rank_test(d, "two-sided")
    return WilcoxonResult(n, statistic, p, med, mean, True)


def holm(p_values) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (statsmodels' multipletests); NaN entries stay NaN and are
    not counted in the family size."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=0.05, method="holm")[1]
    return out


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (scipy.stats.bootstrap, fixed seed).

    NaNs are dropped; one value (or identical values) gives the degenerate interval (v, v); no values
    give (NaN, NaN).
    """
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan)
    if v.size == 1 or np.all(v == v[0]):
        return (float(v[0]), float(v[0]))
    res = bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence, batch=1000,
                    method="percentile", vectorized=True, rng=np.random.default_rng(seed))  # batch: bounded memory
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def verdict(result: WilcoxonResult, p_holm: float, metric: str, reference: str, alpha: float = 0.05) -> str:
    """A one-phrase reading of one comparison (model vs reference), in words a table can hold."""
    if not result.enough:
        return f"{TOO_FEW} (n={result.n} < {MIN_PAIRED_CASES})"
    if not np.isfinite(p_holm) or p_holm >= alpha:
        return "no significant difference"
    better = (result.median_diff if result.median_diff != 0 else result.mean_diff) > 0
    if not higher_is_better(metric):
        better = not better
    return f"{'better' if better else 'worse'} than {reference} (Holm p < {alpha:g})"


def paired_tests(per_case: pd.DataFrame, reference: str, metrics=("dice", "hd95"), regions=None,
                 alpha: float = 0.05, min_n: int = MIN_PAIRED_CASES) -> pd.DataFrame:
    """Every model against `reference` on per-case values, per dataset × metric × region.

    Pairs are matched on (fold, case). Holm's correction runs within each (dataset, metric, region)
    family over the comparisons that have enough pairs. Returns one row per comparison: dataset,
    metric, region, model, reference, n, statistic, p_value, p_holm, median_diff, mean_diff, verdict.
    """
    cols = ["dataset", "metric", "region", "model", "reference", "n", "statistic", "p_value", "p_holm",
            "median_diff", "mean_diff", "verdict"]
    rows = []
    df = per_case[per_case["metric"].isin(metrics)]
    if regions is not None:
        df = df[df["region"].isin(regions)]
    for (dataset, metric, region), grp in df.groupby(["dataset", "metric", "region"], sort=True):
        wide = grp.pivot_table(index=["fold", "case"], columns="model", values="value", aggfunc="first", dropna=False)
        if reference not in wide.columns:
            continue
        family = []
        for model in sorted(c for c in wide.columns if c != reference):
            res = wilcoxon_paired(wide[model].to_numpy(), wide[reference].to_numpy(), min_n=min_n)
            family.append((model, res))
        adjusted = holm([r.p_value for _, r in family])
        for (model, res), p_adj in zip(family, adjusted):
            rows.append(dict(dataset=dataset, metric=metric, region=region, model=model, reference=reference,
                             n=res.n, statistic=res.statistic, p_value=res.p_value, p_holm=float(p_adj),
                             median_diff=res.median_diff, mean_diff=res.mean_diff,
                             verdict=verdict(res, float(p_adj), metric, reference, alpha)))
    return pd.DataFrame(rows, columns=cols)


def bootstrap_table(per_case: pd.DataFrame, metric: str = "dice", confidence: float = 0.95,
                    n_resamples: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Mean and bootstrap CI of `metric` per dataset × model × region over all pooled cases."""
    rows = []
    df = per_case[per_case["metric"] == metric]
    for (dataset, model, region), grp in df.groupby(["dataset", "model", "region"], sort=True):
        v = grp["value"].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        low, high = bootstrap_ci(v, confidence, n_resamples, seed)
        rows.append(dict(dataset=dataset, model=model, region=region, metric=metric, n=int(v.size),
                         mean=float(v.mean()) if v.size else math.nan, ci_low=low, ci_high=high,
                         confidence=confidence, n_resamples=n_resamples, seed=seed))
    return pd.DataFrame(rows, columns=["dataset", "model", "region", "metric", "n", "mean", "ci_low", "ci_high",
                                       "confidence", "n_resamples", "seed"])


def rank_table(scores: pd.DataFrame, higher_better: bool = True) -> pd.DataFrame:
    """Ranks of models within each dataset (1 = best, ties share the average rank) and the mean rank.

    `scores`: columns dataset, model, score. Returns one row per model: a rank column per dataset,
    `mean_rank` over the datasets the model was run on, and `n_datasets`; sorted by mean rank.
    """
    if scores.empty:
        return pd.DataFrame(columns=["model", "mean_rank", "n_datasets"])
    wide = scores.pivot_table(index="model", columns="dataset", values="score", aggfunc="first")
    ranks = wide.rank(axis=0, ascending=not higher_better, method="average", na_option="keep")
    out = ranks.copy()
    out.columns = [str(c) for c in out.columns]
    out["mean_rank"] = ranks.mean(axis=1, skipna=True)
    out["n_datasets"] = ranks.notna().sum(axis=1)
    out = out.reset_index().sort_values(["mean_rank", "model"], kind="stable").reset_index(drop=True)
    return out
