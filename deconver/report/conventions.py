"""Pooling of the metric conventions (`suite`, `authors`, `challenge`) of a study's evaluation rows.

`deconver evaluate` writes every convention's rows with a ``convention`` column
(`deconver.metrics.conventions`). `deconver aggregate` keeps ``per_case.csv`` and ``summary.csv`` for the
suite's rows (what every other table reads) and adds, through `pool_conventions`:

- ``conventions_per_case.csv``  every convention's per-case rows after that convention's empty-mask rule
  (`deconver.metrics.conventions.convention_rule`), with the ``convention`` column;
- ``conventions_summary.csv``   per (dataset, model, convention, region, metric): n, mean, std, median,
  fold means and the counts of penalised / excluded / both-empty cases (an undefined GlaS F1 is counted in
  ``n_excluded``).
"""
from __future__ import annotations

from typing import Callable

import pandas as pd

OUTPUTS = ("conventions_per_case.csv", "conventions_summary.csv")
CHALLENGES = ("brats23", "isles22", "glas")


def with_convention(raw: pd.DataFrame) -> pd.DataFrame:
    """The rows with a ``convention`` column (evaluation files from before conventions are all ``suite``)."""
    conv = raw["convention"] if "convention" in raw.columns else pd.Series("suite", index=raw.index)
    return raw.assign(convention=conv.fillna("suite").astype(str))


def challenge_of(raw: pd.DataFrame) -> str | None:
    """The challenge whose metrics the rows carry (their names start with it), or None."""
    names = raw["metric"].astype(str)
    return next((c for c in CHALLENGES if names.str.startswith(f"{c}_").any()), None)


def pool_conventions(raw: pd.DataFrame, rule: str, penalty, apply_rule: Callable | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-case rows, summary) of every convention of one dataset's raw evaluation rows."""
    from deconver.metrics.conventions import convention_rule
    from deconver.report.aggregate import add_region_mean, summarize, with_rule

    raw = with_convention(raw)
    challenge = challenge_of(raw)
    per_case, summary = [], []
    for conv, rows in raw.groupby("convention", sort=True):
        c_rule, c_penalty = convention_rule(conv, rule, penalty, challenge)
        ruled = add_region_mean(pd.concat([with_rule(g.drop(columns="convention"), c_rule, c_penalty, apply_rule)
                                           for _, g in rows.groupby("model", sort=True)], ignore_index=True))
        ruled["convention"] = conv
        summ = summarize(ruled)
        summ.insert(2, "convention", conv)
        summ.insert(5, "rule", c_rule)
        per_case.append(ruled)
        summary.append(summ)
    return pd.concat(per_case, ignore_index=True), pd.concat(summary, ignore_index=True)
