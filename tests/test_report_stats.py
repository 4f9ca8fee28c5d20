"""Statistics and tables of the report on hand-made inputs with hand-computed answers."""
from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest

from deconver.report import stats as S
from deconver.report.tables import Column, Table, latex_escape, parse_markdown_table


def exact_wilcoxon_p(d) -> float:
    """Two-sided exact signed-rank p by enumerating all 2^n sign patterns (no ties, no zeros)."""
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    w_plus = ranks[np.asarray(d) > 0].sum()
    w = min(w_plus, ranks.sum() - w_plus)
    n = len(d)
    sums = [sum(r for r, s in zip(range(1, n + 1), signs) if s) for signs in itertools.product((0, 1), repeat=n)]
    return min(1.0, 2 * sum(1 for t in sums if t <= w) / 2 ** n)


# --------------------------------------------------------------------------- Wilcoxon
def test_wilcoxon_statistic_and_exact_p_by_hand():
    # d = x - y = 1, 2, 3, 4, 5, -6: W+ = 15, W- = 6, statistic = 6; P(W <= 6) = 14/64 (counted by hand)
    y = np.zeros(6)
    x = np.array([1, 2, 3, 4, 5, -6], dtype=float)
    r = S.wilcoxon_paired(x, y)
    assert r.enough and r.n == 6
    assert r.statistic == 6.0
    assert r.p_value == pytest.approx(2 * 14 / 64)
    assert r.median_diff == pytest.approx(2.5) and r.mean_diff == pytest.approx(1.5)  # median of -6,1,2,3,4,5
    # all six differences positive: the smallest possible two-sided p, 2/2^6
    r = S.wilcoxon_paired(np.arange(1, 7, dtype=float) + 10, np.full(6, 10.0))
    assert r.statistic == 0.0 and r.p_value == pytest.approx(2 / 64)


def test_wilcoxon_matches_enumeration_on_random_pairs():
    rng = np.random.default_rng(3)
    for n in (6, 8, 11):
        x, y = rng.uniform(size=n), rng.uniform(size=n)
        assert S.wilcoxon_paired(x, y).p_value == pytest.approx(exact_wilcoxon_p(x - y), rel=1e-9)


def test_wilcoxon_too_few_cases_gives_no_p_and_says_so():
    r = S.wilcoxon_paired([0.9, 0.8, 0.85, 0.7, 0.95], [0.1, 0.2, 0.15, 0.3, 0.05])
    assert not r.enough and r.n == 5 and math.isnan(r.p_value)
    v = S.verdict(r, math.nan, "dice", "deconver")
    assert S.TOO_FEW in v and "n=5" in v
    # NaN pairs do not count: 7 pairs with 2 NaN leave 5
    r = S.wilcoxon_paired([1, 2, 3, 4, 5, np.nan, 7], [0, 0, 0, 0, 0, 0, np.nan])
    assert r.n == 5 and not r.enough


