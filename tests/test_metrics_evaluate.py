"""`deconver evaluate` on real NIfTI/PNG files in tmp folders (hand-use mode), and on the real ISLES'22 case."""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deconver.cli import main
from deconver.config import load_preset
from deconver.metrics.challenge import brats23_lesionwise, glas_object_metrics, isles22_metrics, label_components
from deconver.metrics.evaluate import COLUMNS, evaluate_folder
from deconver.metrics.surface import HD_IMPL, compare_masks, diagonal

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ISLES_CASE = SHARED_DATA / "ISLES-2022-sample" / "derivatives" / "sub-strokecase0009" / "ses-0001" / \
    "sub-strokecase0009_ses-0001_msk.nii.gz"
SPACING = (1.0, 1.0, 2.0)


def write_nifti(path: Path, data: np.ndarray, spacing=SPACING):
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))


def brats_labels(shift=0, et=True):
    """A small BraTS-like label map: ED (2) around NCR (1) with an ET (3) rim."""
    lab = np.zeros((40, 36, 24), np.uint8)
    lab[8 + shift:30 + shift, 8:28, 4:20] = 2
    lab[12 + shift:26 + shift, 12:24, 7:17] = 1
    if et:
        lab[12 + shift:26 + shift, 12:24, 7] = 3
        lab[12 + shift:26 + shift, 12:24, 16] = 3
    return lab


@pytest.fixture()
def brats_dirs(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    write_nifti(gt_dir / "BraTS-GLI-00001-000.nii.gz", brats_labels())
    write_nifti(pred_dir / "BraTS-GLI-00001-000.nii.gz", brats_labels(shift=2))
    write_nifti(gt_dir / "BraTS-GLI-00002-000.nii.gz", brats_labels(et=False))   # no ET in the GT
    write_nifti(pred_dir / "BraTS-GLI-00002-000.nii.gz", brats_labels(et=True))  # spurious ET
    return gt_dir, pred_dir


def test_hand_mode_nifti_brats(brats_dirs, tmp_path, capsys):
    gt_dir, pred_dir = brats_dirs
    out = tmp_path / "eval" / "evaluation.csv"
    rc = main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--preset", "brats23",
               "--out", str(out), "--model", "unet", "--fold", "0", "--study", "demo"])
    assert rc == 0
    every = pd.read_csv(out)
    assert list(every.columns) == COLUMNS and set(every["convention"]) == {"suite", "challenge"}  # no prepared grid by hand
    df = every[every["convention"] == "suite"]
    assert set(df["hd_impl"]) == {HD_IMPL}
    assert set(df["spacing"]) == {"1x1x2"}
    assert set(df[df["metric"] == "hd95"]["unit"]) == {"mm"}
    assert (df["study"].unique().tolist(), df["model"].unique().tolist(), df["fold"].unique().tolist()) == (["demo"], ["unet"], [0])
    preset = load_preset("brats23")
    metrics_per_region = 3 + 5  # dice, hd95, nsd + brats23 lesion-wise dice, hd95, tp, fp, fn
    assert len(df) == 2 * len(preset.labels) * metrics_per_region
    # every value is what the metric functions give on the region masks, in mm
    for case, (g, p) in {"BraTS-GLI-00001-000": (brats_labels(), brats_labels(shift=2)),
                         "BraTS-GLI-00002-000": (brats_labels(et=False), brats_labels(et=True))}.items():
        for region, values in preset.labels.items():
            gm, pm = np.isin(g, values), np.isin(p, values)
            ref = compare_masks(pm, gm, SPACING, nsd_tolerance=preset.metrics.nsd_tolerance)
            lw = brats23_lesionwise(pm, gm, SPACING)
            rows = df[(df["case"] == case) & (df["region"] == region)].set_index("metric")
            for metric, expected in {"dice": ref.dice, "hd95": ref.hd95, "nsd": ref.nsd, **lw}.items():
                got = rows.loc[metric, "value"]
                assert got == pytest.approx(expected) or (math.isinf(got) and math.isinf(expected)), (case, region, metric)
            assert rows["gt_voxels"].iloc[0] == gm.sum() and rows["pred_voxels"].iloc[0] == pm.sum()
            assert rows["gt_empty"].iloc[0] == (gm.sum() == 0)
            assert rows["diagonal"].iloc[0] == pytest.approx(diagonal(g.shape, SPACING))
    et2 = df[(df["case"] == "BraTS-GLI-00002-000") & (df["region"] == "ET")].set_index("metric")
    assert bool(et2.loc["hd95", "gt_empty"]) and not bool(et2.loc["hd95", "pred_empty"])
    assert math.isinf(et2.loc["hd95", "value"])
    assert et2.loc["brats23_lw_hd95", "value"] == 374.0
    # the shift by 2 voxels along axis 0 (1 mm) gives HD95 2 mm on the whole tumour
    wt1 = df[(df["case"] == "BraTS-GLI-00001-000") & (df["region"] == "WT")].set_index("metric")
    assert wt1.loc["hd95", "value"] == pytest.approx(2.0)
    # the challenge convention: whole-region and lesion-wise HD95 by the surface-distance package
    import surface_distance

    challenge = every[every["convention"] == "challenge"]
    assert len(challenge) == 2 * len(preset.labels) * (2 + 5)  # dice, hd95 + lesion-wise dice, hd95, tp, fp, fn
    for case, (g, p) in {"BraTS-GLI-00001-000": (brats_labels(), brats_labels(shift=2))}.items():
        for region, values in preset.labels.items():
            gm, pm = np.isin(g, values), np.isin(p, values)
            rows = challenge[(challenge["case"] == case) & (challenge["region"] == region)].set_index("metric")
            ref = surface_distance.compute_robust_hausdorff(
                surface_distance.compute_surface_distances(gm, pm, SPACING), 95)
            assert rows.loc["hd95", "value"] == pytest.approx(ref, abs=1e-6)
            assert rows.loc["hd95", "hd_impl"] == "surface-distance-robust-hd95"
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["hd_impl"] == HD_IMPL and "hd_definition" in side and side["nsd_tolerance"] == 1.0
    assert side["provenance"]["deconver_version"] and side["cases"] == ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]

    # rerun: a no-op (file untouched); a changed prediction: recomputed
    mtime = out.stat().st_mtime_ns
    assert main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--preset", "brats23",
                 "--out", str(out), "--model", "unet", "--fold", "0", "--study", "demo"]) == 0
    assert out.stat().st_mtime_ns == mtime
    assert "up to date" in capsys.readouterr().err
    write_nifti(pred_dir / "BraTS-GLI-00001-000.nii.gz", brats_labels(shift=0))
    assert main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--preset", "brats23",
                 "--out", str(out), "--model", "unet", "--fold", "0", "--study", "demo"]) == 0
    df2 = pd.read_csv(out).query("convention == 'suite'")
    wt = df2[(df2["case"] == "BraTS-GLI-00001-000") & (df2["region"] == "WT")].set_index("metric")
    assert wt.loc["dice", "value"] == 1.0 and wt.loc["hd95", "value"] == 0.0


