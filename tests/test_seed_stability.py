"""benchmarks/seed_stability.py: the best model per dataset in two studies' aggregates, and its verdicts."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_stability.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_seed_stability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study(root: Path, scores: dict[str, dict[str, list[float]]], regions=("all",)) -> Path:
    """An aggregate/per_case.csv with Dice per dataset, model and case (and a metric that must be ignored)."""
    rows = []
    for dataset, models in scores.items():
        for model, values in models.items():
            for i, v in enumerate(values):
                for region in regions:
                    rows.append(dict(dataset=dataset, model=model, fold=0, case=f"c{i}", region=region,
                                     metric="dice", value=v))
                    rows.append(dict(dataset=dataset, model=model, fold=0, case=f"c{i}", region=region,
                                     metric="hd95", value=100.0 * (1 - v)))
    (root / "aggregate").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "aggregate" / "per_case.csv", index=False)
    return root


def test_verdicts_same_within_ci_and_changed(tmp_path):
    rng = np.random.default_rng(0)
    tight = lambda m: list(np.clip(m + rng.normal(0, 0.002, 10), 0, 1))  # noqa: E731
    wide = [0.99] * 9 + [0.0]  # one failed case: a wide CI
    first = _study(tmp_path / "a", {
        "same": {"deconver": tight(0.9), "unet": tight(0.8)},
        "tie": {"deconver": tight(0.95), "unet": tight(0.90)},
        "flip": {"deconver": tight(0.95), "unet": tight(0.90)},
    })
    second = _study(tmp_path / "b", {
        "same": {"deconver": tight(0.92), "unet": tight(0.7)},
        "tie": {"deconver": wide, "unet": tight(0.93)},        # unet best; deconver 0.891 outside its CI
        "flip": {"deconver": tight(0.80), "unet": tight(0.93)},
    })
    res = _module().compare(first, second)
    by = {r["dataset"]: r for r in res["datasets"]}
    assert by["same"]["verdict"] == "same" and by["same"]["symmetric"]
    assert (by["tie"]["best_first"], by["tie"]["best_second"]) == ("deconver", "unet")
    assert by["tie"]["verdict"] == "changed"  # deconver's 0.891 is outside unet's tight CI
    assert by["flip"]["verdict"] == "changed" and not res["all_stable"]
    assert by["same"]["lowest_dice"]["model"] == "unet" and by["same"]["lowest_dice"]["seed_run"] == "second"
    # within CI: the second seed's winner has a CI wide enough to hold the first winner's mean
    base = _study(tmp_path / "c", {"tie": {"deconver": tight(0.95), "unet": tight(0.9)}})
    second_wide = _study(tmp_path / "d", {"tie": {"deconver": tight(0.90), "unet": [0.999] * 9 + [0.2]}})
    (row,) = _module().compare(base, second_wide)["datasets"]
    s = row["second"]
    assert row["best_second"] == "unet" and s["unet"]["ci_low"] <= s["deconver"]["mean"]
    assert row["verdict"] == "within CI"


def test_regions_are_averaged_per_case_and_cli_writes_json(tmp_path):
    first = _study(tmp_path / "a", {"brats": {"deconver": [0.9] * 5, "unet": [0.8] * 5}}, regions=("ET", "TC", "WT"))
    second = _study(tmp_path / "b", {"brats": {"deconver": [0.7] * 5, "unet": [0.8] * 5}}, regions=("ET", "TC", "WT"))
    out = tmp_path / "out.json"
    rc = _module().main([str(first), str(second), "--out", str(out)])
    data = json.loads(out.read_text())
    (row,) = data["datasets"]
    assert rc == 1 and row["verdict"] == "changed" and row["first"]["deconver"]["n"] == 5  # 5 cases, not 15 rows
    assert data["provenance"]["git_commit"]


def test_missing_aggregate_names_the_file(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="per_case.csv: not found"):
        _module().compare(tmp_path / "nowhere", tmp_path / "nowhere")
