"""Whether a study's ranking is real: rank stability, ranking methods, significance, convention sensitivity.

Bootstrap rank stability, three ranking methods, pairwise significance and convention sensitivity of
one study's per-case results (the analysis of the challengeR toolkit, Wiesenfarth et al., Sci. Rep.
11, 2369, 2021, in numpy/scipy/pandas).

Everything works on a *case matrix*: the per-case values of one dataset × metric × region, one row
per (fold, case) and one column per model (`case_matrix`). Values are oriented so that the rank
direction follows the metric (Dice: higher is better; HD95: lower is better; `stats.higher_is_better`).
A missing value (a case-region the empty-mask rule excluded, or a model without that case) is left
out of that model's mean, ranks last within its case, and drops the pair from a paired test.

- `aggregate_then_rank`: rank of each model's mean (ties share the lowest rank, 1 = best).
- `rank_then_aggregate`: each case ranks the models; models are ranked by their mean per-case rank.
- `test_based_rank`: one-sided Wilcoxon signed-rank test of every ordered pair (Holm-adjusted over
  all of them); a model's score is the number of models it beats significantly.
- `bootstrap_ranks`: the aggregate-then-rank ranking on ≥ 1,000 resamples of cases with replacement,
  paired across models (every model sees the same draw), all resamples at once as one matrix product
  of draw counts (B × cases) with the case matrix; Kendall's τ-b between the full-data ranking and
  each resample's ranking measures how stable the ranking is.
- `convention_ranks`: the ranking under each variant of the data (empty-mask rule, metric
  convention), with the models whose rank changes flagged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from deconver.report import stats as S

#: Rank ties share the lowest rank ("competition" ranking 1, 1, 3), as challengeR's default.
TIES = "min"
N_BOOTSTRAP = 1000
ALPHA = 0.05
METHODS = ("aggregate-then-rank (mean)", "rank-then-aggregate (mean case rank)", "test-based (Wilcoxon wins)")
CASE_KEYS = ["fold", "case"]


# --------------------------------------------------------------------------- inputs
def case_matrix(per_case: pd.DataFrame, dataset: str, metric: str, region: str,
                models: list[str] | None = None, cases: pd.Index | None = None) -> pd.DataFrame:
    """Per-case values of one dataset × metric × region: index (fold, case), one column per model.

    `models` fixes the columns (absent ones are all-NaN), `cases` the rows (so that several metrics and
    regions of a dataset share one bootstrap draw). Non-finite values count as missing.
    """
    d = per_case[(per_case["dataset"] == dataset) & (per_case["metric"] == metric) & (per_case["region"] == region)]
    # the (fold, case) pairs that occur (a pivot table would add every fold × case combination)
    wide = d.groupby(CASE_KEYS + ["model"], sort=True)["value"].first().unstack("model")
    if models is None:
        models = sorted(wide.columns)
    wide = wide.reindex(columns=list(models))
    if cases is not None:
        wide = wide.reindex(cases)
    wide = wide.astype(float)
    return wide.where(np.isfinite(wide.to_numpy()))


def dataset_cases(per_case: pd.DataFrame, dataset: str) -> pd.MultiIndex:
    """Every (fold, case) of a dataset, sorted: the rows the bootstrap resamples."""
    d = per_case.loc[per_case["dataset"] == dataset, CASE_KEYS].drop_duplicates()
    return pd.MultiIndex.from_frame(d.sort_values(CASE_KEYS, kind="stable").astype({"fold": int, "case": str}))


def _better_score(values: np.ndarray, higher_better: bool) -> np.ndarray:
    """Values turned into scores where larger is better; missing → -inf (ranks last)."""
    v = np.asarray(values, dtype=float)
    s = v if higher_better else -v
    return np.where(np.isfinite(s), s, -np.inf)


def rank_scores(values: np.ndarray, higher_better: bool) -> np.ndarray:
    """Ranks along the last axis (1 = best, ties share the lowest rank, missing ranks last)."""
    from scipy.stats import rankdata

    return rankdata(-_better_score(values, higher_better), axis=-1, method=TIES).astype(float)


# --------------------------------------------------------------------------- the three methods
def aggregate_then_rank(x: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean per model over its non-missing cases, and the rank of that mean."""
    mean = x.mean(axis=0, skipna=True).to_numpy(dtype=float)
    return pd.DataFrame({"mean": mean, "rank": rank_scores(mean, S.higher_is_better(metric))}, index=x.columns)


