"""Report tables of the metric conventions: one column set per convention, and the reproduction columns.

Reads ``conventions_summary.csv`` (`deconver.report.conventions`). Column keys are
``<metric>_<convention>`` (``dice_suite``, ``hd95_authors``, ``glas_object_f1_challenge`` …) and, for the
cases a convention leaves out, ``n_excluded_<convention>``; docs/metrics.md ("Conventions") and
docs/report.md name them. The protocol links point at each dataset's ``protocol.json`` (`deconver train`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from deconver.report.conventions import OUTPUTS
from deconver.report.tables import Column, Table

CONVENTIONS = ("suite", "authors", "challenge")
# per convention, the metrics shown (the challenge's own headline metrics where the dataset has them)
SHOWN = {"suite": ("dice", "hd95"), "authors": ("dice", "hd95"),
         "challenge": ("dice", "hd95", "brats23_lw_dice", "brats23_lw_hd95", "isles22_lesion_f1", "glas_object_f1")}
PERCENT = {"dice", "brats23_lw_dice", "isles22_lesion_f1", "glas_object_f1"}


def load_conventions(directory: Path) -> pd.DataFrame | None:
    """The conventions summary of an aggregate folder, or None (an aggregate from before conventions)."""
    path = Path(directory) / OUTPUTS[1]
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"region": str, "metric": str, "model": str, "dataset": str, "convention": str})


def convention_values(summary: pd.DataFrame, dataset: str, model: str, region: str) -> dict[str, Any]:
    """{``<metric>_<convention>``: mean (Dice-like in %), ``n_excluded_<convention>``: cases left out} of one
    (dataset, model) at one region."""
    s = summary[(summary["dataset"] == dataset) & (summary["model"] == model)]
    out: dict[str, Any] = {}
    for conv in CONVENTIONS:
        c = s[s["convention"] == conv]
        for metric in SHOWN[conv]:
            at = c[(c["metric"] == metric) & (c["region"] == region)]
            if not len(at) and not metric.startswith("hd") and not metric == "dice":
                at = c[c["metric"] == metric].head(1) if region == "mean" else at  # object/lesion metrics: one region
            if len(at):
                out[f"{metric}_{conv}"] = float(at["mean"].iloc[0]) * (100.0 if metric in PERCENT else 1.0)
                excluded = int(at["n_excluded"].iloc[0])
                out[f"n_excluded_{conv}"] = max(out.get(f"n_excluded_{conv}", 0), excluded)
        if f"dice_{conv}" in out:
            unit = c.loc[(c["metric"] == "hd95"), "unit"].dropna()
            out[f"hd95_unit_{conv}"] = str(unit.iloc[0]) if len(unit) else ""
    return out


def conventions_table(summary: pd.DataFrame, datasets: dict[str, dict], primary: dict[str, str]) -> Table | None:
    """Every (dataset, model) with one column set per convention, at the dataset's primary region."""
    rows = []
    for name, ds in datasets.items():
        for model in ds.get("models", []):
            values = convention_values(summary, name, model, primary[name])
            if values:
                rows.append((f"{name} / {model}", values))
    if not rows:
        return None
    present = {k for _, r in rows for k in r}
    cols = []
    for conv in CONVENTIONS:
        for metric in SHOWN[conv]:
            key = f"{metric}_{conv}"
            if key in present:
                name = metric.replace("_", " ") + (" %" if metric in PERCENT else "")
                cols.append(Column(key, f"{name} ({conv})", better="min" if "hd" in metric else "max",
                                   decimals=2))
        if f"n_excluded_{conv}" in present:
            cols.append(Column(f"n_excluded_{conv}", f"excluded ({conv})", decimals=0))
        if f"hd95_unit_{conv}" in present:
            cols.append(Column(f"hd95_unit_{conv}", f"HD95 unit ({conv})", text=True))
    cap = ("Metric conventions, all from the same predictions (docs/metrics.md, 'Conventions'): 'suite' = native "
           "grid, mm, the dataset's empty-mask rule; 'authors' = the authors' MONAI evaluator on the prepared grid, "
           "HD95 in voxels, cases with an empty side dropped from HD95; 'challenge' = the challenges' official "
           "definitions (BraTS 2023 HD95 by the surface-distance package, penalty 374; GlaS object F1 undefined "
           "when no object matches). 'excluded' counts the cases a convention leaves out of a mean. Multi-region "
           "datasets: mean over the regions.")
    return Table(name="Table: metric conventions", caption=cap, label="tab:conventions", columns=cols, rows=rows,
                 label_header="Dataset / model")


def reproduction_columns(summary: pd.DataFrame | None, dataset: str, model: str, region: str) -> dict[str, Any]:
    """The reproduction table's `authors` and `suite` columns of one dataset."""
    if summary is None:
        return {}
    v = convention_values(summary, dataset, model, region)
    return {k: v.get(k, math.nan) for k in ("dice_authors", "hd95_authors", "n_excluded_authors",
                                            "dice_suite", "hd95_suite")}


REPRODUCTION_COLUMNS = [
    Column("dice_authors", "Dice % ours (authors conv.)", decimals=2),
    Column("hd95_authors", "HD95 ours (authors conv., vox)", decimals=2),
    Column("n_excluded_authors", "cases dropped (authors conv.)", decimals=0),
    Column("dice_suite", "Dice % ours (suite conv.)", decimals=2),
    Column("hd95_suite", "HD95 ours (suite conv.)", decimals=2),
]


def protocol_links(results: str | Path, datasets: dict[str, dict], reference: str, out: Path) -> list[tuple[str, str]]:
    """(dataset, link relative to the report folder) of each dataset's resolved recipe, from the first fold of
    the reference model (or of any model) that wrote one."""
    links = []
    for name, ds in datasets.items():
        models = [reference] + [m for m in ds.get("models", []) if m != reference]
        for model in models:
            for fold in ds.get("folds", []):
                path = Path(results) / "runs" / name / model / f"fold{fold}" / "protocol.json"
                if path.is_file():
                    links.append((name, os.path.relpath(path.resolve(), Path(out).resolve())))
                    break
            else:
                continue
            break
    return links
