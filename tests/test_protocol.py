"""`deconver protocol`: the resolved recipe, the same objects the steps run."""
from __future__ import annotations

import json

import pytest

from deconver.cli import main as cli
from deconver.config import load_preset
from deconver.engine.datamodule import train_transform_specs, train_transforms


@pytest.mark.parametrize("dataset", ["isles22", "brats23", "fives"])
def test_paper_recipe_has_uniform_crops_and_border_padding(dataset, capsys):
    assert cli(["protocol", "--dataset", dataset, "--json"]) == 0
    recipe = json.loads(capsys.readouterr().out)
    assert recipe["study"] == "paper" and recipe["crop_sampling"]["mode"] == "uniform"
    chain = {t["transform"]: t for t in recipe["training_transforms"]}
    assert "RandSpatialCropd" in chain and "RandCropByPosNegLabeld" not in chain
    assert chain["RandAffined"]["padding_mode"] == "border" and chain["RandAffined"]["prob"] == 0.2
    assert recipe["split"]["method"] == "authors" and recipe["optimizer"] == {"name": "AdamW", "lr": 1e-4,
                                                                             "weight_decay": 1e-5}
    assert recipe["schedule"]["t_total"] == 501 and recipe["inference"]["overlap"] == 0.5
    assert set(recipe["metrics"]["conventions"]) >= {"suite", "authors"}
    steps = [s["step"] for s in recipe["preprocessing"]]
    if dataset == "fives":
        assert [s["transform"] for s in recipe["preprocessing"] if s["transform"]][1:] == ["NormalizeIntensity"]
        assert recipe["split"]["val_sizes"] == [160] * 5
    else:  # the authors' order: crop -> orientation -> z-score -> resample, align_corners
        assert steps == ["load", "crop", "orientation", "normalize", "resample"]
        assert recipe["preprocessing"][-1]["align_corners"] is True


def test_listing_and_model(capsys):
    assert cli(["protocol", "--dataset", "brats23", "--model", "deconver"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("protocol of brats23 (preset brats23) in study paper, model deconver")
    for section in ("preprocessing:", "training_transforms:", "  2. RandSpatialCropd:", "loss:", "schedule:",
                    "validation:", "checkpoint:", "inference:", "postprocessing:", "label_decoding:", "metrics:",
                    "split:", "  variant: brats23", "val_sizes: [251, 250, 250, 250, 250]"):
        assert section in out, section
    assert cli(["protocol", "--dataset", "nope"]) == 2
    assert "dataset 'nope' is not in study 'paper'" in capsys.readouterr().err


@pytest.mark.parametrize("crop, padding", [("uniform", "border"), ("posneg", "zeros")])
def test_printed_chain_is_the_chain_that_runs(crop, padding):
    protocol = load_preset("isles22", {"protocol": {"crop": crop, "augmentation": {"padding_mode": padding}}}).protocol
    specs = train_transform_specs(protocol, 3)
    built = train_transforms(protocol, 3).transforms
    assert [type(t).__name__ for t in built] == [name for name, _ in specs]
    affine = next(t for t in built if type(t).__name__ == "RandAffined")
    assert list(affine.padding_mode) == [padding, padding]  # per key (image, label)
