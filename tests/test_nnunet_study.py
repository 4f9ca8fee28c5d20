"""nnU-Net v2 datasets in a study without a preset, and `deconver preset --from`.

A 2D RGB PNG dataset and a 3D two-channel region dataset in MHA (dataset.json written by nnunetv2's own
`generate_dataset_json`) each run a tiny study that names the dataset by `root` only: the preset is
planned from the data, then prepare, split (the official imagesTs/labelsTs split), train, predict (in the
native grid and format), evaluate, aggregate and report. The planning rules are checked on their own.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from deconver.cli import main as cli
from deconver.config import ConfigError, load_preset, load_study
from deconver.data.autopreset import fit_roi, model_constraints, target_spacing
from nnunet_data import write_regions_dataset, write_rgb_png_dataset

TINY = {"epochs": 2, "steps_per_epoch": 3, "val_every": 2, "warmup_epochs": 1, "lr": 1e-3, "num_workers": 0,
        "sw_batch_size": 2, "sw_overlap": 0.25}


def study_of(tmp: Path, root: Path, name: str, models: dict) -> Path:
    study = {"study": name, "results_dir": str(tmp / "results"), "reports_dir": str(tmp / "reports"),
             "num_folds": 2, "folds": [0], "split": "official", "models": list(models),
             "model_overrides": models, "trainer": {"accelerator": "cpu"}, "complexity": {"activate": False},
             "datasets": {"mydata": {"root": str(root), "overrides": {"protocol": TINY}}}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def run_study(cfg: Path) -> None:
    base = ["--config", str(cfg)]
    data = [*base, "--dataset", "mydata"]
    for model in load_study(cfg).models:
        run = [*data, "--model", model, "--fold", "0"]
        steps = [["prepare", *data, "--no-progress"], ["split", *data], ["train", *run, "--no-progress"],
                 ["predict", *run, "--no-progress"], ["evaluate", *run]]
        for step in steps if model == load_study(cfg).models[0] else steps[2:]:
            assert cli(step) == 0, step
    assert cli(["aggregate", *base, "--reference", load_study(cfg).models[0]]) == 0
    assert cli(["report", *base, "--resamples", "200"]) == 0


@pytest.mark.timeout(900)
def test_png_dataset_without_preset_runs_to_a_report(tmp_path):
    root = write_rgb_png_dataset(tmp_path / "Dataset901_Discs", tmp_path)
    cfg = study_of(tmp_path, root, "png", {"unet": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}})
    study = load_study(cfg)  # plans the preset from the data, once
    planned = tmp_path / "results" / "png" / "presets" / "mydata.yaml"
    text = planned.read_text()
    assert "# fingerprint of 8 of 8 training cases (2 labelled test cases)" in text
    preset = study.preset("mydata")
    assert (preset.reader, preset.spatial_dims, preset.task, preset.channels) == ("nnunet", 2, "multiclass", ["R", "G", "B"])
    assert preset.labels == {"disc": [1], "core": [2]} and preset.official_split
    assert all(r % 4 == 0 and r <= 90 for r in preset.protocol.roi_size)  # strides [2, 2]: multiples of 4, <= images
    mtime = planned.stat().st_mtime_ns
    load_study(cfg)
    assert planned.stat().st_mtime_ns == mtime  # reused, not planned again

    run_study(cfg)
    run = tmp_path / "results" / "png" / "runs" / "mydata" / "unet" / "fold0"
    preds = sorted(p.name for p in (run / "predictions").glob("*.png"))
    assert preds == ["test_008.png", "test_009.png"]
    from PIL import Image

    for name in preds:
        assert Image.open(run / "predictions" / name).size == Image.open(root / "labelsTs" / name).size
    ev = pd.read_csv(run / "evaluation.csv")
    assert set(ev["region"]) == {"disc", "core"} and set(ev["case"]) == {"test_008", "test_009"}
    assert (tmp_path / "reports" / "png" / "report.html").stat().st_size > 1000


@pytest.mark.timeout(900)
def test_mha_region_dataset_without_preset_runs_to_a_report(tmp_path):
    import SimpleITK as sitk

    root = write_regions_dataset(tmp_path / "Dataset902_Regions", tmp_path)
    cfg = study_of(tmp_path, root, "mha", {"unet": {"channels": [8, 16], "strides": [2], "num_res_units": 1}})
    preset = load_study(cfg).preset("mydata")
    assert (preset.task, preset.labels, preset.channels) == ("regions", {"whole": [1, 2], "core": [2]}, ["T1", "T2"])
    # spacing 1 x 1 x 2.5-3 mm, 12-16 slices of 30-38: not anisotropic enough for nnU-Net's rule -> median
    assert preset.preprocessing.spacing is not None and preset.preprocessing.spacing[:2] == [1.0, 1.0]
    assert 2.5 <= preset.preprocessing.spacing[2] <= 3.0

    run_study(cfg)
    run = tmp_path / "results" / "mha" / "runs" / "mydata" / "unet" / "fold0"
    preds = sorted((run / "predictions").glob("*.mha"))
    assert [p.name for p in preds] == ["test_008.mha", "test_009.mha"]
    for pred in preds:
        got, src = sitk.ReadImage(str(pred)), sitk.ReadImage(str(root / "imagesTs" / f"{pred.stem}_0000.mha"))
        assert got.GetSize() == src.GetSize()
        np.testing.assert_allclose(got.GetOrigin(), src.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(got.GetDirection(), src.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(got.GetSpacing(), src.GetSpacing(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(got))) <= {0, 1, 2}
    ev = pd.read_csv(run / "evaluation.csv")
    assert set(ev["convention"]) == {"suite", "authors"}  # authors: on the prepared grid, HD95 in voxels
    suite = ev[ev["convention"] == "suite"]
    assert set(suite["region"]) == {"whole", "core"} and (suite.loc[suite["metric"] == "hd95", "unit"] == "mm").all()
    assert (tmp_path / "reports" / "mha" / "report.html").stat().st_size > 1000


# --------------------------------------------------------------------------- the command and its rules
def test_preset_command_prints_a_valid_commented_preset(tmp_path, capsys):
    root = write_rgb_png_dataset(tmp_path / "Dataset901_Discs", tmp_path)
    assert cli(["preset", "--from", str(root), "--models", "unet", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Dataset preset planned from the data by `deconver preset --from")
    assert "# median shape" in text and "roi_size:" in text
    out = tmp_path / "discs.yaml"
    out.write_text(text)
    preset = load_preset(str(out))
    assert preset.name == "discs" and preset.reader == "nnunet"
    assert preset.protocol.augmentation.flip_prob == 0.5  # nested disc/core: no fixed order, flips kept
    # unet's default strides (2, 2, 2, 2): the median image size rounded down to multiples of 16
    from PIL import Image

    median = np.median([Image.open(p).size[::-1] for p in sorted((root / "imagesTr").glob("*.png"))], axis=0)
    assert preset.protocol.roi_size == [int(m // 16 * 16) for m in median]
    assert preset.protocol.batch_size == 2  # 5 % of eight ~5,000-pixel images is far below one crop

    assert cli(["preset", "--from", str(tmp_path / "nowhere")]) == 2  # a usage error: the named folder is not there
    assert f"--from: {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_ct_channels_get_clip_and_zscore(tmp_path, capsys):
    """Channels named CT: ct_stats from the foreground intensities, applied by prepare."""
    root = write_regions_dataset(tmp_path / "Dataset903_CT", tmp_path, train=6, test=0)
    spec = json.loads((root / "dataset.json").read_text())
    spec["channel_names"] = {"0": "CT", "1": "ct"}
    (root / "dataset.json").write_text(json.dumps(spec))
    assert cli(["preset", "--from", str(root), "--models", "unet", "--out", str(tmp_path / "ct.yaml"),
                "--no-progress"]) == 0
    preset = load_preset(str(tmp_path / "ct.yaml"))
    assert preset.preprocessing.normalize == "ct" and not preset.official_split
    (lo, hi, mean, std), _ = preset.preprocessing.ct_stats
    assert lo < mean < hi and std > 0 and 150 < mean < 210  # T1 foreground ~ N(180, 10)
    assert cli(["prepare", "--preset", str(tmp_path / "ct.yaml"), "--root", str(root), "--out",
                str(tmp_path / "prep"), "--no-progress"]) == 0
    image = np.load(next((tmp_path / "prep" / "cases").glob("*_image.npy")))
    assert image[0].min() >= (lo - mean) / std - 1e-4 and image[0].max() <= (hi - mean) / std + 1e-4
    with pytest.raises(ConfigError, match="normalize: ct needs ct_stats"):
        load_preset(str(tmp_path / "ct.yaml"), {"preprocessing": {"ct_stats": None}})


def test_spacing_roi_and_model_rules():
    # anisotropic (5 mm slices, few of them): the coarse axis takes its 10th percentile
    spacings = np.array([[0.7, 0.7, 5.0]] * 8 + [[0.7, 0.7, 3.0]] * 2)
    shapes = np.array([[300, 300, 20]] * 10)
    target, aniso = target_spacing(spacings, shapes)
    assert aniso and target[2] == pytest.approx(np.percentile(spacings[:, 2], 10))
    target, aniso = target_spacing(np.array([[1.0, 1.0, 1.2]] * 4), np.array([[100, 100, 90]] * 4))
    assert not aniso and list(target) == [1.0, 1.0, 1.2]
    # roi: rounded down to the divisor, then shrunk along the physically longest axis to 128^3
    cons = {"divisor": [16, 16, 16], "min_roi": [16, 16, 32]}
    assert fit_roi(np.array([35.0, 50.0, 36.0]), np.ones(3), cons, 3) == [32, 48, 32]
    big = fit_roi(np.array([200.0, 240.0, 160.0]), np.array([1.0, 1.0, 1.0]), cons, 3)
    assert math.prod(big) <= 128 ** 3 and all(r % 16 == 0 for r in big) and big[1] <= 144
    assert fit_roi(np.array([10.0, 10.0, 10.0]), np.ones(3), cons, 3) == [16, 16, 32]
    # the models' divisors: least common multiple; deconver 2D x32, unet x16
    assert model_constraints(2, [("unet", {}), ("deconver", {})])["divisor"] == [32, 32]
    assert model_constraints(3, [("unet", {"strides": [2, 2]})])["divisor"] == [4, 4, 4]


def test_study_errors_name_the_dataset(tmp_path):
    with pytest.raises(ConfigError, match=r"datasets\.mydata\.root: cannot plan a preset .* does not exist"):
        load_study({"study": "x", "models": ["unet"], "datasets": {"mydata": {"root": str(tmp_path / "none")}}})
    with pytest.raises(ConfigError, match=r"preset: needed with synthetic or download"):
        load_study({"study": "x", "models": ["unet"], "datasets": {"d": {"root": "r", "synthetic": True}}})
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.timeout(600)
def test_workflow_takes_a_dataset_named_by_root_only(tmp_path):
    """The Snakefile's schema and rules accept a dataset without `preset` (dry run: every step planned)."""
    from conftest import job_stats, run_snakemake

    root = write_rgb_png_dataset(tmp_path / "Dataset901_Discs", tmp_path)
    cfg = study_of(tmp_path, root, "dry", {"unet": {"strides": [2, 2], "channels": [8, 16, 32]}})
    out = run_snakemake("--configfile", cfg, "--directory", tmp_path, "-n").stdout
    stats = job_stats(out)
    assert {k: stats.get(k) for k in ("prepare", "split", "train", "predict", "evaluate", "report")} == \
        dict(prepare=1, split=1, train=1, predict=1, evaluate=1, report=1)
    assert (tmp_path / "results" / "dry" / "presets" / "mydata.yaml").is_file()