def test_wilcoxon_float_noise_is_a_tie_not_two_ranks():
    # 0.7-0.8 and 0.6-0.7 differ in the last bit; rounded they tie, as they should
    a = S.wilcoxon_paired([0.7, 0.6, 0.5, 0.4, 0.3, 0.2], [0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    assert a.statistic == 0.0 and a.median_diff == pytest.approx(-0.1)


def test_identical_samples_are_not_significant():
    r = S.wilcoxon_paired(np.ones(8), np.ones(8))
    assert r.p_value == 1.0 and S.verdict(r, 1.0, "dice", "ref") == "no significant difference"


# --------------------------------------------------------------------------- Holm
def test_holm_on_known_input():
    # sorted: .005*4=.02, .01*3=.03, .03*2=.06, .04*1=.04 -> running max .02 .03 .06 .06
    adj = S.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])
    # NaN (too few cases) stays NaN and is not counted in the family
    adj = S.holm([0.01, math.nan, 0.04])
    assert math.isnan(adj[1]) and adj[0] == pytest.approx(0.02) and adj[2] == pytest.approx(0.04)
    assert S.holm([0.3, 0.9]).tolist() == [0.6, 0.9]


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_on_known_distributions():
    # two values: the resampled mean is 0, .5 or 1 with probability 1/4, 1/2, 1/4 -> 95% CI (0, 1)
    assert S.bootstrap_ci([0.0, 1.0], n_resamples=4000, seed=1) == (0.0, 1.0)
    # 50 zeros and 50 ones: resampled mean ~ Binomial(100, 1/2)/100, whose 2.5% and 97.5% quantiles are 0.40, 0.60
    v = np.repeat([0.0, 1.0], 50)
    low, high = S.bootstrap_ci(v, n_resamples=20_000, seed=0)
    assert low == pytest.approx(0.40, abs=0.011) and high == pytest.approx(0.60, abs=0.011)
    # a fixed seed gives the same interval; the interval narrows as the confidence drops
    assert S.bootstrap_ci(v, n_resamples=20_000, seed=0) == (low, high)
    low80, high80 = S.bootstrap_ci(v, confidence=0.80, n_resamples=20_000, seed=0)
    assert low < low80 < 0.5 < high80 < high
    # degenerate inputs
    assert S.bootstrap_ci([0.7, 0.7, 0.7]) == (0.7, 0.7)
    assert all(math.isnan(b) for b in S.bootstrap_ci([np.nan]))


def test_bootstrap_table_means_and_counts():
    pc = pd.DataFrame(dict(dataset="d", model=["a"] * 4 + ["b"] * 4, region="r", metric="dice",
                           value=[0.2, 0.4, np.nan, 0.6, 0.5, 0.5, 0.5, 0.5]))
    t = S.bootstrap_table(pc, "dice", n_resamples=1000, seed=0).set_index("model")
    assert t.loc["a", "n"] == 3 and t.loc["a", "mean"] == pytest.approx(0.4)
    assert t.loc["a", "ci_low"] < 0.4 < t.loc["a", "ci_high"]
    assert (t.loc["b", "ci_low"], t.loc["b", "ci_high"]) == (0.5, 0.5)


# --------------------------------------------------------------------------- ranks
def test_rank_table_by_hand():
    scores = pd.DataFrame([
        dict(dataset="A", model="m1", score=0.9), dict(dataset="A", model="m2", score=0.8),
        dict(dataset="A", model="m3", score=0.8),
        dict(dataset="B", model="m1", score=0.7), dict(dataset="B", model="m2", score=0.9),
    ])
    r = S.rank_table(scores, higher_better=True).set_index("model")
    assert r.loc["m1", "A"] == 1 and r.loc["m2", "A"] == 2.5 and r.loc["m3", "A"] == 2.5
    assert r.loc["m1", "B"] == 2 and r.loc["m2", "B"] == 1 and math.isnan(r.loc["m3", "B"])
    assert r.loc["m1", "mean_rank"] == 1.5 and r.loc["m2", "mean_rank"] == 1.75 and r.loc["m3", "mean_rank"] == 2.5
    assert r.loc["m3", "n_datasets"] == 1
    assert list(r.index) == ["m1", "m2", "m3"]  # sorted by mean rank
    # lower is better (HD95): the order flips
    r = S.rank_table(scores, higher_better=False).set_index("model")
    assert r.loc["m1", "A"] == 3 and r.loc["m2", "A"] == 1.5 and r.loc["m1", "mean_rank"] == 2.0  # (3 + 1) / 2


# --------------------------------------------------------------------------- paired tests on a per-case table
def _per_case(values: dict[str, list[float]], metric="dice"):
    rows = []
    for model, vals in values.items():
        for i, v in enumerate(vals):
            rows.append(dict(dataset="d", model=model, fold=i % 2, case=f"c{i}", region="r", metric=metric, value=v))
    df = pd.DataFrame(rows)
    return df.sample(frac=1.0, random_state=0).reset_index(drop=True)  # pairing must not rely on row order


