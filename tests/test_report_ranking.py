"""Ranking analysis of the report (deconver.report.ranking) on constructed per-case tables whose
rankings, rank stability and significance are known by construction."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from deconver.report import ranking as R


def long_table(values: dict[str, np.ndarray], metric: str = "dice", dataset: str = "d", region: str = "r") -> pd.DataFrame:
    """A per_case.csv-like long table from {model: per-case values} (cases c000…, fold 0)."""
    rows = []
    for model, v in values.items():
        for k, x in enumerate(v):
            rows.append(dict(dataset=dataset, model=model, fold=0, case=f"c{k:03d}", region=region, metric=metric,
                             value=float(x)))
    return pd.DataFrame(rows)


def clear_winner(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Four models 0.1 Dice apart with per-case noise sd 0.02: the order a > b > c > e is certain."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 0.6, n)
    return long_table({m: base + off + rng.normal(0, 0.02, n) for m, off in
                       (("a", 0.3), ("b", 0.2), ("c", 0.1), ("e", 0.0))})


# --------------------------------------------------------------------------- building blocks
def test_case_draws_are_resamples_with_replacement():
    w = R.case_draws(50, 2000, seed=1)
    assert w.shape == (2000, 50) and w.dtype.kind == "i"
    assert (w.sum(axis=1) == 50).all()
    # each case is drawn Binomial(50, 1/50) times: mean 1, variance 49/50
    assert w.mean() == pytest.approx(1.0) and w.var() == pytest.approx(49 / 50, rel=0.05)
    assert (R.case_draws(50, 10, seed=1) == R.case_draws(50, 10, seed=1)).all()


def test_kendall_tau_matches_scipy_per_row_with_ties():
    rng = np.random.default_rng(2)
    ref = np.array([1, 2, 2, 4, 5], dtype=float)
    ranks = rng.integers(1, 6, size=(200, 5)).astype(float)
    ours = R.kendall_tau(ref, ranks)
    for row, t in zip(ranks, ours):
        expected = kendalltau(ref, row).statistic
        assert (math.isnan(t) and math.isnan(expected)) or t == pytest.approx(expected, abs=1e-12)
    assert R.kendall_tau(ref, ref[None])[0] == pytest.approx(1.0)
    # a tie in one ranking only: 9 of 10 pairs concordant, tau-b = 9 / sqrt(9 * 10)
    assert R.kendall_tau(ref, np.array([[1.0, 2, 3, 4, 5]]))[0] == pytest.approx(9 / math.sqrt(9 * 10))
    assert R.kendall_tau(ref, ref[None][:, ::-1])[0] < 0


def test_bootstrap_means_equal_explicit_resampling_with_missing_values():
    rng = np.random.default_rng(4)
    x = pd.DataFrame(rng.uniform(size=(30, 3)), columns=["a", "b", "c"])
    x.iloc[[2, 5, 11], 1] = np.nan  # excluded case-regions weigh nothing
    draws = R.case_draws(30, 40, seed=9)
    boot = R.bootstrap_ranks(x, "hd95", draws)
    for b in range(40):
        idx = np.repeat(np.arange(30), draws[b])  # the same resample as a list of case indices
        means = x.iloc[idx].mean(axis=0, skipna=True).to_numpy()
        np.testing.assert_array_equal(boot.ranks[b], R.rank_scores(means, higher_better=False))


def test_case_matrix_pairs_cases_across_models_by_fold_and_case():
    d = pd.DataFrame(dict(dataset="d", model=["a", "b", "a", "b", "a"], fold=[0, 0, 1, 1, 1], case=["x", "x", "y", "y", "z"],
                          region="r", metric="dice", value=[0.5, 0.6, np.nan, 0.7, 0.9]))
    x = R.case_matrix(d, "d", "dice", "r")
    assert x.index.tolist() == [(0, "x"), (1, "y"), (1, "z")]  # observed pairs only, not every fold × case
    assert x.loc[(1, "z"), "a"] == 0.9 and np.isnan(x.loc[(1, "z"), "b"]) and np.isnan(x.loc[(1, "y"), "a"])
    assert R.dataset_cases(d, "d").tolist() == x.index.tolist()


def test_lower_is_better_for_hd95_and_missing_ranks_last():
    x = pd.DataFrame({"a": [1.0, 2.0], "b": [5.0, 6.0], "c": [np.nan, np.nan]})
    assert R.aggregate_then_rank(x, "hd95")["rank"].tolist() == [1.0, 2.0, 3.0]
    assert R.aggregate_then_rank(x, "dice")["rank"].tolist() == [2.0, 1.0, 3.0]
    # ties share the lowest rank
    assert R.rank_scores(np.array([0.5, 0.7, 0.5]), higher_better=True).tolist() == [2.0, 1.0, 2.0]


# --------------------------------------------------------------------------- goals of the issue
def test_clear_winner_gives_tau_near_one_and_narrow_blobs():
    per_case = clear_winner()
    boot = R.study_bootstrap(per_case, metrics=("dice",), n_boot=1000, seed=0)[("d", "dice", "r")]
    assert boot.ranks.shape == (1000, 4)
    assert boot.full_rank.tolist() == [1.0, 2.0, 3.0, 4.0]
    tau = boot.tau_stats()
    assert tau["tau_median"] == pytest.approx(1.0) and tau["tau_q1"] == pytest.approx(1.0)
    s = boot.summary()
    assert s.loc["a", "p_first"] == 1.0
    assert (s["rank_lo"] == s["rank_hi"]).all()  # every blob is a single point
    freq = boot.frequencies()
    assert len(freq) == 4 and freq["share"].eq(1.0).all()


def test_two_tied_models_have_overlapping_blobs_and_lower_tau():
    rng = np.random.default_rng(5)
    n = 60
    b = rng.uniform(0.6, 0.9, n)
    # b and c: the same values in another case order (c 1e-4 higher, so the full data ranks c 2nd, b 3rd)
    per_case = long_table({"a": b + 0.2, "b": b, "c": rng.permutation(b) + 1e-4, "e": b - 0.3})
    boot = R.study_bootstrap(per_case, metrics=("dice",), n_boot=1000, seed=0)[("d", "dice", "r")]
    s = boot.summary()
    # b and c swap ranks 2 and 3 across resamples: both intervals span [2, 3], both blobs have two sizes
    assert s.loc["b", "rank_lo"] == s.loc["c", "rank_lo"] == 2.0
    assert s.loc["b", "rank_hi"] == s.loc["c", "rank_hi"] == 3.0
    assert boot.full_rank.tolist() == [1.0, 3.0, 2.0, 4.0]
    share_b2 = float((boot.ranks[:, 1] == 2).mean())
    assert 0.25 < share_b2 < 0.75
    # a and e never move
    assert s.loc["a", "rank_lo"] == s.loc["a", "rank_hi"] == 1.0 and s.loc["e", "rank_lo"] == 4.0
    tau = boot.tau_stats()
    # τ is 1 when b, c keep their full-data order and 4/6 when they swap (one discordant pair of six)
    assert set(np.round(boot.tau, 6)) <= {1.0, round(4 / 6, 6)}
    assert tau["tau_q1"] == pytest.approx(4 / 6) and tau["tau_q3"] == pytest.approx(1.0)
    # neither tied model beats the other in the pairwise tests; a beats everybody
    x = R.case_matrix(per_case, "d", "dice", "r")
    t = R.pairwise_tests(x, "dice").set_index(["model", "other"])
    assert not t.loc[("b", "c"), "significant"] and not t.loc[("c", "b"), "significant"]
    assert t.loc[[("a", o) for o in "bce"], "significant"].all()
    m = R.ranking_methods(x, "dice", t)
    assert m.loc["a", "wins"] == 3 and m.loc["b", "wins"] == m.loc["c", "wins"] == 1 and m.loc["e", "wins"] == 0
    assert m.loc["b", "rank_test"] == m.loc["c", "rank_test"] == 2.0


def test_rule_change_that_flips_a_rank_is_flagged():
    # HD95 (mm): model a is 1 mm better than b on every detected case but misses the lesion (empty
    # prediction) in 5 of 40 cases. Penalize (penalty 50 mm) puts a behind b; exclude drops the misses
    # and puts a ahead. Model c is far behind under both rules (its rank does not change).
    rng = np.random.default_rng(6)
    n = 40
    base = rng.uniform(3, 6, n)
    rows = []
    for model, v in (("a", base), ("b", base + 1.0), ("c", base + 30.0)):
        for k in range(n):
            miss = model == "a" and k < 5
            rows.append(dict(dataset="d", model=model, fold=0, case=f"c{k:03d}", region="r", metric="hd95",
                             value=math.inf if miss else v[k], gt_empty=False, pred_empty=miss))
    raw = pd.DataFrame(rows)
    from deconver.report.aggregate import with_rule

    meta = {"d": dict(rule="penalize", penalty=50.0)}
    own = pd.concat([with_rule(g, "penalize", 50.0) for _, g in raw.groupby("model")], ignore_index=True)
    variants = R.rule_variants(own, meta)
    assert list(variants) == ["penalize", "exclude"]
    assert variants["exclude"]["value"].isna().sum() == 5  # the misses are excluded, kept as NaN
    ranks = R.convention_ranks(variants, "d", "hd95", "r")
    assert ranks.loc["a"].tolist()[:2] == [2.0, 1.0] and ranks.loc["b"].tolist()[:2] == [1.0, 2.0]
    assert ranks["changed"].to_dict() == {"a": True, "b": True, "c": False}
    # Dice is not touched by the rule here (no Dice rows): a variant set with one label flags nothing
    one = R.convention_ranks({"penalize": variants["penalize"]}, "d", "hd95", "r")
    assert not one["changed"].any()


def test_metric_conventions_join_the_rule_variants():
    per_case = clear_winner(n=10)
    per_case = per_case.assign(raw_value=per_case["value"], status="measured", gt_empty=False, pred_empty=False)
    # conventions_per_case.csv: the suite's rows again plus an 'authors' convention in which e is best
    authors = per_case.assign(convention="authors", value=np.where(per_case["model"] == "e", 1.0, per_case["value"]))
    conventions = pd.concat([per_case.assign(convention="suite"), authors], ignore_index=True)
    variants = R.convention_variants(per_case, {"d": dict(rule="penalize", penalty="diagonal")}, conventions)
    assert list(variants) == ["suite, penalize", "suite, exclude", "authors"]
    ranks = R.convention_ranks(variants, "d", "dice", "r")
    assert ranks["suite, penalize"].to_dict() == ranks["suite, exclude"].to_dict() == {"a": 1, "b": 2, "c": 3, "e": 4}
    assert ranks["authors"].to_dict() == {"a": 2, "b": 3, "c": 4, "e": 1}
    assert ranks["changed"].all()  # e jumps to first, everyone else moves down one
    # without a conventions table: the rules only
    assert list(R.convention_variants(per_case, {"d": dict(rule="penalize")})) == ["suite, penalize", "suite, exclude"]


def test_rank_then_aggregate_differs_from_aggregate_then_rank_when_one_case_is_catastrophic():
    # a beats b by 0.01 on 19 of 20 cases and fails completely on one: the mean prefers b, the
    # per-case ranks prefer a (mean case rank 1.05 vs 1.95)
    b = np.full(20, 0.80)
    a = b + 0.01
    a[0] = 0.0
    x = R.case_matrix(long_table({"a": a, "b": b}), "d", "dice", "r")
    m = R.ranking_methods(x, "dice")
    assert m.loc["a", "rank_mean"] == 2.0 and m.loc["b", "rank_mean"] == 1.0
    assert m.loc["a", "mean_case_rank"] == pytest.approx(1.05) and m.loc["a", "rank_case"] == 1.0
    # one-sided Wilcoxon of a > b: 19 tied differences +0.01 (ranks 1..19, average 10) and one -0.8
    # (rank 20): W+ = 190 of 210; b > a has W+ = 20. The test-based ranking sides with the per-case ranks.
    t = R.pairwise_tests(x, "dice").set_index(["model", "other"])
    assert t.loc[("a", "b"), "statistic"] == 190 and t.loc[("b", "a"), "statistic"] == 20
    assert t.loc[("a", "b"), "p_holm"] < 0.01 and t.loc[("b", "a"), "p_holm"] > 0.9
    assert m.loc["a", "rank_test"] == 1.0 and m.loc["b", "rank_test"] == 2.0


def test_one_sided_exact_p_and_holm_by_hand():
    # six cases, a better than b on all: exact one-sided p = 1/2^6; b better than a: p = 1;
    # Holm over the two ordered pairs: 2/64 and 1
    x = pd.DataFrame({"a": np.arange(1.0, 7.0), "b": np.zeros(6)})
    t = R.pairwise_tests(x, "hd95").set_index(["model", "other"])  # lower is better: b beats a
    assert t.loc[("b", "a"), "p_value"] == pytest.approx(1 / 64)
    assert t.loc[("b", "a"), "p_holm"] == pytest.approx(2 / 64) and t.loc[("b", "a"), "significant"]
    assert t.loc[("a", "b"), "p_value"] == pytest.approx(1.0) and not t.loc[("a", "b"), "significant"]
    # five cases cannot be tested (as the statistics table: fewer than 6 pairs)
    t5 = R.pairwise_tests(x.iloc[:5], "hd95")
    assert t5["p_value"].isna().all() and not t5["significant"].any()


# --------------------------------------------------------------------------- the report section
def test_section_writes_every_table_in_three_formats_and_every_figure(tmp_path):
    from deconver.report import ranking_section as RS
    from deconver.report.tables import parse_markdown_table

    dice = clear_winner(n=30).assign(region="r")
    hd = dice.assign(metric="hd95", value=lambda d: 10 * (1 - d["value"]))
    per_case = pd.concat([dice, hd], ignore_index=True)
    per_case = per_case.assign(raw_value=per_case["value"], status="measured", gt_empty=False, pred_empty=False)
    meta = {"d": dict(rule="penalize", penalty=50.0, hd95_unit="mm")}
    sections, files = RS.build(per_case, meta, {"d": "r"}, tmp_path, n_boot=200, seed=3,
                               describe=lambda ds: "SYNTHETIC. ")
    sec = sections["d"]
    assert "Kendall's τ median 1.000 (IQR 1.000–1.000)" in sec.summary and "200 bootstrap resamples of the 30" in sec.summary
    kinds = ("bootstrap", "methods", "significance", "conventions")
    assert [stem for stem, _ in sec.tables] == [f"d_{m}_{k}" for m in ("dice", "hd95") for k in kinds]
    for stem, table in sec.tables:
        for ext in ("md", "tex", "csv"):
            assert (tmp_path / "ranking" / f"{stem}.{ext}") in files
        head, body = parse_markdown_table((tmp_path / "ranking" / f"{stem}.md").read_text())
        csv = pd.read_csv(tmp_path / "ranking" / f"{stem}.csv")
        assert [r[0] for r in body] == csv["model"].tolist()
        assert table.caption.startswith("SYNTHETIC. ")
    boot = pd.read_csv(tmp_path / "ranking" / "d_hd95_bootstrap.csv")
    assert boot["model"].tolist() == ["a", "b", "c", "e"] and boot["rank_full"].tolist() == [1, 2, 3, 4]
    conv = pd.read_csv(tmp_path / "ranking" / "d_dice_conventions.csv")
    assert list(conv.columns) == ["model", "v0", "v1", "changed"] and conv["changed"].eq("no").all()
    assert "suite, penalize" in sec.tables[3][1].to_markdown() and "No rank changes" in sec.tables[3][1].caption
    assert [f.stem for f in sec.figures] == [f"ranking_{k}_d" for k in ("blob", "methods", "significance", "conventions")]
    for f in sec.figures:
        assert f.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.svg.read_text().lstrip().startswith("<?xml")
    stability = pd.read_csv(tmp_path / "ranking" / "stability.csv")
    assert stability[["dataset", "metric", "region"]].values.tolist() == [["d", "dice", "r"], ["d", "hd95", "r"]]
    assert (stability["n_boot"] == 200).all()
    pairwise = pd.read_csv(tmp_path / "ranking" / "pairwise.csv")
    assert len(pairwise) == 2 * 4 * 3
