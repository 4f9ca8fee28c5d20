"""What `deconver aggregate` reads: evaluation.csv, train_log.csv and complexity JSONs, checked.

Each run's evaluation.csv and train_log.csv and the complexity JSONs are checked against their
contracts (docs/ARCHITECTURE.md); every error names the file."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from deconver.metrics.empty_rules import as_bool
from deconver.report.inputs import to_float
from deconver.steps import StepError

EVAL_COLUMNS = ["study", "dataset", "model", "fold", "case", "region", "metric", "value",
                "gt_voxels", "pred_voxels", "gt_empty", "pred_empty", "spacing", "unit", "hd_impl"]


class AggregateError(StepError, RuntimeError):
    """An input of the aggregation is missing or malformed; the message names the file."""


def read_evaluation(path: Path) -> pd.DataFrame:
    """One run's evaluation.csv with the contract's columns checked (error names the file)."""
    if not path.is_file():
        raise AggregateError(f"missing evaluation file: {path}")
    try:
        df = pd.read_csv(path, dtype={"case": str, "region": str, "metric": str, "unit": str, "hd_impl": str},
                         keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise AggregateError(f"{path}: not a readable CSV: {err}") from None
    missing = [c for c in EVAL_COLUMNS if c not in df.columns]
    if missing:
        raise AggregateError(f"{path}: missing columns {missing} (expected {EVAL_COLUMNS})")
    df["value"] = pd.to_numeric(df["value"], errors="coerce")  # 'inf' / 'nan' strings become floats
    for col in ("gt_empty", "pred_empty"):
        df[col] = as_bool(df[col])
    return df


def read_complexity(path: Path) -> dict[str, Any]:
    """The complexity columns of one `<model>.json` (deconver complexity), in report units."""
    if not path.is_file():
        raise AggregateError(f"missing complexity file: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AggregateError(f"{path}: not valid JSON: {err}") from None
    return complexity_row(data, path)


def _find(data: dict, *candidates: str):
    """The first present value among dotted key paths."""
    for cand in candidates:
        cur: Any = data
        for part in cand.split("."):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                break
        else:
            if cur is not None and not isinstance(cur, dict):
                return cur
    return None


def complexity_row(data: dict, source: Path | str = "<json>") -> dict[str, Any]:
    """Normalise a complexity record (deconver.complexity.record) to the report's columns: params_m,
    params_trainable_m, flops_per_voxel_k (flop_counter, 2 FLOPs per MAC, NDC convolutions included),
    paper_flops_per_voxel_k, latency_ms / train_step_ms (medians), peak_memory_mb / train_peak_memory_mb,
    device, runtime_roi, repeats, flops_agree and flags (the cross-check's)."""
    params = to_float(_find(data, "params.total", "params_total", "params"))
    trainable = to_float(_find(data, "params.trainable", "params_trainable"))
    flops_k = to_float(_find(data, "flops_per_voxel_k"))
    paper_k = to_float(_find(data, "paper_flops_per_voxel_k", "paper_convention.flops_per_voxel_k"))
    if math.isnan(params) or math.isnan(flops_k):
        raise AggregateError(f"{source}: no parameter count (params.total) or flops_per_voxel_k "
                             f"(keys: {sorted(data)})")
    flags = data.get("flags") or []
    return dict(params_m=params / 1e6, params_trainable_m=trainable / 1e6, flops_per_voxel_k=flops_k,
                paper_flops_per_voxel_k=paper_k,
                latency_ms=to_float(_find(data, "latency_ms.forward", "runtime.forward_ms")),
                train_step_ms=to_float(_find(data, "latency_ms.train_step", "runtime.train_step_ms")),
                peak_memory_mb=to_float(_find(data, "peak_memory_mb.forward", "runtime.forward_peak_mb")),
                train_peak_memory_mb=to_float(_find(data, "peak_memory_mb.train_step", "runtime.train_step_peak_mb")),
                memory_method=_find(data, "peak_memory_mb.method", "runtime.memory_method"),
                device=_find(data, "device", "runtime.device_name"),
                runtime_roi="x".join(str(r) for r in (data.get("runtime") or {}).get("roi") or []) or None,
                repeats=_find(data, "runtime.repeats"),
                flops_agree=_find(data, "flops_agree", "cross_check.agree"),
                flags="; ".join(str(f) for f in flags) if isinstance(flags, list) else str(flags))


def read_train_log(path: Path) -> pd.DataFrame:
    """One run's train_log.csv (error names the file)."""
    if not path.is_file():
        raise AggregateError(f"missing training log: {path}")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise AggregateError(f"{path}: not a readable CSV: {err}") from None