def test_paired_tests_pair_by_case_and_holm_correct():
    ref = np.array([0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80])
    d_a = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07])     # all better: p = 2/128
    d_b = np.array([0.01, -0.02, 0.03, -0.04, 0.05, -0.06, 0.07])  # mixed
    pc = _per_case({"deconver": ref.tolist(), "a": (ref + d_a).tolist(), "b": (ref + d_b).tolist()})
    t = S.paired_tests(pc, "deconver", metrics=("dice",)).set_index("model")
    p_a, p_b = exact_wilcoxon_p(d_a), exact_wilcoxon_p(d_b)
    assert t.loc["a", "p_value"] == pytest.approx(p_a) and p_a == pytest.approx(2 / 128)
    assert t.loc["b", "p_value"] == pytest.approx(p_b)
    assert t.loc["a", "statistic"] == 0 and t.loc["b", "statistic"] == 2 + 4 + 6
    # Holm over the two: the smaller p doubles, the larger stays (>= the first)
    assert t.loc["a", "p_holm"] == pytest.approx(2 * p_a)
    assert t.loc["b", "p_holm"] == pytest.approx(max(p_b, 2 * p_a))
    assert t.loc["a", "verdict"].startswith("better than deconver")
    assert t.loc["b", "verdict"] == "no significant difference"
    # the same numbers as HD95 (lower is better): a is now worse
    pc_hd = _per_case({"deconver": ref.tolist(), "a": (ref + d_a).tolist()}, metric="hd95")
    t = S.paired_tests(pc_hd, "deconver", metrics=("hd95",)).set_index("model")
    assert t.loc["a", "verdict"].startswith("worse than deconver")


def test_paired_tests_small_sample_says_too_few():
    pc = _per_case({"deconver": [0.5, 0.6, 0.7, 0.8], "a": [0.9, 0.95, 0.97, 0.99]})
    t = S.paired_tests(pc, "deconver", metrics=("dice",))
    assert len(t) == 1 and t["n"].iloc[0] == 4
    assert math.isnan(t["p_value"].iloc[0]) and math.isnan(t["p_holm"].iloc[0])
    assert S.TOO_FEW in t["verdict"].iloc[0]


# --------------------------------------------------------------------------- tables
def _table():
    cols = [Column("dice", "Dice %", better="max", decimals=2, std=True),
            Column("hd", "HD95 (mm)", better="min", decimals=2, std=True),
            Column("params", "Params (M)", better="min", decimals=1),
            Column("note", "Note", text=True)]
    rows = [("deconver", dict(dice=(78.123, 13.3), hd=(2.875, 2.0), params=10.48, note="ref")),
            ("swin_unetr", dict(dice=(78.124, 12.8), hd=(3.31, 2.1), params=62.2, note="a|b")),
            ("unet", dict(dice=(63.75, 29.7), hd=(40.6, 104.8), params=4.8, note=None)),
            ("empty", dict(dice=None, hd=(math.nan, math.nan), params=10.48))]
    return Table(name="Table: t", caption="Dice in % & HD95; 5 % penalised_cases {x} → ±", label="tab:t",
                 columns=cols, rows=rows)


def test_best_values_marked_with_ties_at_shown_precision():
    t = _table()
    best = {c.key: t.best(c) for c in t.columns}
    assert best["dice"] == {0, 1}       # 78.12 and 78.12 tie as shown
    assert best["hd"] == {0}
    assert best["params"] == {2}
    assert best["note"] == set()
    md = t.to_markdown()
    assert "| deconver | **78.12 ± 13.30** | **2.88 ± 2.00** |" in md
    assert "| unet | 63.75 ± 29.70 | 40.60 ± 104.80 | **4.8** |" in md