def test_missing_prediction_is_an_error_naming_the_case(brats_dirs, tmp_path, capsys):
    gt_dir, pred_dir = brats_dirs
    (pred_dir / "BraTS-GLI-00002-000.nii.gz").unlink()
    out = tmp_path / "evaluation.csv"
    rc = main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--preset", "brats23", "--out", str(out)])
    assert rc == 1
    assert "BraTS-GLI-00002-000" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_bad_predictions_are_errors_naming_the_file(brats_dirs, tmp_path, capsys):
    gt_dir, pred_dir = brats_dirs
    bad = brats_labels()
    bad[0, 0, 0] = 4  # not a label of the preset
    write_nifti(pred_dir / "BraTS-GLI-00001-000.nii.gz", bad)
    assert main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--preset", "brats23",
                 "--out", str(tmp_path / "e.csv")]) == 1
    err = capsys.readouterr().err
    assert "BraTS-GLI-00001-000.nii.gz" in err and "[4]" in err
    write_nifti(pred_dir / "BraTS-GLI-00001-000.nii.gz", brats_labels(), spacing=(1.0, 1.0, 1.0))
    assert main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--preset", "brats23",
                 "--out", str(tmp_path / "e.csv")]) == 1
    assert "spacing" in capsys.readouterr().err
    write_nifti(pred_dir / "BraTS-GLI-00001-000.nii.gz", brats_labels()[:-1])
    assert main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--preset", "brats23",
                 "--out", str(tmp_path / "e.csv")]) == 1
    assert "shape" in capsys.readouterr().err
    (pred_dir / "BraTS-GLI-00001-000.nii.gz").write_bytes(b"not a nifti")
    assert main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--preset", "brats23",
                 "--out", str(tmp_path / "e.csv")]) == 1
    assert "BraTS-GLI-00001-000.nii.gz" in capsys.readouterr().err