def rank_then_aggregate(x: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean over cases of each model's per-case rank (cases where no model has a value are skipped),
    and the rank of that mean rank (lower mean rank is better)."""
    v = x.to_numpy(dtype=float)
    v = v[np.isfinite(v).any(axis=1)]
    per_case = rank_scores(v, S.higher_is_better(metric)) if len(v) else np.full((0, v.shape[1]), np.nan)
    mean_rank = per_case.mean(axis=0) if len(v) else np.full(v.shape[1], np.nan)
    return pd.DataFrame({"mean_case_rank": mean_rank, "rank": rank_scores(mean_rank, higher_better=False)}, index=x.columns)


def pairwise_tests(x: pd.DataFrame, metric: str, alpha: float = ALPHA,
                   min_n: int = S.MIN_PAIRED_CASES) -> pd.DataFrame:
    """One-sided Wilcoxon signed-rank test of every ordered pair (model, other): is `model` better?

    Differences are taken in the metric's better direction on the cases both models have, rounded as
    in `stats.wilcoxon_paired` (zero differences dropped, Wilcox's method); pairs with fewer than
    `min_n` cases are not tested (NaN p). Holm's correction runs over all tested ordered pairs.
    Returns one row per ordered pair: model, other, n, statistic, p_value, p_holm, significant.
    """
    models = list(x.columns)
    sign = 1.0 if S.higher_is_better(metric) else -1.0
    v = x.to_numpy(dtype=float)
    rows = []
    for i, a in enumerate(models):
        for j, b in enumerate(models):
            if i == j:
                continue
            keep = np.isfinite(v[:, i]) & np.isfinite(v[:, j])
            d = np.round(sign * (v[keep, i] - v[keep, j]), S.DIFF_DECIMALS)
            n, stat, p = int(d.size), math.nan, math.nan
            if n >= min_n:
                if np.all(d == 0):
                    stat, p = 0.0, 1.0
                else:
                    stat, p = S.signed_rank_test(d, "greater")
            rows.append(dict(model=a, other=b, n=n, statistic=stat, p_value=p))
    out = pd.DataFrame(rows, columns=["model", "other", "n", "statistic", "p_value"])
    out["p_holm"] = S.holm(out["p_value"].to_numpy()) if len(out) else []
    out["significant"] = out["p_holm"].lt(alpha)
    return out


def test_based_rank(tests: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """Number of models each model beats significantly (`pairwise_tests`), and the rank by that count."""
    wins = tests[tests["significant"]].groupby("model").size().reindex(models, fill_value=0).to_numpy(dtype=float)
    return pd.DataFrame({"wins": wins, "rank": rank_scores(wins, higher_better=True)}, index=models)


def ranking_methods(x: pd.DataFrame, metric: str, tests: pd.DataFrame | None = None) -> pd.DataFrame:
    """The three rankings side by side: one row per model with each method's score and rank."""
    tests = pairwise_tests(x, metric) if tests is None else tests
    a, r, t = aggregate_then_rank(x, metric), rank_then_aggregate(x, metric), test_based_rank(tests, list(x.columns))
    out = pd.DataFrame({"mean": a["mean"], "rank_mean": a["rank"], "mean_case_rank": r["mean_case_rank"],
                        "rank_case": r["rank"], "wins": t["wins"], "rank_test": t["rank"]})
    out.index.name = "model"
    return out.sort_values(["rank_mean", "rank_case"], kind="stable")


# --------------------------------------------------------------------------- bootstrap
def case_draws(n_cases: int, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """How often each case is drawn in each of `n_boot` resamples of `n_cases` cases with replacement:
    an integer matrix (n_boot, n_cases) whose rows sum to n_cases."""
    if n_cases < 1:
        raise ValueError("the bootstrap needs at least one case")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_cases, size=(n_boot, n_cases))
    flat = idx + n_cases * np.arange(n_boot)[:, None]
    return np.bincount(flat.ravel(), minlength=n_boot * n_cases).reshape(n_boot, n_cases)


def kendall_tau(reference: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Kendall's τ-b between one ranking (m,) and each row of `ranks` (B, m), vectorised over rows
    (the same value as scipy.stats.kendalltau per row; NaN where either ranking is all ties)."""
    r0 = np.asarray(reference, dtype=float)
    r = np.atleast_2d(np.asarray(ranks, dtype=float))
    i, j = np.triu_indices(r0.size, k=1)
    s0 = np.sign(r0[i] - r0[j])
    s = np.sign(r[:, i] - r[:, j])
    denom = np.sqrt(np.count_nonzero(s0) * np.count_nonzero(s, axis=1).astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (s * s0).sum(axis=1) / denom, np.nan)


@dataclass(frozen=True)
class BootstrapRanking:
    """The full-data ranking of one case matrix and its ranking in every bootstrap resample."""

    models: list[str]
    full_rank: np.ndarray  # (m,)
    ranks: np.ndarray      # (B, m)
    tau: np.ndarray        # (B,) Kendall's τ-b of each resample's ranking against full_rank

    def summary(self) -> pd.DataFrame:
        """Per model: full-data rank, median and 95 % interval (2.5th–97.5th percentile) of the
        bootstrap ranks, and the share of resamples in which it ranks first."""
        lo, med, hi = np.percentile(self.ranks, [2.5, 50, 97.5], axis=0)
        return pd.DataFrame({"rank_full": self.full_rank, "rank_median": med, "rank_lo": lo, "rank_hi": hi,
                             "p_first": (self.ranks == 1).mean(axis=0)}, index=pd.Index(self.models, name="model"))

    def frequencies(self) -> pd.DataFrame:
        """Long table: model, rank, share of resamples with that rank (the blob plot's blobs)."""
        rows = [dict(model=m, rank=float(k), share=float(c) / len(self.ranks))
                for col, m in enumerate(self.models)
                for k, c in zip(*np.unique(self.ranks[:, col], return_counts=True))]
        return pd.DataFrame(rows, columns=["model", "rank", "share"])

    def tau_stats(self) -> dict[str, float]:
        """Median and interquartile range of Kendall's τ over the resamples."""
        t = self.tau[np.isfinite(self.tau)]
        if not t.size:
            return dict(tau_median=math.nan, tau_q1=math.nan, tau_q3=math.nan, n_boot=int(self.tau.size))
        q1, med, q3 = np.percentile(t, [25, 50, 75])
        return dict(tau_median=float(med), tau_q1=float(q1), tau_q3=float(q3), n_boot=int(self.tau.size))


def bootstrap_ranks(x: pd.DataFrame, metric: str, draws: np.ndarray | None = None,
                    n_boot: int = N_BOOTSTRAP, seed: int = 0) -> BootstrapRanking:
    """The aggregate-then-rank ranking in each resample of the cases (rows of `x`), paired across models.

    Each resample's means are one row of (draws @ values) / (draws @ present): a missing value weighs
    nothing, as in the full-data mean. `draws` (B, cases) from `case_draws` lets several case matrices
    of one dataset share a draw.
    """
    v = x.to_numpy(dtype=float)
    w = case_draws(len(v), n_boot, seed) if draws is None else np.asarray(draws)
    if w.shape[1] != len(v):
        raise ValueError(f"draws cover {w.shape[1]} cases but the case matrix has {len(v)}")
    present = np.isfinite(v)
    sums = w @ np.where(present, v, 0.0)
    counts = w @ present.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / counts, np.nan)
    full = aggregate_then_rank(x, metric)["rank"].to_numpy()
    ranks = rank_scores(means, S.higher_is_better(metric))
    return BootstrapRanking(list(x.columns), full, ranks, kendall_tau(full, ranks))


def study_bootstrap(per_case: pd.DataFrame, metrics=("dice", "hd95"), regions: dict[str, list[str]] | None = None,
                    n_boot: int = N_BOOTSTRAP, seed: int = 0) -> dict[tuple[str, str, str], BootstrapRanking]:
    """`bootstrap_ranks` of every dataset × metric × region (all regions, or `regions[dataset]`);
    the metrics and regions of one dataset share one draw of its cases."""
    out = {}
    for dataset in sorted(per_case["dataset"].unique()):
        cases = dataset_cases(per_case, dataset)
        d = per_case[per_case["dataset"] == dataset]
        models = sorted(d["model"].unique())
        draws = case_draws(len(cases), n_boot, seed)
        wanted = None if regions is None else set(regions.get(dataset, []))
        for (metric, region) in d[["metric", "region"]].drop_duplicates().itertuples(index=False):
            if metric not in metrics or (wanted is not None and region not in wanted):
                continue
            x = case_matrix(d, dataset, metric, region, models, cases)
            out[(dataset, metric, region)] = bootstrap_ranks(x, metric, draws)
    return out


# --------------------------------------------------------------------------- conventions
RULES = ("penalize", "exclude")
SUITE = "suite"


def rule_variants(per_case: pd.DataFrame, datasets: dict[str, dict], rules=RULES) -> dict[str, pd.DataFrame]:
    """The per-case table re-ruled under each empty-mask rule from its raw values (`with_rule`, the one
    implementation), `mean` regions rebuilt; rule → table. A dataset's own rule gives its table as is.

    `datasets`: aggregate.json's per-dataset entries (rule, penalty). A rule that cannot be applied (a
    diagonal penalty without the `diagonal` column) raises ValueError naming it.
    """
    from deconver.report.aggregate import MEAN_REGION, add_region_mean, with_rule

    out = {}
    for rule in rules:
        parts = []
        for name, g in per_case.groupby("dataset", sort=True):
            meta = datasets.get(name, {})
            if meta.get("rule") == rule:
                parts.append(g)
                continue
            raw = g[g["region"] != MEAN_REGION].assign(value=g["raw_value"]).drop(columns=["raw_value", "status"])
            try:
                ruled = [with_rule(m, rule, meta.get("penalty", "diagonal")) for _, m in raw.groupby("model", sort=True)]
            except ValueError as err:
                raise ValueError(f"dataset {name}: cannot apply the empty-mask rule {rule!r}: {err}") from None
            parts.append(add_region_mean(pd.concat(ruled, ignore_index=True)))
        out[rule] = pd.concat(parts, ignore_index=True)
    return out


def convention_variants(per_case: pd.DataFrame, datasets: dict[str, dict], conventions: pd.DataFrame | None = None,
                        rules=RULES) -> dict[str, pd.DataFrame]:
    """Every variant of the data the study holds, label → per-case table: the suite's rows (`per_case`)
    under each empty-mask rule ("suite, penalize", "suite, exclude"), and each other metric convention
    of `conventions` (aggregate's conventions_per_case.csv: a `convention` column, each convention
    already under its own rule) by its name ("authors", "challenge")."""
    variants = {f"{SUITE}, {rule}": d for rule, d in rule_variants(per_case, datasets, rules).items()}
    if conventions is not None and "convention" in conventions.columns:
        for name in sorted(set(conventions["convention"].dropna().astype(str)) - {SUITE}):
            variants[name] = conventions[conventions["convention"].astype(str) == name]
    return variants


def convention_ranks(variants: dict[str, pd.DataFrame], dataset: str, metric: str, region: str) -> pd.DataFrame:
    """Aggregate-then-rank ranking of one dataset × metric × region under each variant: one row per
    model, a rank column per variant label, `changed` = the rank differs between variants."""
    cols = {}
    for label, d in variants.items():
        x = case_matrix(d, dataset, metric, region)
        if x.shape[1]:
            cols[label] = aggregate_then_rank(x, metric)["rank"]
    out = pd.DataFrame(cols)
    out.index.name = "model"
    out["changed"] = out.nunique(axis=1, dropna=False).gt(1) if len(cols) > 1 else False
    return out.sort_values(list(cols)[:1] or ["changed"], kind="stable")
