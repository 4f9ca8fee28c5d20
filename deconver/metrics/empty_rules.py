"""Empty-mask rules: turn the raw per-case values of ``evaluation.csv`` into values that can be averaged.

Raw values keep what the mathematics gives (both masks empty: Dice/HD95/NSD NaN; one empty: Dice 0,
HD95 +inf, NSD 0). A rule decides what those cases mean, and every aggregate says how many cases it
touched (docs/datasets.md, "Metric conventions"):

``penalize`` (default; BraTS 2023 convention)
    both empty → Dice 1, NSD 1, HD95 0; exactly one empty → Dice 0, NSD 0, HD95 = ``penalty``
    (374 mm for BraTS, the image diagonal elsewhere). Nothing is dropped.
``exclude`` (reproduces the authors' MONAI numbers: ``DiceMetric(ignore_empty=False)``,
    ``HausdorffDistanceMetric(percentile=95)``, ``SurfaceDiceMetric``, then a NaN-skipping mean)
    Dice: both empty → 1, one empty → 0 (kept); HD95: every case with an empty side is dropped;
    NSD: both empty dropped, one empty → 0. A missed lesion therefore *improves* the mean HD95 — which is
    why this rule is only for comparison with published numbers.

Challenge metrics (``isles22_*``, ``brats23_*``, ``glas_*``) carry their challenge's own conventions
in the raw value and pass through unchanged, except a non-finite value (GlaS object Hausdorff with no
object on one side): penalty under ``penalize``, dropped under ``exclude``.
"""
from __future__ import annotations

from typing import Literal, Mapping

import numpy as np
import pandas as pd

SIMILARITY_METRICS = frozenset({"dice", "nsd"})
DISTANCE_METRICS = frozenset({"hd95"})
GROUP_KEYS = ("study", "dataset", "model", "fold", "convention", "region", "metric")
STATUSES = ("measured", "both_empty", "penalized", "excluded")

Penalty = float | Literal["diagonal"]


def as_bool(series: pd.Series) -> pd.Series:
    """An empty-flag column as bools, however the CSV gave it: bools, 'True'/'1'/'yes' strings, 0/1
    numbers; NaN (a missing flag) is False."""
    if series.dtype == bool:
        return series

    def one(v) -> bool:
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, str):
            return v.strip().lower() in ("true", "1", "yes")
        try:
            return bool(v) and not np.isnan(v)
        except TypeError:
            return False

    return series.map(one).astype(bool)


def _penalty_values(df: pd.DataFrame, penalty: Penalty | Mapping[str, Penalty]) -> pd.Series:
    """Per-row HD penalty: a number, the row's `diagonal`, or a per-dataset mapping of either."""
    def one(p, rows: pd.DataFrame) -> pd.Series:
        if isinstance(p, str):
            if p != "diagonal":
                raise ValueError(f"penalty must be a number or 'diagonal', got {p!r}")
            if "diagonal" not in rows.columns:
                raise ValueError("penalty 'diagonal' needs a 'diagonal' column (written by deconver evaluate)")
            return pd.to_numeric(rows["diagonal"], errors="coerce").astype(float)
        value = float(p)
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"penalty must be a finite non-negative number, got {p!r}")
        return pd.Series(value, index=rows.index, dtype=float)

    if isinstance(penalty, Mapping):
        if "dataset" not in df.columns:
            raise ValueError("a per-dataset penalty mapping needs a 'dataset' column")
        missing = sorted(set(df["dataset"].astype(str)) - set(map(str, penalty)))
        if missing:
            raise ValueError(f"penalty mapping has no entry for dataset(s) {missing}")
        parts = [one(penalty[str(name)], rows) for name, rows in df.groupby(df["dataset"].astype(str), sort=False)]
        return pd.concat(parts).reindex(df.index) if parts else pd.Series(dtype=float)
    return one(penalty, df)