def test_hand_mode_png_glas_instances(tmp_path):
    """GlaS layout: GT instance maps `<case>_anno.bmp`, predictions 0/1 PNGs; pixel units, object metrics."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    anno = np.zeros((60, 80), np.uint8)
    anno[5:20, 5:25] = 1
    anno[5:20, 26:40] = 2    # next to gland 1 (column 25 is background between them)
    anno[35:55, 10:30] = 3
    pred = np.zeros_like(anno)
    pred[5:20, 5:40] = 1     # glands 1 and 2 merged into one object
    pred[40:50, 50:70] = 1   # spurious
    Image.fromarray(anno).save(gt_dir / "testA_1_anno.bmp")
    Image.fromarray(pred).save(pred_dir / "testA_1.png")
    (gt_dir / "Grade.csv").write_text("name, grade\r")  # stray non-image file is ignored
    out = evaluate_folder(pred_dir, gt_dir, "glas", tmp_path / "glas.csv", gt_suffix="_anno")
    df = pd.read_csv(out).query("convention == 'suite'").set_index("metric")
    assert set(df["case"]) == {"testA_1"} and set(df["region"]) == {"gland"}
    assert df.loc["hd95", "unit"] == "px" and df.loc["glas_object_hausdorff", "unit"] == "px"
    ref = glas_object_metrics(label_components(pred > 0)[0], anno)
    for name, expected in ref.items():
        assert df.loc[name, "value"] == pytest.approx(expected), name
    # merged pair: the object's partner is gland 1 (its largest overlap), fully covered → TP; gland 2 FN;
    # gland 3 FN; the spurious object FP
    assert (df.loc["glas_tp", "value"], df.loc["glas_fp", "value"], df.loc["glas_fn", "value"]) == (1, 1, 2)
    assert df.loc["dice", "value"] == pytest.approx(compare_masks(pred > 0, anno > 0).dice)
    assert df.loc["hd95", "diagonal"] == pytest.approx(math.hypot(60, 80))


@pytest.mark.skipif(not ISLES_CASE.is_file(), reason="real ISLES'22 sample not present (../shared/data)")
def test_real_isles22_case_against_monai(tmp_path):
    """The official ISLES'22 example mask, as GT; prediction = GT minus its smallest lesion, dilated once."""
    import torch
    from monai.metrics import compute_hausdorff_distance
    from scipy import ndimage

    img = nib.load(str(ISLES_CASE))
    gt = np.asanyarray(img.dataobj) > 0
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    labels, n = ndimage.label(gt, structure=np.ones((3, 3, 3)))
    assert n >= 2, "the sample has several lesions"
    sizes = np.bincount(labels.ravel())[1:]
    pred = ndimage.binary_dilation(gt & (labels != 1 + int(np.argmin(sizes))))
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    shutil.copy(ISLES_CASE, gt_dir / "sub-strokecase0009.nii.gz")
    nib.save(nib.Nifti1Image(pred.astype(np.uint8), img.affine, img.header), str(pred_dir / "sub-strokecase0009.nii.gz"))
    out = evaluate_folder(pred_dir, gt_dir, "isles22", tmp_path / "isles.csv", model="x", fold=1)
    df = pd.read_csv(out).query("convention == 'suite'").set_index("metric")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = compute_hausdorff_distance(torch.from_numpy(pred[None, None]).float(), torch.from_numpy(gt[None, None]).float(),
                                         include_background=True, percentile=95, spacing=list(spacing)).item()
    assert df.loc["hd95", "value"] == pytest.approx(ref, rel=1e-5)
    assert df.loc["hd95", "spacing"] == "x".join(f"{s:g}" for s in spacing)
    # pred lesions: the dilated remaining ones, which may merge; GT lesions: n; missed: 1
    n_pred = label_components(pred)[1]
    assert df.loc["isles22_fn", "value"] == 1 and df.loc["isles22_fp", "value"] == 0
    assert df.loc["isles22_lesion_f1", "value"] == pytest.approx((n - 1) / (n - 1 + 0.5))
    assert df.loc["isles22_lesion_count_diff", "value"] == abs(n - n_pred)
    voxel_ml = float(np.prod(spacing)) / 1000
    assert df.loc["isles22_volume_diff_ml", "value"] == pytest.approx(abs(int(pred.sum()) - int(gt.sum())) * voxel_ml)
    assert isles22_metrics(pred, gt, spacing)["isles22_lesion_f1"] == df.loc["isles22_lesion_f1", "value"]


