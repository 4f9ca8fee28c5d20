"""The report's input: the aggregate folder (`deconver aggregate`'s output) read into memory, checked."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from deconver.steps import StepError


def to_float(v) -> float:
    """A number read from an input (CSV cell, JSON value) as a float; NaN when it is none."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


class ReportError(StepError, RuntimeError):
    """An input of the report is missing or malformed; the message names the file."""


@dataclass
class Aggregate:
    """The aggregate folder in memory."""

    directory: Path
    meta: dict[str, Any]
    per_case: pd.DataFrame
    summary: pd.DataFrame
    complexity: pd.DataFrame | None
    training: pd.DataFrame | None
    files: list[Path] = field(default_factory=list)
    conventions: pd.DataFrame | None = None

    @property
    def reference(self) -> str:
        return self.meta.get("reference", "deconver")

    def ds(self, name: str) -> dict[str, Any]:
        return self.meta["datasets"][name]

    def primary_region(self, dataset: str) -> str:
        regions = sorted(set(self.per_case.loc[self.per_case["dataset"] == dataset, "region"]))
        if "mean" in regions:
            return "mean"
        declared = [r for r in self.ds(dataset).get("regions", []) if r in regions]
        return declared[0] if declared else (regions[0] if regions else "")


def load_aggregate(directory: Path) -> Aggregate:
    """Read `aggregate.json`, `per_case.csv`, `summary.csv` and, when present, complexity and training."""
    directory = Path(directory)
    need = [directory / "aggregate.json", directory / "per_case.csv", directory / "summary.csv"]
    for p in need:
        if not p.is_file():
            raise ReportError(f"missing aggregate file: {p} (run `deconver aggregate` first)")
    try:
        meta = json.loads(need[0].read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{need[0]}: not valid JSON: {err}") from None
    per_case = pd.read_csv(need[1], dtype={"case": str, "region": str, "metric": str, "model": str, "dataset": str})
    summary = pd.read_csv(need[2], dtype={"region": str, "metric": str, "model": str, "dataset": str})
    files = list(need) + [p for p in (directory / "conventions_summary.csv",) if p.is_file()]
    cx = tr = None
    if meta.get("complexity"):
        p = directory / "complexity.csv"
        if not p.is_file():
            raise ReportError(f"missing aggregate file: {p} (complexity is active in this study)")
        cx = pd.read_csv(p, dtype={"model": str, "dataset": str})
        files.append(p)
    if (directory / "training.csv").is_file():
        tr = pd.read_csv(directory / "training.csv", dtype={"model": str, "dataset": str})
        files.append(directory / "training.csv")
    from deconver.report.conventions import OUTPUTS as CONVENTION_OUTPUTS
    from deconver.report.ranking_section import read_conventions

    conventions = read_conventions(directory)  # every metric convention's per-case rows, when aggregate wrote them
    if conventions is not None:
        files.append(directory / CONVENTION_OUTPUTS[0])
    return Aggregate(directory, meta, per_case, summary, cx, tr, files, conventions)
