"""The metric settings a dataset's runs were evaluated with, and whether they differ between runs.

Every `deconver evaluate` writes its settings into the sidecar ``evaluation.json``
(``metric_settings``: HD implementation, regions, NSD tolerance, challenge, region source …; defined by
``deconver.metrics.evaluate.metric_settings``). Runs evaluated before that key existed are read from the
sidecar's older keys. `aggregate` records the result per dataset and the report flags a dataset whose
runs differ: their numbers are not comparable (e.g. one model's runs evaluated with another NSD tolerance).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from deconver.io import read_record

LEGACY_KEYS = ("hd_impl", "labels", "nsd_tolerance", "challenge")


def run_settings(evaluation_csv: Path) -> dict | None:
    """The metric settings of one run (from the JSON beside its evaluation.csv); None without a sidecar."""
    side = Path(evaluation_csv).with_suffix(".json")
    info = read_record(side)
    if info is None:
        return None
    if isinstance(info.get("metric_settings"), dict):
        return info["metric_settings"]
    return {k: info[k] for k in LEGACY_KEYS if k in info} or None


def compare_settings(runs: Iterable[tuple[str, Path]]) -> dict:
    """``{"groups": [{"settings", "runs"}], "differ": bool, "differing_keys": [...], "unknown": [runs]}`` for
    (run name, evaluation.csv) pairs: one group per distinct settings, runs without a sidecar listed apart."""
    groups: dict[str, dict] = {}
    unknown = []
    for name, path in runs:
        settings = run_settings(path)
        if settings is None:
            unknown.append(name)
            continue
        key = json.dumps(settings, sort_keys=True, default=str)
        groups.setdefault(key, {"settings": settings, "runs": []})["runs"].append(name)
    listed = list(groups.values())
    keys = sorted({k for g in listed for k in g["settings"]})
    differing = [k for k in keys
                 if len({json.dumps(g["settings"].get(k), sort_keys=True, default=str) for g in listed}) > 1]
    return {"groups": listed, "differ": len(listed) > 1, "differing_keys": differing, "unknown": unknown}


def settings_warning(dataset: str, comparison: dict) -> str | None:
    """One sentence for the report when a dataset's runs were evaluated with different metric settings."""
    if not comparison or not comparison.get("differ"):
        return None
    parts = []
    for group in comparison["groups"]:
        values = ", ".join(f"{k} = {json.dumps(group['settings'].get(k), default=str)}"
                           for k in comparison["differing_keys"])
        runs = group["runs"]
        shown = ", ".join(runs[:6]) + (f" … ({len(runs)} runs)" if len(runs) > 6 else "")
        parts.append(f"{values} ({shown})")
    return (f"Dataset {dataset}: its runs were evaluated with different metric settings, so their numbers are "
            f"not comparable — {'; '.join(parts)}. Re-run `deconver evaluate --force` on the odd runs.")