def apply_rule(df: pd.DataFrame, rule: Literal["penalize", "exclude"] = "penalize",
               penalty: Penalty | Mapping[str, Penalty] = "diagonal") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply an empty-mask rule to a long metrics table (the rows of one or many ``evaluation.csv``).

    Args:
        df: long table with at least ``metric, value, gt_empty, pred_empty`` (and ``diagonal`` for the
            diagonal penalty); not modified.
        rule: ``"penalize"`` or ``"exclude"`` (module docstring).
        penalty: HD95 value of a case with exactly one empty mask — a number (374.0 for BraTS), the
            string ``"diagonal"`` (each row's image diagonal), or ``{dataset: number | "diagonal"}``.

    Returns:
        ``(values, counts)``. ``values``: the rows kept, ``value`` after the rule, ``raw_value`` the
        stored one, ``status`` ∈ {measured, both_empty, penalized} (excluded rows are dropped), ``rule``.
        ``counts``: one row per (study, dataset, model, fold, region, metric) present, with ``n_cases``
        (rows before the rule), ``n_used`` (rows after), ``n_measured``, ``n_both_empty``,
        ``n_penalized`` (one empty side: set to Dice 0 / NSD 0 / HD95 penalty) and ``n_excluded``.
    """
    if rule not in ("penalize", "exclude"):
        raise ValueError(f"rule must be 'penalize' or 'exclude', got {rule!r}")
    for p in (penalty.values() if isinstance(penalty, Mapping) else [penalty]):
        if isinstance(p, str) and p != "diagonal":
            raise ValueError(f"penalty must be a number or 'diagonal', got {p!r}")
    missing = [c for c in ("metric", "value", "gt_empty", "pred_empty") if c not in df.columns]
    if missing:
        raise ValueError(f"metrics table lacks column(s) {missing}")
    out = df.copy()
    raw = pd.to_numeric(out["value"], errors="coerce").astype(float)
    gt_e, pred_e = as_bool(out["gt_empty"]), as_bool(out["pred_empty"])
    metric = out["metric"].astype(str)
    both, one = gt_e & pred_e, gt_e ^ pred_e
    is_sim, is_dist = metric.isin(SIMILARITY_METRICS), metric.isin(DISTANCE_METRICS)
    is_challenge = ~(is_sim | is_dist)
    # the penalty is looked up only where a row needs it (a table without `diagonal` works otherwise)
    need = (is_dist & one) | (is_challenge & np.isinf(raw))
    pen = pd.Series(np.nan, index=out.index, dtype=float)
    if rule == "penalize" and need.any():
        pen[need] = _penalty_values(out[need], penalty)

    value = raw.copy()
    status = pd.Series("measured", index=out.index, dtype=object)
    if rule == "penalize":
        value[is_sim & both] = 1.0
        value[is_dist & both] = 0.0
        value[is_sim & one] = 0.0
        value[is_dist & one] = pen[is_dist & one]
        status[(is_sim | is_dist) & both] = "both_empty"
        status[(is_sim | is_dist) & one] = "penalized"
        bad = is_challenge & ~np.isfinite(raw)
        value[bad & (raw > 0)] = pen[bad & (raw > 0)]
        status[bad & (raw > 0)] = "penalized"
        status[bad & raw.isna()] = "excluded"  # a NaN challenge value has no defined penalty
    else:
        dice_like = metric.eq("dice")
        nsd_like = metric.eq("nsd")
        value[dice_like & both] = 1.0
        value[dice_like & one] = 0.0
        value[nsd_like & one] = 0.0
        status[dice_like & both] = "both_empty"
        status[(dice_like | nsd_like) & one] = "penalized"
        status[(is_dist & (both | one)) | (nsd_like & both)] = "excluded"
        status[is_challenge & ~np.isfinite(raw)] = "excluded"
    out["raw_value"] = raw
    out["value"] = value
    out["status"] = status
    out["rule"] = rule

    keys = [k for k in GROUP_KEYS if k in out.columns]
    flags = pd.DataFrame({s: status.eq(s) for s in STATUSES}, index=out.index)
    flags[keys] = out[keys]
    if keys:
        counts = flags.groupby(keys, sort=True, dropna=False)[list(STATUSES)].sum().reset_index()
    else:
        counts = flags[list(STATUSES)].sum().to_frame().T
    counts = counts.rename(columns={s: f"n_{s}" for s in STATUSES})
    counts.insert(len(keys), "n_cases", counts[[f"n_{s}" for s in STATUSES]].sum(axis=1))
    counts.insert(len(keys) + 1, "n_used", counts["n_cases"] - counts["n_excluded"])
    counts["rule"] = rule
    values = out[status.ne("excluded")].reset_index(drop=True)
    return values, counts


def summarize(df: pd.DataFrame, rule: Literal["penalize", "exclude"] = "penalize",
              penalty: Penalty | Mapping[str, Penalty] = "diagonal",
              by: tuple[str, ...] = GROUP_KEYS) -> pd.DataFrame:
    """Mean, std, median per group after `apply_rule`, with the rule and its case counts beside them."""
    values, counts = apply_rule(df, rule, penalty)
    keys = [k for k in by if k in values.columns]
    stats = values.groupby(keys, sort=True, dropna=False)["value"].agg(["mean", "std", "median"]).reset_index()
    count_cols = [c for c in counts.columns if c.startswith("n_")]
    pooled = counts.groupby(keys, sort=True, dropna=False)[count_cols].sum().reset_index()
    table = pooled.merge(stats, on=keys, how="left")
    table["rule"] = rule
    return table
