"""The report shows object metrics where evaluate computed them, flags runs evaluated with different metric
settings, and prints the paper's row only for a dataset marked as the paper's (issue 24, items 6-7)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deconver.config import load_preset
from deconver.metrics.evaluate import evaluate_folder
from deconver.report.aggregate import aggregate, plan_from_tree
from deconver.report.render import report
from test_metrics_dense import bench

MODELS = {"deconver": 0, "unet": 1}  # model -> erosion of the predicted nuclei


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """runs/glas/<model>/fold0/evaluation.csv from real evaluations of three nuclei tiles; unet's runs with
    another NSD tolerance (as if its evaluation had used other settings)."""
    from scipy import ndimage

    root = tmp_path_factory.mktemp("objects")
    gt_dir = root / "gt"
    gt_dir.mkdir()
    preds = {}
    for k in range(3):
        pred, gt = bench.nuclei_case(160, seed=30 + k)
        Image.fromarray(gt.astype(np.uint16)).save(gt_dir / f"testA_{k + 1}_anno.png")
        preds[k] = pred > 0
    for model, erosion in MODELS.items():
        pred_dir = root / "pred" / model
        pred_dir.mkdir(parents=True)
        for k, mask in preds.items():
            mask = ndimage.binary_erosion(mask, iterations=erosion) if erosion else mask
            Image.fromarray(mask.astype(np.uint8)).save(pred_dir / f"testA_{k + 1}.png")
        preset = load_preset("glas", {"metrics": {"nsd_tolerance": 3.0}} if model == "unet" else None)
        evaluate_folder(pred_dir, gt_dir, preset, root / "results" / "runs" / "glas" / model / "fold0" / "evaluation.csv",
                        gt_suffix="_anno", dataset="glas", model=model, fold=0, workers=1)
    return root / "results"


def _report(results, out, paper):
    plan = plan_from_tree(results, paper=paper)
    aggregate(plan, out / "aggregate", force=True)
    report(out / "aggregate", out / "report", force=True, n_resamples=200)
    return out / "report"


def test_object_metrics_table_and_settings_flag(results, tmp_path):
    rep = _report(results, tmp_path, paper=[])
    table = pd.read_csv(rep / "tables" / "glas_objects.csv").set_index("model")
    for model in MODELS:
        ev = pd.read_csv(results / "runs" / "glas" / model / "fold0" / "evaluation.csv")
        ev = ev[ev["convention"] == "suite"]  # the report's tables are the suite's convention
        per = ev.groupby("metric")["value"]
        assert table.loc[model, "glas_object_dice@gland"] == pytest.approx(per.mean()["glas_object_dice"] * 100)
        assert table.loc[model, "glas_object_f1@gland"] == pytest.approx(per.mean()["glas_object_f1"] * 100)
        assert table.loc[model, "glas_object_hausdorff@gland"] == pytest.approx(per.mean()["glas_object_hausdorff"])
        totals = "/".join(str(int(per.sum()[f"glas_{c}"])) for c in ("tp", "fp", "fn"))
        assert table.loc[model, "counts@gland"] == totals
    md = (rep / "tables" / "glas_objects.md").read_text()
    assert "Object Hausdorff (px)" in md and "TP/FP/FN" in md and "GlaS 2015 object-level" in md
    page = (rep / "report.html").read_text()
    assert "Object-level metrics" in page
    # unet was evaluated with another NSD tolerance: flagged on the page and in the dataset's tables
    assert "Different metric settings" in page and "nsd_tolerance = 3.0 (unet/fold0)" in page
    assert "The runs of glas were not all evaluated with the same metric settings" in page  # study-level banner
    assert "nsd_tolerance = 2.0 (deconver/fold0)" in (rep / "tables" / "glas.md").read_text()
    # the dataset is named like the GlaS preset, but nothing marks it as the paper's: no paper row
    assert not (rep / "tables" / "reproduction.md").exists()


def test_the_papers_row_only_for_a_dataset_marked_as_the_papers(results, tmp_path):
    rep = _report(results, tmp_path, paper=["glas"])
    frame = pd.read_csv(rep / "tables" / "reproduction.csv").set_index("dataset")
    assert list(frame.index) == ["glas"] and frame.loc["glas", "dice_paper"] == pytest.approx(92.12)
