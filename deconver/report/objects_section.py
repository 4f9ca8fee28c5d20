"""The report's object-level tables: the challenges' own metrics per model, wherever evaluate computed them.

GlaS object Dice, object Hausdorff and object F1; ISLES'22 lesion F1, lesion-count and volume
differences; BraTS 2023 lesion-wise Dice and HD95 (definitions: docs/metrics.md, "Challenge metrics").
Values are the pooled per-case means ± sd under the dataset's empty-mask rule (summary.csv); the
TP/FP/FN counts are summed over the cases. A dataset whose runs were evaluated with different metric
settings (``deconver.report.settings``) gets a note on its tables.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from deconver.report.settings import settings_warning
from deconver.report.tables import Column, Table

#: metric -> (header, scale, better); the order of the columns
OBJECT_METRICS: dict[str, tuple[str, float, str]] = {
    "glas_object_dice": ("Object Dice %", 100.0, "max"),
    "glas_object_hausdorff": ("Object Hausdorff", 1.0, "min"),
    "glas_object_f1": ("Object F1 %", 100.0, "max"),
    "isles22_lesion_f1": ("Lesion F1 %", 100.0, "max"),
    "isles22_lesion_count_diff": ("|Δ lesion count|", 1.0, "min"),
    "isles22_volume_diff_ml": ("|Δ volume| (ml)", 1.0, "min"),
    "brats23_lw_dice": ("LW Dice %", 100.0, "max"),
    "brats23_lw_hd95": ("LW HD95", 1.0, "min"),
}
CHALLENGE_PREFIX = {"glas_": "GlaS 2015 object-level", "isles22_": "ISLES'22 lesion", "brats23_lw_": "BraTS 2023 lesion-wise"}
COUNTS = ("tp", "fp", "fn")


def _unit(e: pd.Series) -> str:
    unit = e.get("unit")
    return f" ({unit})" if isinstance(unit, str) and unit not in ("ratio", "count", "") else ""


def object_table(summary: pd.DataFrame, name: str, ds: dict[str, Any], models: list[str],
                 title: str) -> Table | None:
    """The object-level table of one dataset (None when evaluate computed no such metric)."""
    rule = ds.get("rule")
    s = summary[(summary["dataset"] == name) & (summary["rule"] == rule if "rule" in summary else True)]
    prefix = next((p for p in CHALLENGE_PREFIX if s["metric"].str.startswith(p).any()), None)
    if prefix is None:
        return None
    s = s[s["metric"].str.startswith(prefix) & (s["region"] != "mean")]
    regions = [r for r in ds.get("regions", []) if r in set(s["region"])] or sorted(set(s["region"]))
    multi = len(regions) > 1
    metrics = [m for m in OBJECT_METRICS if m in set(s["metric"])]
    counts = [f"{prefix}{c}" for c in COUNTS if f"{prefix}{c}" in set(s["metric"])]
    cols: list[Column] = []
    for r in regions:
        for m in metrics:
            header, _, better = OBJECT_METRICS[m]
            unit = _unit(s[s["metric"] == m].iloc[0])
            cols.append(Column(f"{m}@{r}", f"{header}{unit}{f' {r}' if multi else ''}", better=better, std=True))
        if counts:
            cols.append(Column(f"counts@{r}", f"TP/FP/FN{f' {r}' if multi else ''}", text=True))
    rows = []
    n_cases = 0
    for model in models:
        m_s = s[s["model"] == model].set_index(["metric", "region"])
        if m_s.empty:
            continue
        row: dict[str, Any] = {}
        for r in regions:
            for m in metrics:
                if (m, r) in m_s.index:
                    e = m_s.loc[(m, r)]
                    scale = OBJECT_METRICS[m][1]
                    row[f"{m}@{r}"] = (float(e["mean"]) * scale, float(e["std"]) * scale)
                    n_cases = max(n_cases, int(e["n"]))
            totals = [m_s.loc[(c, r)] for c in counts if (c, r) in m_s.index]
            if counts and len(totals) == len(counts):
                row[f"counts@{r}"] = "/".join(str(int(round(float(e["mean"]) * int(e["n"])))) if math.isfinite(e["mean"])
                                              else "–" for e in totals)
        rows.append((model, row))
    if not rows:
        return None
    challenge = CHALLENGE_PREFIX[prefix]
    cap = (f"{title}: {challenge} metrics of each model (definitions in docs/metrics.md, \"Challenge metrics\"), "
           f"mean ± sd over {n_cases} pooled cases under the '{rule}' rule"
           + (f" for regions {', '.join(regions)}" if multi else "")
           + ("; TP/FP/FN summed over the cases" if counts else "") + ". Best mean per column in bold.")
    notes = [w for w in [settings_warning(name, ds.get("metric_settings") or {})] if w]
    return Table(name=f"Objects: {title}", caption=cap, label=f"tab:objects-{name}", columns=cols, rows=rows,
                 notes=notes)


def settings_notes(datasets: dict[str, dict]) -> dict[str, str]:
    """dataset -> the warning sentence, for the datasets whose runs differ in their metric settings."""
    out = {}
    for name, ds in datasets.items():
        warning = settings_warning(name, ds.get("metric_settings") or {})
        if warning:
            out[name] = warning
    return out
