"""Study-level dataset markings (paper, region_names) and the metric settings runs were evaluated with."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from deconver.config import ConfigError, load_preset, load_study
from deconver.metrics.evaluate import evaluate_folder
from deconver.report.settings import compare_settings, run_settings, settings_warning

REPO = Path(__file__).resolve().parents[1]


def _study(tmp_path, **entry):
    return load_study(dict(study="s", datasets={"nuclei": dict(preset="glas", root=str(tmp_path), **entry)},
                           models=["unet"]))


def test_region_names_rename_a_presets_regions(tmp_path):
    assert list(_study(tmp_path).preset("nuclei").labels) == ["gland"]
    renamed = _study(tmp_path, region_names={"gland": "nucleus"}).preset("nuclei")
    assert renamed.labels == {"nucleus": [1]} and renamed.name == "glas"
    with pytest.raises(ConfigError, match=r"datasets\.nuclei\.region_names: \['cell'\] not among"):
        _study(tmp_path, region_names={"cell": "nucleus"}).preset("nuclei")
    with pytest.raises(ConfigError, match="two regions would be called the same"):
        load_study(dict(study="s", datasets={"b": dict(preset="brats23", root=str(tmp_path),
                                                       region_names={"TC": "WT"})}, models=["unet"])).preset("b")


def test_only_the_paper_study_marks_its_datasets_as_the_papers(tmp_path):
    assert not _study(tmp_path).datasets["nuclei"].paper
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    assert {name: d.get("paper") for name, d in paper["datasets"].items()} == \
        {"isles22": True, "brats23": True, "glas": True, "fives": True}


def _sidecar(path: Path, **info) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x\n")
    path.with_suffix(".json").write_text(json.dumps(info))
    return path


def test_compare_settings_names_the_differing_key_and_runs(tmp_path):
    same = {"hd_impl": "v1", "labels": {"gland": [1]}, "nsd_tolerance": 2.0, "challenge": "glas"}
    runs = [(f"unet/fold{k}", _sidecar(tmp_path / f"u{k}" / "evaluation.csv", metric_settings=same)) for k in range(2)]
    assert not compare_settings(runs)["differ"]
    other = dict(same, nsd_tolerance=1.0)
    runs.append(("segresnet/fold0", _sidecar(tmp_path / "s0" / "evaluation.csv", metric_settings=other)))
    runs.append(("old/fold0", _sidecar(tmp_path / "o0" / "evaluation.csv", **same)))  # before metric_settings
    runs.append(("none/fold0", tmp_path / "missing" / "evaluation.csv"))
    result = compare_settings(runs)
    assert result["differ"] and result["differing_keys"] == ["nsd_tolerance"]
    assert result["unknown"] == ["none/fold0"]
    assert sorted(map(len, (g["runs"] for g in result["groups"]))) == [1, 3]  # the old sidecar reads the same
    text = settings_warning("glas", result)
    assert "nsd_tolerance = 1.0 (segresnet/fold0)" in text and "unet/fold0, unet/fold1, old/fold0" in text
    assert settings_warning("glas", compare_settings(runs[:2])) is None


def test_evaluate_writes_its_metric_settings(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    inst = np.zeros((40, 40), np.uint16)
    inst[5:15, 5:15], inst[20:30, 20:35] = 3, 700
    Image.fromarray(inst).save(gt / "testA_1_anno.png")
    Image.fromarray((inst > 0).astype(np.uint8)).save(pred / "testA_1.png")
    preset = load_preset("glas", {"metrics": {"nsd_tolerance": 3.0}})
    out = evaluate_folder(pred, gt, preset, tmp_path / "evaluation.csv", gt_suffix="_anno", workers=1)
    settings = run_settings(out)
    assert settings["nsd_tolerance"] == 3.0 and settings["challenge"] == "glas" and settings["labels"] == {"gland": [1]}
    assert "empty_rule" not in settings  # applied when pooling, not part of the evaluation
