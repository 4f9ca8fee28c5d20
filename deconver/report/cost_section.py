"""The report's cost table: measured device-hours per model × dataset and in all, predicted beside measured.

Reads `aggregate/cost.csv` (`deconver.cost.record.cost_rows`). One row per model: device-hours on each
dataset (summed over folds) and the model's total; a last row "study" with the whole study's. Where the
runs recorded a prediction (a calibration existed when they started), a second table gives per run the
predicted and measured training wall time and their ratio.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from deconver.cost.estimate import TOLERANCE, within_tolerance
from deconver.report.tables import Column, Table


def read_cost(directory: Path) -> pd.DataFrame | None:
    path = Path(directory) / "cost.csv"
    return pd.read_csv(path, dtype={"model": str, "dataset": str}) if path.is_file() else None


def cost_tables(cost: pd.DataFrame) -> list[tuple[str, Table]]:
    """[("cost", device-hours table)] plus [("cost_prediction", predicted vs measured)] when predicted."""
    datasets = list(dict.fromkeys(cost["dataset"]))
    hours = cost.pivot_table(index="model", columns="dataset", values="device_hours", aggfunc="sum")
    cols = [Column(d, d, decimals=3) for d in datasets] + [Column("total", "total", decimals=3)]
    rows = [(m, {**{d: hours.loc[m].get(d) for d in datasets}, "total": float(hours.loc[m].sum())})
            for m in hours.index]
    rows.append(("study", {**{d: float(hours[d].sum()) for d in datasets}, "total": float(hours.values.sum())}))
    device = ", ".join(sorted({str(d) for d in cost["device"].dropna()})) or "?"
    total = Table(name="Cost", label="tab:cost", columns=cols, rows=rows, caption=(
        f"Measured device-hours of training (processes × wall time, every attempt counted; device: {device}), "
        "per model and dataset, summed over folds; last row and column: totals. From each run's cost.json."))
    out = [("cost", total)]
    pred = cost.dropna(subset=["predicted_fit_s"])
    if len(pred):
        within = sum(within_tolerance(r.wall_s, r.predicted_fit_s) for r in pred.itertuples()) / len(pred)
        pcols = [Column("predicted_s", "predicted (s)", decimals=1), Column("measured_s", "measured (s)", decimals=1),
                 Column("ratio", "measured / predicted", decimals=2)]
        prow = [(f"{r.dataset} {r.model} fold {r.fold}", {"predicted_s": r.predicted_fit_s, "measured_s": r.wall_s,
                                                          "ratio": r.measured_over_predicted})
                for r in pred.itertuples()]
        out.append(("cost_prediction", Table(
            name="Predicted and measured training time", label="tab:cost-prediction", columns=pcols, rows=prow,
            label_header="Run", caption=(
                "Training wall time predicted by `deconver plan` from the calibration when each run started, "
                "and measured (cost.json), both from Lightning's fit start (the job's start-up, imports and model "
                f"build, left out on both sides). {within:.0%} of {len(pred)} runs are within ±{TOLERANCE:.0%} of "
                "the measured time."))))
    return out
