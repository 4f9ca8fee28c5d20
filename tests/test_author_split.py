"""`split: authors`: the Deconver authors' folds, shipped in deconver/data/author_folds/, land on each
reader's case ids. The three official layouts are built from the authors' own ids (tiny images)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deconver.config import ConfigError, load_preset, load_study
from deconver.data import DatasetError, read_dataset
from deconver.data.author_split import AUTHOR_FOLDS_DIR, author_assignment, author_folds, load_author_folds


def _linker(tmp_path: Path, suffix: str):
    """Every file of a layout is a hard link to one tiny file (the readers read headers, not data)."""
    src = tmp_path / f"tiny{suffix}"
    if suffix == ".nii.gz":
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), str(src))
    else:
        from PIL import Image

        Image.fromarray(np.zeros((2, 2), np.uint8)).save(src)

    def link(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, path)
        return path

    return link


def _isles_layout(root: Path, ids, link) -> dict[str, str]:
    """Zenodo layout; returns DWI file -> the authors' id it was built from."""
    built = {}
    for aid in ids:
        subject, session = aid.split("_")
        folder = root / "ISLES-2022" / subject / session
        for mod in ("dwi", "adc"):
            p = link(folder / "dwi" / f"{aid}_{mod}.nii.gz")
        built[str(folder / "dwi" / f"{aid}_dwi.nii.gz")] = aid
        link(root / "ISLES-2022" / "derivatives" / subject / session / f"{aid}_msk.nii.gz")
    return built


def _brats_layout(root: Path, ids, link) -> dict[str, str]:
    built = {}
    for aid in ids:
        folder = root / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData" / aid
        for mod in ("t1n", "t1c", "t2w", "t2f", "seg"):
            link(folder / f"{aid}-{mod}.nii.gz")
        built[str(folder / f"{aid}-t1n.nii.gz")] = aid
    return built


def _fives_layout(root: Path, ids, link) -> dict[str, str]:
    built = {}
    for aid in ids:  # "<subset>/Original_<stem>" for "<subset>/Original/<stem>.png"
        subset, stem = aid.split("/Original_")
        image = link(root / subset / "Original" / f"{stem}.png")
        link(root / subset / "Ground truth" / f"{stem}.png")
        built[str(image)] = aid
    return built


LAYOUTS = {"isles22": (_isles_layout, ".nii.gz"), "brats23": (_brats_layout, ".nii.gz"),
           "fives": (_fives_layout, ".png")}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = {}
    for name, (build, suffix) in LAYOUTS.items():
        base = tmp_path_factory.mktemp(name)
        data = json.loads((AUTHOR_FOLDS_DIR / f"{name}.json").read_text())
        root = base / "data"
        built = build(root, list(data["folds"]), _linker(base, suffix))
        out[name] = (root, built, data)
    return out


def test_every_case_lands_in_the_authors_fold(layouts):
    total = 0
    for name, (root, built, data) in layouts.items():
        cases = read_dataset(load_preset(name), root)
        assert len(cases) == len(data["folds"])
        # which authors' id each case was built from: known from the files, not from the id mapping
        source = {c.id: built[str(c.images[0])] for c in cases}
        folds = author_folds(name, [c.id for c in cases], 5)
        seen = set()
        for fold in folds:
            assert not set(fold["train"]) & set(fold["val"])
            assert len(fold["train"]) + len(fold["val"]) == len(cases)
            for case in fold["val"]:
                assert data["folds"][source[case]] == fold["fold"], (name, case)
                seen.add(case)
        assert seen == set(source)
        total += len(seen)
    assert total == 2301
    sizes = {name: sorted(len(f["val"]) for f in author_folds(name, [c.id for c in read_dataset(load_preset(name), r)], 5))
             for name, (r, _, _) in layouts.items()}
    assert sizes == {"isles22": [50] * 5, "brats23": [250] * 4 + [251], "fives": [160] * 5}


def test_mismatches_name_the_ids_on_both_sides(layouts):
    root, _, data = layouts["brats23"]
    ids = [c.id for c in read_dataset(load_preset("brats23"), root)]
    with pytest.raises(DatasetError) as err:
        author_assignment("brats23", ids[12:] + ["BraTS-GLI-99999-000"])
    msg = str(err.value)
    assert "1 case(s) of the data have no fold in the authors' file: BraTS-GLI-99999-000" in msg
    assert "12 id(s) of the authors' file are not in the data" in msg and "(12 in all)" in msg
    assert ", ".join(sorted(ids[:12])[:10]) in msg and sorted(ids[:12])[10] not in msg  # ten named
    with pytest.raises(DatasetError, match="folds are 5, the study asks for num_folds=3"):
        author_folds("brats23", ids, 3)
    with pytest.raises(DatasetError, match="no fold file of the authors for reader 'glas'"):
        load_author_folds("glas")


def test_shipped_files_carry_source_and_licence():
    notice = (AUTHOR_FOLDS_DIR / "NOTICE").read_text()
    assert "Apache License, Version 2.0" in notice and "github.com/pashtari/factorizer" in notice
    for name in ("isles22", "brats23", "fives"):
        data = load_author_folds(name)
        assert "pashtari/factorizer" in data["source"] and "Apache-2.0" in data["source"]
        assert data["source"].split("commit ")[1].split()[0] in notice


def test_paper_study_uses_the_authors_folds_but_not_for_glas():
    study = load_study(Path(__file__).resolve().parents[1] / "config" / "paper.yaml")
    assert {d: study.split_method(d) for d in study.datasets} == \
        {"isles22": "authors", "brats23": "authors", "fives": "authors", "glas": "kfold"}
    cfg = {"study": "s", "split": "authors", "models": ["unet"],
           "datasets": {"glas": {"preset": "glas", "root": "x"}}}
    with pytest.raises(ConfigError, match=r"split: 'authors' folds exist for the readers \['brats23', 'fives', "
                                          r"'isles22'\], not for 'glas'"):
        load_study(cfg)