def test_markdown_matches_csv():
    t = _table()
    header, body = parse_markdown_table(t.to_markdown())
    assert header == ["Model", "Dice %", "HD95 (mm)", "Params (M)", "Note"]
    csv = pd.read_csv(pd.io.common.StringIO(t.to_csv()))
    assert list(csv["model"]) == [r[0] for r in body]
    for (label, *cells), (_, rec) in zip(body, csv.iterrows()):
        for col, cell in zip(t.columns, cells):
            if col.text:
                assert cell == ("–" if pd.isna(rec[col.key]) else str(rec[col.key]))
                continue
            if pd.isna(rec[col.key]):
                assert cell == "–"
                continue
            parts = cell.split(" ± ")
            assert float(parts[0]) == pytest.approx(round(rec[col.key], col.decimals))
            if col.std:
                assert float(parts[1]) == pytest.approx(round(rec[f"{col.key}_std"], col.decimals))


def check_latex(tex: str, models: list[str]) -> None:
    """Well-formed booktabs table: balanced braces and environments, one row per model, ASCII only."""
    depth = 0
    for i, ch in enumerate(tex):
        if ch in "{}" and (i == 0 or tex[i - 1] != "\\"):
            depth += 1 if ch == "{" else -1
            assert depth >= 0, f"unbalanced '}}' at {i}"
    assert depth == 0, "unbalanced braces"
    envs = re.findall(r"\\(begin|end)\{(\w+)\}", tex)
    stack = []
    for kind, name in envs:
        if kind == "begin":
            stack.append(name)
        else:
            assert stack and stack.pop() == name, f"\\end{{{name}}} does not close the open environment"
    assert not stack and ("begin", "tabular") in envs and ("begin", "table") in envs
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert tex.count(rule) == 1
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0]
    rows = [ln for ln in body.strip().splitlines() if ln.strip()]
    assert len(rows) == len(models)
    ncols = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1))
    for row, model in zip(rows, models):
        assert row.startswith(latex_escape(model) + " &") and row.endswith("\\\\")
        assert len(re.split(r"(?<!\\)&", row)) == ncols
    assert tex.isascii(), "non-ASCII characters need a LaTeX package"
    assert "$" not in re.sub(r"\$[^$]*\$", "", tex.replace("\\$", "")), "unbalanced math"


def test_latex_is_well_formed():
    t = _table()
    tex = t.to_latex()
    check_latex(tex, ["deconver", "swin_unetr", "unet", "empty"])
    assert "swin\\_unetr" in tex and "\\textbf{78.12 $\\pm$ 13.30}" in tex
    assert "\\%" in tex and "penalised\\_cases \\{x\\}" in tex and "$\\rightarrow$" in tex
    # the checker itself catches a broken table
    with pytest.raises(AssertionError):
        check_latex(tex.replace("\\end{tabular}", ""), ["deconver", "swin_unetr", "unet", "empty"])
    with pytest.raises(AssertionError):
        check_latex(tex, ["deconver", "swin_unetr", "unet"])


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_signed_rank_test_is_scipys_wilcoxon(alternative):
    """stats.signed_rank_test gives scipy's wilcoxon(method='auto') numbers: with ties or zeros at n <= 13
    (the vectorised sign-flip enumeration), without them (exact) and above 13 (normal approximation)."""
    from scipy.stats import wilcoxon

    from deconver.report.stats import EXACT_PERMUTATION_MAX_N, signed_rank_test

    rng = np.random.default_rng(3)
    samples = [np.array([0.1, -0.2, 0.1, 0.3, 0.0, 0.2, -0.1, 0.1, 0.4, 0.2]), np.array([1.0] * 8),
               np.array([0.0, 0.0, 0.5, 0.5, -0.5, 0.25])]
    for n in (6, 7, 10, 12, EXACT_PERMUTATION_MAX_N, 14, 20):
        samples.append(rng.integers(-3, 4, n) / 4)            # ties and zeros
        samples.append(rng.normal(size=n))                     # neither
    for d in samples:
        ours = signed_rank_test(d, alternative)
        ref = wilcoxon(d, zero_method="wilcox", alternative=alternative, method="auto")
        assert ours == pytest.approx((float(ref.statistic), float(ref.pvalue)), abs=1e-12), (d, ours, ref)
