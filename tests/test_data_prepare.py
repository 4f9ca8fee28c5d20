"""`deconver prepare`: the cache's content, idempotence, resumption, and the way back to the native grid."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from deconver.cli import main
from deconver.config import load_preset
from deconver.data import (DatasetError, PreparedDataset, load_native_instances, load_native_label, read_dataset,
                           save_native, to_native)
from deconver.data.prepare import prepare_dataset
from deconver.data.synth import write_synthetic

N = 5


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("raw")
    return {
        "brats23": write_synthetic("brats23", base / "brats23", cases=N, seed=1),
        "isles22": write_synthetic("isles22", base / "isles22", cases=4, seed=1),
        "glas": write_synthetic("glas", base / "glas", cases=4, seed=1),
        "fives": write_synthetic("fives", base / "fives", cases=4, seed=1),
    }


@pytest.fixture(scope="module")
def brats_cache(roots, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "brats23"
    result = prepare_dataset(load_preset("brats23"), roots["brats23"], out, progress=False)
    return out, result


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- content
def test_cache_content(brats_cache, roots):
    out, result = brats_cache
    assert result["status"] == "prepared" and result["written"] == N
    ds = PreparedDataset(out)
    assert ds.preset_name == "brats23" and ds.preset.labels == load_preset("brats23").labels
    assert ds.synthetic and len(ds) == N and ds.case_ids == sorted(ds.case_ids)
    for case_id in ds.case_ids:
        image, label = ds.load(case_id)
        entry = ds.case(case_id)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == (4, *entry["geometry"]["prepared_shape"]) and label.shape == (1, *image.shape[1:])
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        for c in range(4):
            nz = image[c][image[c] != 0]
            assert abs(nz.mean()) < 1e-3 and abs(nz.std() - 1) < 1e-2  # z-score on non-zero voxels, per channel
        native = np.asarray(nib.load(entry["source"]["label"]).dataobj)
        assert ds.strata(case_id) == np.count_nonzero(native) > 0
        assert entry["geometry"]["orientation"] == "RAS" and entry["geometry"]["native_axcodes"] == "LPS"
    assert ds.load(ds.case_ids[0], mmap=True)[0].shape == ds.load(ds.case_ids[0])[0].shape


def test_rerun_is_a_noop(brats_cache):
    out, _ = brats_cache
    before = _mtimes(out)
    result = prepare_dataset(load_preset("brats23"), PreparedDataset(out).manifest["root"], out, progress=False)
    assert result["status"] == "up-to-date" and result["written"] == 0
    assert _mtimes(out) == before


def test_changed_input_or_config_redoes_what_changed(roots, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(roots["brats23"], root)
    out = tmp_path / "prep"
    preset = load_preset("brats23")
    prepare_dataset(preset, root, out, progress=False)
    changed = next(root.rglob("BraTS-GLI-00002-000-t2w.nii.gz"))
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    result = prepare_dataset(preset, root, out, progress=False)
    assert (result["status"], result["written"], result["reused"]) == ("prepared", 1, N - 1)
    result = prepare_dataset(load_preset("brats23", {"preprocessing": {"crop_margin": 4}}), root, out, progress=False)
    assert result["written"] == N
    # a case removed from the dataset disappears from the cache
    shutil.rmtree(next(root.rglob("BraTS-GLI-00004-000")))
    result = prepare_dataset(preset, root, out, progress=False)
    assert result["cases"] == N - 1 and not list((out / "cases").glob("BraTS-GLI-00004-000*"))


# --------------------------------------------------------------------------- interruption and errors
def test_interrupted_prepare_resumes_cleanly(roots, tmp_path):
    out = tmp_path / "prep"
    preset = load_preset("brats23")
    done = []

    def stop_after_two(case_id):
        done.append(case_id)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(preset, roots["brats23"], out, progress=False, on_case=stop_after_two)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DatasetError, match="manifest.json not found"):
        PreparedDataset(out)
    # what a kill in the middle of the third case leaves: an image without entry, and a temporary file
    third = read_dataset(preset, roots["brats23"])[2].id
    (out / "cases" / f"{third}_image.npy").write_bytes(b"garbage")
    (out / "cases" / f".{third}_label.abc123.tmp.npy").write_bytes(b"partial")
    result = prepare_dataset(preset, roots["brats23"], out, progress=False)
    assert (result["written"], result["reused"]) == (N - 2, 2)
    ds = PreparedDataset(out)
    assert len(ds) == N and ds.load(third)[0].dtype == np.float32
    assert not [p for p in (out / "cases").iterdir() if ".tmp" in p.name]


def test_error_midway_leaves_nothing_trusted(roots, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(roots["brats23"], root)
    out = tmp_path / "prep"
    preset = load_preset("brats23")
    prepare_dataset(preset, root, out, progress=False)
    bad = next(root.rglob("BraTS-GLI-00003-000-t1c.nii.gz"))
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DatasetError, match=r"BraTS-GLI-00003-000-t1c\.nii\.gz: cannot read"):
        prepare_dataset(preset, root, out, progress=False)
    assert not (out / "manifest.json").exists()  # the old manifest no longer vouches for the folder
    bad.write_bytes(good)
    result = prepare_dataset(preset, root, out, progress=False)
    assert (result["written"], result["reused"]) == (1, N - 1)


# --------------------------------------------------------------------------- back to the native grid
SUITE_ORDER = {"order": ["orientation", "crop", "resample", "normalize"], "align_corners": False}
AUTHORS_ORDER = {"order": ["crop", "orientation", "normalize", "resample"], "align_corners": True}


@pytest.mark.parametrize("order", [SUITE_ORDER, AUTHORS_ORDER], ids=["suite-order", "authors-order"])
@pytest.mark.parametrize("spacing, exact", [([0.5, 0.5, 0.5], True), ([1.6, 1.6, 1.6], False)])
def test_to_native_inverts_crop_and_resampling(roots, tmp_path, spacing, exact, order):
    preset = load_preset("brats23", {"preprocessing": {"spacing": spacing, "crop_margin": 2, **order}})
    out = tmp_path / "prep"
    prepare_dataset(preset, roots["brats23"], out, progress=False)
    ds = PreparedDataset(out)
    for case_id in ds.case_ids[:3]:
        entry = ds.case(case_id)
        g = entry["geometry"]
        image, label = ds.load(case_id)
        assert g["resampled"] and g["crop_end"] != g["oriented_shape"] or g["crop_start"] != [0, 0, 0]
        assert g["prepared_shape"] != g["native_shape"]
        gt, native_spacing = load_native_label(entry)
        back = to_native(label, entry)
        assert back.shape == (1, *gt.shape) and back.dtype == np.uint8
        assert native_spacing == pytest.approx((1.0, 1.0, 1.0))
        for value in (1, 2, 3):  # nearest there and back: exact when upsampled, close when downsampled
            if (gt == value).any():
                d = _dice(back[0] == value, gt == value)
                assert d == 1.0 if exact else d > 0.6
        assert _dice(back[0] > 0, gt > 0) == 1.0 if exact else _dice(back[0] > 0, gt > 0) > 0.85
        raw = np.asarray(nib.load(entry["source"]["images"][1]).dataobj, dtype=float)
        if order["order"].index("normalize") < order["order"].index("resample"):
            # z-scored before resampling: what was resampled is the z-scored image (zeros stay zero)
            nz = raw != 0
            raw = np.where(nz, (raw - raw[nz].mean()) / raw[nz].std(), 0.0)
        lin = to_native(image, entry, mode="linear")[1]
        inside = raw > 0
        # downsampling averages the voxel noise away: compare with the smoothed signal then
        ref = raw if exact else ndimage.gaussian_filter(raw, 1.0)
        aligned = np.corrcoef(lin[inside], ref[inside])[0, 1]
        assert aligned > (0.99 if exact else 0.8)
        for axis in range(3):  # and better than one voxel off along any axis: the grids line up
            for step in (-1, 1):
                shifted = np.roll(ref, step, axis=axis)
                assert aligned > np.corrcoef(lin[inside], shifted[inside])[0, 1] + 0.03
        pred = tmp_path / f"{case_id}.nii.gz"
        save_native(back[0], entry, pred)
        written, source = nib.load(pred), nib.load(entry["source"]["images"][0])
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        assert np.array_equal(np.asarray(written.dataobj), back[0])


def test_flair_resampled_into_dwi_grid(roots, tmp_path):
    preset = load_preset("isles22", {"channels": ["dwi", "adc", "flair"],
                                     "reader_options": {"flair": True, "missing_flair": "zeros"}})
    out = tmp_path / "prep"
    prepare_dataset(preset, roots["isles22"], out, progress=False)
    ds = PreparedDataset(out)
    for case_id in ds.case_ids:
        image, label = ds.load(case_id)
        assert image.shape[0] == 3
        if case_id == "sub-strokecase0003":  # the case without FLAIR: a zero channel
            assert not image[2].any()
            continue
        flair = image[2]
        brain = (image[0] != 0) & (label[0] == 0)
        assert (flair[brain] != 0).mean() > 0.9  # FLAIR covers the DWI brain once resampled through the affines
        if label.any():  # lesions are hyperintense on FLAIR too: the grids line up
            assert flair[label[0] > 0].mean() > flair[brain].mean() + 0.5


def test_2d_caches(roots, tmp_path):
    for kind in ("glas", "fives"):
        out = tmp_path / kind
        prepare_dataset(load_preset(kind), roots[kind], out, progress=False)
        ds = PreparedDataset(out)
        for case_id in ds.case_ids:
            entry = ds.case(case_id)
            image, label = ds.load(case_id)
            assert image.shape[0] == 3 and image.shape[1:] == label.shape[1:] and set(np.unique(label)) <= {0, 1}
            native = Image.open(entry["source"]["images"][0])
            assert image.shape[1:] == (native.height, native.width)
            gt, spacing = load_native_label(entry)
            assert spacing == (1.0, 1.0) and np.array_equal(to_native(label, entry)[0], gt)
            raw = np.asarray(Image.open(entry["source"]["label"]))
            if kind == "fives":
                assert np.array_equal(gt, ((raw[..., 0] if raw.ndim == 3 else raw) > 127).astype(np.uint8))
            else:
                inst = load_native_instances(entry)
                assert np.array_equal(inst, raw) and inst.max() > 1 and np.array_equal(gt, (raw > 0).astype(np.uint8))
            png = tmp_path / f"{case_id}.png"
            save_native(gt, entry, png)
            assert np.array_equal(np.asarray(Image.open(png)), gt)
        if kind == "fives":
            with pytest.raises(DatasetError, match="not an instance map"):
                load_native_instances(ds.case(ds.case_ids[0]))


def test_unlabelled_cases_on_request(roots, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(roots["glas"], root)
    for anno in root.glob("*_anno.bmp"):
        anno.unlink()
    with pytest.raises(DatasetError, match="missing annotation"):
        prepare_dataset(load_preset("glas"), root, tmp_path / "prep", progress=False)
    prepare_dataset(load_preset("glas"), root, tmp_path / "prep", progress=False, require_labels=False)
    ds = PreparedDataset(tmp_path / "prep")
    image, label = ds.load(ds.case_ids[0])
    assert label is None and image.shape[0] == 3 and ds.strata(ds.case_ids[0]) == 0


# --------------------------------------------------------------------------- CLI
def test_cli_synth_prepare_split_from_a_study(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    root = tmp_path / "data" / "glas"
    config.write_text(yaml.safe_dump({
        "study": "data_cli", "results_dir": str(tmp_path / "results"), "reports_dir": str(tmp_path / "reports"),
        "num_folds": 2, "folds": [0, 1], "seed": 5, "models": ["unet"],
        "datasets": {"glas": {"preset": "glas", "root": str(root), "synthetic": True, "synth_cases": 5,
                              "synth_seed": 9}},
    }))
    args = ["--config", str(config), "--dataset", "glas"]
    assert main(["prepare", *args]) == 2  # a dataset root the study names does not exist: a configuration error
    assert "deconver synth" in capsys.readouterr().err  # the synthetic root is written by its own step
    assert main(["synth", *args]) == 0
    assert (root / "SYNTHETIC.txt").is_file() and len(list(root.glob("*_anno.bmp"))) == 5
    assert "seed: 9" in (root / "SYNTHETIC.txt").read_text()  # the dataset's synth_seed, not the study's seed
    assert main(["synth", *args]) == 0 and "nothing to do" in capsys.readouterr().out
    changed = yaml.safe_load(config.read_text())
    changed["datasets"]["glas"]["synth_seed"] = 10
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(changed))
    assert main(["synth", "--config", str(other), "--dataset", "glas"]) == 0  # reused, and said so
    assert "{'cases': '5', 'seed': '9'}, not the {'cases': '5', 'seed': '10'}" in capsys.readouterr().err
    assert main(["prepare", *args, "--no-progress"]) == 0
    manifest = tmp_path / "results" / "data_cli" / "prepared" / "glas" / "manifest.json"
    data = json.loads(manifest.read_text())
    assert data["dataset"] == "glas" and data["synthetic"] is True and data["num_cases"] == 5
    assert "git_commit" in data["provenance"]
    capsys.readouterr()
    assert main(["prepare", *args, "--no-progress"]) == 0 and "up to date" in capsys.readouterr().out
    assert main(["split", *args]) == 0
    split = json.loads((tmp_path / "results" / "data_cli" / "splits" / "glas.json").read_text())
    assert split["seed"] == 5 and split["num_folds"] == 2 and split["method"] == "kfold"
    assert main(["split", *args, "--method", "official"]) == 0
    split = json.loads((tmp_path / "results" / "data_cli" / "splits" / "glas.json").read_text())
    assert split["method"] == "official" and len(split["folds"]) == 1


def test_cli_prepare_by_hand_and_errors(roots, tmp_path, capsys):
    out = tmp_path / "prep"
    assert main(["prepare", "--preset", "glas", "--root", str(roots["glas"]), "--out", str(out), "--no-progress"]) == 0
    assert PreparedDataset(out).preset_name == "glas"
    assert main(["prepare", "--preset", "glas", "--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert main(["prepare", "--preset", "glas"]) == 2
    assert "--root" in capsys.readouterr().err


def test_msd_task_with_4d_multimodal_images(tmp_path):
    """An MSD task whose images hold several modalities in a 4th axis (as BrainTumour/Prostate do)."""
    task = tmp_path / "Task98_Toy"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    for i in range(3):
        a = rng.uniform(10, 20, (12, 14, 10, 2)).astype(np.float32)
        a[..., 1] *= 3
        lab = np.zeros((12, 14, 10), np.uint8)
        lab[4:8, 5:9, 3:6] = 1 + (i % 2)
        nib.save(nib.Nifti1Image(a, np.diag([1.5, 1.5, 2.0, 1.0])), task / "imagesTr" / f"toy_{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.diag([1.5, 1.5, 2.0, 1.0])), task / "labelsTr" / f"toy_{i}.nii.gz")
        training.append({"image": f"./imagesTr/toy_{i}.nii.gz", "label": f"./labelsTr/toy_{i}.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({"modality": {"0": "T2", "1": "ADC"}, "training": training,
                                                   "labels": {"0": "background", "1": "a", "2": "b"}}))
    preset = load_preset("hippocampus", {"channels": ["t2", "adc"], "preprocessing": {"crop_foreground": False}})
    cases = read_dataset(preset, tmp_path)  # the root may hold the task folder
    assert [c.id for c in cases] == ["toy_0", "toy_1", "toy_2"] and cases[0].meta["channels_per_file"] == 2
    assert cases[0].meta["spacing"] == [1.5, 1.5, 2.0]
    prepare_dataset(preset, task, tmp_path / "prep", progress=False)
    ds = PreparedDataset(tmp_path / "prep")
    image, label = ds.load("toy_1")
    assert image.shape == (2, 12, 14, 10) and label.shape == (1, 12, 14, 10) and set(np.unique(label)) == {0, 2}
    with pytest.raises(DatasetError, match="2 modalities"):
        read_dataset(load_preset("hippocampus"), task)
