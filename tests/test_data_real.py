"""The readers and prepare on the real files in ../shared/data (skipped cleanly where absent)."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deconver.config import load_preset
from deconver.data import (DatasetError, PreparedDataset, load_native_label, make_folds, read_dataset, save_native,
                           to_native)
from deconver.data.prepare import prepare_dataset
from deconver.data.split import split_prepared

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ISLES = DATA / "ISLES-2022-sample"
HIPPO = DATA / "Task04_Hippocampus"
needs_isles = pytest.mark.skipif(not (ISLES / "rawdata").is_dir(), reason=f"real ISLES'22 sample not at {ISLES}")
needs_hippo = pytest.mark.skipif(not (HIPPO / "dataset.json").is_file(), reason=f"real Hippocampus not at {HIPPO}")

FLAIR = {"channels": ["dwi", "adc", "flair"], "reader_options": {"flair": True}}


# --------------------------------------------------------------------------- ISLES'22 (one real case)
@needs_isles
def test_isles22_real_case_read():
    (case,) = read_dataset(load_preset("isles22"), ISLES)
    assert case.id == "sub-strokecase0009" and case.meta["layout"] == "challenge" and not case.meta["synthetic"]
    assert [p.name for p in case.images] == ["sub-strokecase0009_ses-0001_dwi.nii.gz",
                                             "sub-strokecase0009_ses-0001_adc.nii.gz"]
    (with_flair,) = read_dataset(load_preset("isles22", FLAIR), ISLES)
    assert with_flair.images[2].name == "sub-strokecase0009_ses-0001_flair.nii.gz"


@needs_isles
def test_isles22_real_case_prepared_with_flair(tmp_path):
    out = tmp_path / "isles"
    prepare_dataset(load_preset("isles22", FLAIR), ISLES, out, progress=False)
    ds = PreparedDataset(out)
    entry = ds.case("sub-strokecase0009")
    g = entry["geometry"]
    image, label = ds.load("sub-strokecase0009")
    assert image.shape[0] == 3 and image.shape[1:] == label.shape[1:] == tuple(g["prepared_shape"])
    assert g["native_shape"] == [112, 112, 73] and g["native_axcodes"] == "LAS"
    assert g["crop_start"] != [0, 0, 0] and g["resampled"]  # cropped and resampled
    assert set(np.unique(label)) == {0, 1}  # the uint16 mask read as binary
    native_mask = np.asarray(nib.load(entry["source"]["label"]).dataobj)
    assert native_mask.dtype == np.uint16 and ds.strata("sub-strokecase0009") == np.count_nonzero(native_mask)
    brain = image[0] != 0
    assert (image[2][brain] != 0).mean() > 0.8  # FLAIR (512 x 512 x 29, 0.45 x 0.45 x 5 mm) lies on the DWI grid now
    lesion = label[0] > 0
    assert image[0][lesion].mean() > image[0][brain & ~lesion].mean() + 1  # bright on DWI
    assert image[1][lesion].mean() < image[1][brain & ~lesion].mean()       # dark on ADC
    back = to_native(label, entry)
    gt, spacing = load_native_label(entry)
    assert back.shape == (1, 112, 112, 73) and spacing == pytest.approx((2.0, 2.0, 2.0), abs=1e-4)
    assert np.array_equal(back[0], gt)
    pred = tmp_path / "pred.nii.gz"
    save_native(back[0], entry, pred)
    written, dwi = nib.load(pred), nib.load(entry["source"]["images"][0])
    assert written.shape == dwi.shape and np.allclose(written.affine, dwi.affine)


@needs_isles
def test_isles22_mask_affine_needs_the_tolerance(tmp_path, monkeypatch):
    """The real mask's affine differs from DWI by ~1e-7: accepted with the tolerance, refused without it."""
    import deconver.data.loading as loading

    dwi = nib.load(next(ISLES.rglob("*_dwi.nii.gz")))
    msk = nib.load(next(ISLES.rglob("*_msk.nii.gz")))
    assert 0 < np.abs(dwi.affine - msk.affine).max() < 1e-5
    monkeypatch.setattr(loading, "GRID_ATOL", 1e-12)
    with pytest.raises(DatasetError, match="_msk.nii.gz: label grid"):
        prepare_dataset(load_preset("isles22"), ISLES, tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- Hippocampus (260 real cases)
@pytest.fixture(scope="module")
def hippo_prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("hippo") / "prepared"
    t0 = time.perf_counter()
    result = prepare_dataset(load_preset("hippocampus"), HIPPO, out, progress=False)
    result["wall"] = time.perf_counter() - t0
    print(f"\nprepared {result['cases']} Hippocampus cases in {result['wall']:.1f} s")
    return out, result


@needs_hippo
def test_hippocampus_quirks_are_there():
    """The real files mix float32/uint8 images and carry two float32 label files."""
    cases = read_dataset(load_preset("hippocampus"), HIPPO)
    assert len(cases) == 260 and cases[0].id == "hippocampus_001"
    images = Counter(str(nib.load(c.images[0]).get_data_dtype()) for c in cases)
    labels = Counter(str(nib.load(c.label).get_data_dtype()) for c in cases)
    assert set(images) == {"float32", "uint8"} and labels["float32"] == 2


@needs_hippo
@pytest.mark.slow
def test_hippocampus_all_cases_prepared(hippo_prepared):
    out, result = hippo_prepared
    assert result["written"] == 260 and result["wall"] < 240
    ds = PreparedDataset(out)
    assert len(ds) == 260 and not ds.synthetic
    values = set()
    for case_id in ds.case_ids:
        image, label = ds.load(case_id, mmap=True)
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape[0] == 1
        assert image.shape[1:] == label.shape[1:] and np.isfinite(image).all()
        values |= set(np.unique(label).tolist())
        assert ds.strata(case_id) > 0
    assert values == {0, 1, 2}
    float_labels = [c for c in read_dataset(load_preset("hippocampus"), HIPPO)
                    if nib.load(c.label).get_data_dtype() == np.float32]
    for case in float_labels:  # float32 label files come out as exact integer labels
        gt, _ = load_native_label(ds.case(case.id))
        assert np.array_equal(gt, np.rint(nib.load(case.label).get_fdata()).astype(np.uint8))
        assert np.array_equal(to_native(ds.load(case.id)[1], ds.case(case.id))[0], gt)
    t0 = time.perf_counter()
    again = prepare_dataset(load_preset("hippocampus"), HIPPO, out, progress=False)
    assert again["status"] == "up-to-date" and time.perf_counter() - t0 < 10


@needs_hippo
@pytest.mark.slow
def test_hippocampus_fold_file_balanced(hippo_prepared):
    out, _ = hippo_prepared
    content = split_prepared(out, dataset="hippocampus", num_folds=5, seed=123)
    sizes = [len(f["val"]) for f in content["folds"]]
    assert sizes == [52] * 5
    ds = PreparedDataset(out)
    ids = ds.case_ids
    strata = np.array([ds.strata(i) for i in ids])
    quartiles = np.quantile(strata, [0.25, 0.5, 0.75])
    for fold in content["folds"]:  # each fold spans the volume range like the whole set
        vals = np.array([ds.strata(i) for i in fold["val"]])
        assert abs(np.median(vals) - quartiles[1]) < (quartiles[2] - quartiles[0]) / 2
    assert make_folds(ids, list(strata), 5, seed=123) == content["folds"]