def test_pipeline_mode_arguments_are_checked(tmp_path, capsys):
    assert main(["evaluate", "--config", str(tmp_path / "missing.yaml"), "--dataset", "d"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["evaluate", "--pred-dir", str(tmp_path)]) == 2
    assert "--gt-dir" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


HIPPO = SHARED_DATA / "Task04_Hippocampus"


@pytest.mark.skipif(not (HIPPO / "dataset.json").is_file(), reason="real Hippocampus data not present (../shared/data)")
def test_pipeline_mode_on_real_hippocampus_cases(tmp_path, capsys):
    """prepare → split (the data step's real code) → predictions written with `save_native` →
    `deconver evaluate --config … --dataset … --model … --fold …`."""
    import yaml

    data = pytest.importorskip("deconver.data")
    from deconver.config import load_study
    from deconver.paths import StudyPaths

    task = tmp_path / "Task04_Hippocampus"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    spec = json.loads((HIPPO / "dataset.json").read_text())
    spec["training"] = spec["training"][:6]
    for item in spec["training"]:
        for key in ("image", "label"):
            shutil.copy(HIPPO / item[key], task / item[key])
    spec["numTraining"] = len(spec["training"])
    (task / "dataset.json").write_text(json.dumps(spec))
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "study": "metrics_it", "results_dir": str(tmp_path / "results"), "reports_dir": str(tmp_path / "reports"),
        "num_folds": 2, "folds": [0], "models": ["unet"],
        "datasets": {"hippocampus": {"preset": "hippocampus", "root": str(task)}},
    }))
    args = ["--config", str(config), "--dataset", "hippocampus"]
    assert main(["prepare", *args]) == 0
    assert main(["split", *args]) == 0
    study = load_study(config)
    paths = StudyPaths.of(study)
    val = json.loads(paths.split("hippocampus").read_text())["folds"][0]["val"]
    prepared = data.PreparedDataset(paths.prepared("hippocampus"))
    pred_dir = paths.predictions("hippocampus", "unet", 0)
    expected = {}
    for i, case in enumerate(val):
        gt, spacing = data.load_native_label(prepared.case(case))
        pred = gt.copy()
        if i == 0:
            pred[pred == 2] = 0                     # posterior missed entirely: one empty side
        else:
            pred = np.roll(pred, 1, axis=0)         # shifted by one voxel
        data.save_native(pred, prepared.case(case), pred_dir / f"{case}.nii.gz")
        expected[case] = (pred, gt, spacing)
    eval_args = ["evaluate", *args, "--model", "unet", "--fold", "0"]
    assert main(eval_args) == 0
    out = paths.evaluation("hippocampus", "unet", 0)
    df = pd.read_csv(out)
    assert sorted(df["case"].unique()) == sorted(val)
    assert set(df["study"]) == {"metrics_it"} and set(df["fold"]) == {0} and set(df["unit"]) <= {"mm", "ratio"}
    for case, (pred, gt, spacing) in expected.items():
        for region, values in {"anterior": [1], "posterior": [2]}.items():
            ref = compare_masks(np.isin(pred, values), np.isin(gt, values), spacing, nsd_tolerance=1.0)
            rows = df[(df["case"] == case) & (df["region"] == region)].set_index("metric")
            assert rows.loc["dice", "value"] == pytest.approx(ref.dice)
            assert rows.loc["hd95", "value"] == pytest.approx(ref.hd95) or math.isinf(ref.hd95)
            assert rows.loc["nsd", "value"] == pytest.approx(ref.nsd)
    missed = df[(df["case"] == val[0]) & (df["region"] == "posterior") & (df["metric"] == "hd95")]
    assert bool(missed["pred_empty"].item()) and math.isinf(missed["value"].item())
    assert json.loads(out.with_suffix(".json").read_text())["split_file"].endswith("hippocampus.json")
    # rerun: no-op; a missing prediction: an error naming the case
    mtime = out.stat().st_mtime_ns
    capsys.readouterr()
    assert main(eval_args) == 0 and out.stat().st_mtime_ns == mtime
    (pred_dir / f"{val[-1]}.nii.gz").unlink()
    assert main(eval_args) == 1
    assert val[-1] in capsys.readouterr().err
