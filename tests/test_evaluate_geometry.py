"""Hand evaluation compares the full geometry of prediction and ground truth (orientation, origin,
spacing, direction) and refuses a mismatch naming both files, or resamples with --resample; pipeline
evaluation names a split that lists a case the prepared data lacks (issue 21)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from deconver.cli import main

SPACING = (1.0, 1.0, 2.0)


def _labels() -> np.ndarray:
    lab = np.zeros((40, 36, 24), np.uint8)
    lab[6:30, 8:28, 4:20] = 2
    lab[12:20, 12:24, 7:17] = 1   # off centre along x, so a flipped copy does not overlap itself
    lab[12:20, 12:24, 7] = 3
    return lab


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))
    return path


@pytest.fixture()
def dirs(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    affine = np.diag([*SPACING, 1.0])
    _save(gt_dir / "case1.nii.gz", _labels(), affine)
    return gt_dir, pred_dir, affine


def _evaluate(gt_dir, pred_dir, out, *extra) -> int:
    return main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--preset", "brats23",
                 "--out", str(out), *extra])


def _dice(out: Path) -> dict:
    df = pd.read_csv(out)
    return df[df.metric == "dice"].set_index("region")["value"].to_dict()


def _las(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with the first axis flipped (LAS instead of RAS): same world content."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, shape[0] - 1
    return _labels()[::-1].copy(), affine @ flip


def test_same_grid_scores_normally(dirs, tmp_path):
    gt_dir, pred_dir, affine = dirs
    _save(pred_dir / "case1.nii.gz", _labels(), affine)
    assert _evaluate(gt_dir, pred_dir, tmp_path / "e.csv") == 0
    assert all(v == 1.0 for v in _dice(tmp_path / "e.csv").values())


@pytest.mark.parametrize("change", ["las", "shift", "spacing"])
def test_a_prediction_on_another_grid_is_refused_naming_both_files(dirs, tmp_path, capsys, change):
    gt_dir, pred_dir, affine = dirs
    data = _labels()
    if change == "las":
        data, affine = _las(affine, data.shape)
    elif change == "shift":
        affine = affine.copy()
        affine[0, 3] += 20.0   # 20 mm away: voxel-wise identical, in the world elsewhere
    else:
        affine = np.diag([1.0, 1.0, 2.5, 1.0])
    pred = _save(pred_dir / "case1.nii.gz", data, affine)
    assert _evaluate(gt_dir, pred_dir, tmp_path / "e.csv") == 1
    err = capsys.readouterr().err
    assert str(pred) in err and str(gt_dir / "case1.nii.gz") in err
    assert {"las": "orientation", "shift": "origin", "spacing": "spacing"}[change] in err
    assert "--resample" in err and not (tmp_path / "e.csv").exists()


def test_resample_puts_the_prediction_on_the_ground_truth_grid(dirs, tmp_path):
    gt_dir, pred_dir, affine = dirs
    data, las = _las(affine, _labels().shape)
    _save(pred_dir / "case1.nii.gz", data, las)   # the ground truth, stored LAS
    assert _evaluate(gt_dir, pred_dir, tmp_path / "e.csv", "--resample") == 0
    assert all(v == 1.0 for v in _dice(tmp_path / "e.csv").values())
    assert json.loads((tmp_path / "e.json").read_text())["resample"] is True


def test_split_listing_an_unknown_case_is_one_clear_error(tmp_path, capsys):
    from deconver.data.synth import write_synthetic

    root = write_synthetic("isles22", tmp_path / "isles22", cases=4, seed=1)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "study": "geo", "results_dir": str(tmp_path / "results"), "reports_dir": str(tmp_path / "reports"),
        "num_folds": 2, "folds": [0], "models": ["unet"],
        "datasets": {"isles22": {"preset": "isles22", "root": str(root)}}}))
    args = ["--config", str(config), "--dataset", "isles22"]
    assert main(["prepare", *args, "--no-progress"]) == 0
    assert main(["split", *args]) == 0
    split = tmp_path / "results" / "geo" / "splits" / "isles22.json"
    data = json.loads(split.read_text())
    data["folds"][0]["val"].append("sub-strokecase9999")
    split.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["evaluate", *args, "--model", "unet", "--fold", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sub-strokecase9999" in err and str(split) in err
    assert "rerun `deconver split`" in err
