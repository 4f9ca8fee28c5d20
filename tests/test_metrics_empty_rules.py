"""Empty-mask rules: every empty-mask combination under each rule, the case counts, and the MONAI reproduction."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from deconver.config import load_preset
from deconver.metrics.empty_rules import apply_rule, summarize
from deconver.metrics.evaluate import evaluate_case
from deconver.metrics.surface import diagonal

SHAPE = (20, 16, 12)
SPACING = (1.0, 1.0, 2.0)


def blob(lo, hi):
    m = np.zeros(SHAPE, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def cases():
    """Five binary cases: both non-empty (two), both empty, prediction empty (missed), GT empty (spurious)."""
    z = np.zeros(SHAPE, bool)
    return {
        "hit": (blob((3, 3, 3), (9, 9, 7)), blob((4, 3, 3), (10, 9, 7))),
        "hit2": (blob((10, 5, 2), (15, 12, 8)), blob((10, 6, 2), (16, 12, 9))),
        "both_empty": (z, z),
        "missed": (z, blob((2, 2, 2), (6, 6, 6))),
        "spurious": (blob((12, 2, 2), (15, 5, 5)), z),
    }


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    preset = load_preset("isles22", {"metrics": {"challenge": None}})  # binary 3D, no challenge metrics
    rows = []
    for name, (pred, gt) in cases().items():
        rows += evaluate_case(name, pred.astype(np.int64), gt.astype(np.int64), SPACING, preset,
                              ids={"study": "s", "dataset": "d", "model": "m", "fold": 0})
    return pd.DataFrame(rows)


def value(df, case, metric):
    sel = df[(df["case"] == case) & (df["metric"] == metric)]
    return sel["value"].item() if len(sel) else None


def test_raw_values_keep_nan_and_inf(table):
    assert math.isnan(value(table, "both_empty", "dice")) and math.isnan(value(table, "both_empty", "hd95"))
    assert value(table, "missed", "hd95") == math.inf and value(table, "spurious", "hd95") == math.inf
    assert value(table, "missed", "dice") == 0.0 and value(table, "spurious", "nsd") == 0.0


def test_penalize_rule_each_empty_combination(table):
    values, counts = apply_rule(table, "penalize", penalty=374.0)
    assert len(values) == len(table)  # nothing dropped
    assert (value(values, "both_empty", "dice"), value(values, "both_empty", "hd95"), value(values, "both_empty", "nsd")) == (1.0, 0.0, 1.0)
    for case in ("missed", "spurious"):
        assert (value(values, case, "dice"), value(values, case, "hd95"), value(values, case, "nsd")) == (0.0, 374.0, 0.0)
    for case in ("hit", "hit2"):
        for metric in ("dice", "hd95", "nsd"):
            assert value(values, case, metric) == value(table, case, metric)
    assert math.isnan(values.loc[(values["case"] == "both_empty") & (values["metric"] == "hd95"), "raw_value"].item())
    hd = counts[counts["metric"] == "hd95"].iloc[0]
    assert (hd["n_cases"], hd["n_used"], hd["n_measured"], hd["n_both_empty"], hd["n_penalized"], hd["n_excluded"]) == (5, 5, 2, 1, 2, 0)


def test_diagonal_penalty_is_the_cases_image_diagonal(table):
    values, _ = apply_rule(table, "penalize", penalty="diagonal")
    assert value(values, "missed", "hd95") == pytest.approx(diagonal(SHAPE, SPACING))
    per_dataset, _ = apply_rule(table, "penalize", penalty={"d": 99.0})
    assert value(per_dataset, "spurious", "hd95") == 99.0


def test_exclude_rule_each_empty_combination(table):
    values, counts = apply_rule(table, "exclude")
    # Dice: both empty 1, one empty 0, kept; HD95: every case with an empty side dropped;
    # NSD: both empty dropped, one empty 0
    assert (value(values, "both_empty", "dice"), value(values, "missed", "dice"), value(values, "spurious", "dice")) == (1.0, 0.0, 0.0)
    assert value(values, "both_empty", "hd95") is None and value(values, "missed", "hd95") is None
    assert value(values, "spurious", "hd95") is None and value(values, "hit", "hd95") is not None
    assert value(values, "both_empty", "nsd") is None and value(values, "missed", "nsd") == 0.0
    by_metric = counts.set_index("metric")
    assert by_metric.loc["hd95", "n_excluded"] == 3 and by_metric.loc["hd95", "n_used"] == 2
    assert by_metric.loc["dice", "n_excluded"] == 0 and by_metric.loc["dice", "n_penalized"] == 2
    assert by_metric.loc["nsd", "n_excluded"] == 1


def test_exclude_reproduces_monai_metric_objects(table):
    """The authors' numbers: MONAI DiceMetric(ignore_empty=False), HausdorffDistanceMetric(95),
    SurfaceDiceMetric, each averaged by MONAI's NaN-skipping mean."""
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

    dm = DiceMetric(include_background=True, ignore_empty=False)
    hm = HausdorffDistanceMetric(include_background=True, percentile=95)
    sm = SurfaceDiceMetric(class_thresholds=[1.0], include_background=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pred, gt in cases().values():
            P, G = torch.from_numpy(pred[None, None]).float(), torch.from_numpy(gt[None, None]).float()
            dm(P, G)
            hm(P, G, spacing=list(SPACING))
            sm(P, G, spacing=list(SPACING))
        refs = {"dice": dm.aggregate().item(), "hd95": hm.aggregate().item(), "nsd": sm.aggregate().item()}
    # the NSD tolerance comes from the preset (2.0 for isles22): recompute at 1.0, as given to MONAI
    preset = load_preset("isles22", {"metrics": {"challenge": None, "nsd_tolerance": 1.0}})
    rows = []
    for name, (pred, gt) in cases().items():
        rows += evaluate_case(name, pred.astype(np.int64), gt.astype(np.int64), SPACING, preset)
    summary = summarize(pd.DataFrame(rows), "exclude").set_index("metric")
    for metric, ref in refs.items():
        assert summary.loc[metric, "mean"] == pytest.approx(ref, rel=1e-5), metric
    # and the penalize rule gives a different (worse) HD95 on the same cases
    assert summarize(pd.DataFrame(rows), "penalize", 374.0).set_index("metric").loc["hd95", "mean"] > refs["hd95"] + 100


def test_rule_reads_its_own_csv_round_trip(table, tmp_path):
    path = tmp_path / "evaluation.csv"
    table.to_csv(path, index=False, na_rep="nan")
    back = pd.read_csv(path)
    assert math.isnan(value(back, "both_empty", "hd95")) and value(back, "missed", "hd95") == math.inf
    a, ca = apply_rule(back, "penalize", "diagonal")
    b, cb = apply_rule(table, "penalize", "diagonal")
    assert np.allclose(a["value"].to_numpy(float), b["value"].to_numpy(float))
    assert ca["n_penalized"].tolist() == cb["n_penalized"].tolist()


def test_challenge_metrics_pass_through_and_inf_is_penalised():
    df = pd.DataFrame({
        "dataset": ["glas"] * 3, "case": ["a", "b", "c"], "region": ["gland"] * 3,
        "metric": ["glas_object_hausdorff", "glas_object_hausdorff", "glas_object_f1"],
        "value": [12.5, math.inf, 0.4], "gt_empty": [False, False, False], "pred_empty": [False, True, True],
        "diagonal": [100.0, 200.0, 300.0],
    })
    values, counts = apply_rule(df, "penalize", "diagonal")
    assert values["value"].tolist() == [12.5, 200.0, 0.4]
    assert counts.set_index("metric").loc["glas_object_hausdorff", "n_penalized"] == 1
    excluded, counts = apply_rule(df, "exclude")
    assert excluded["value"].tolist() == [12.5, 0.4]
    assert counts.set_index("metric").loc["glas_object_hausdorff", "n_excluded"] == 1


def test_bad_arguments():
    df = pd.DataFrame({"metric": ["hd95"], "value": [math.inf], "gt_empty": [True], "pred_empty": [False]})
    with pytest.raises(ValueError, match="rule"):
        apply_rule(df, "ignore")
    with pytest.raises(ValueError, match="diagonal"):
        apply_rule(df, "penalize", "diagonal")  # needed here, and there is no diagonal column
    with pytest.raises(ValueError, match="penalty"):
        apply_rule(df, "penalize", "huge")
    with pytest.raises(ValueError, match="lacks"):
        apply_rule(df.drop(columns=["gt_empty"]))
    assert apply_rule(df, "penalize", 5.0)[0]["value"].item() == 5.0
