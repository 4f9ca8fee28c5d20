"""Bad input gets a clear DatasetError naming the file, and leaves no trusted cache behind."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from deconver.config import load_preset
from deconver.data import DatasetError, PreparedDataset, read_dataset
from deconver.data.prepare import prepare_dataset
from deconver.data.synth import write_synthetic


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("pristine")
    return {"brats23": write_synthetic("brats23", base / "brats23", cases=3, seed=2),
            "fives": write_synthetic("fives", base / "fives", cases=4, seed=2),
            "glas": write_synthetic("glas", base / "glas", cases=3, seed=2)}


@pytest.fixture
def brats(pristine, tmp_path):
    root = tmp_path / "brats23"
    shutil.copytree(pristine["brats23"], root)
    return root


def _file(root: Path, case: str, kind: str) -> Path:
    return next(root.rglob(f"{case}-{kind}.nii.gz"))


def _prepare_fails(root: Path, out: Path, preset="brats23", match: str | None = None) -> DatasetError:
    with pytest.raises(DatasetError, match=match) as info:
        prepare_dataset(load_preset(preset), root, out, progress=False)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DatasetError):
        PreparedDataset(out)
    return info.value


def _resave(path: Path, data: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> None:
    old = nib.load(path)
    img = nib.Nifti1Image(data.astype(dtype or data.dtype), old.affine if affine is None else affine)
    nib.save(img, path)


def test_truncated_nifti(brats, tmp_path):
    path = _file(brats, "BraTS-GLI-00001-000", "t2w")
    path.write_bytes(path.read_bytes()[:3000])
    err = _prepare_fails(brats, tmp_path / "out", match="cannot read NIfTI")
    assert str(path) in str(err)


def test_unreadable_first_channel_fails_at_read_time(brats):
    path = _file(brats, "BraTS-GLI-00002-000", "t1n")
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(DatasetError, match="cannot read NIfTI header") as info:
        read_dataset(load_preset("brats23"), brats)
    assert str(path) in str(info.value)


def test_unreadable_nifti(brats, tmp_path):
    path = _file(brats, "BraTS-GLI-00000-000", "seg")
    path.write_bytes(b"this is not a NIfTI file at all")
    err = _prepare_fails(brats, tmp_path / "out", match="cannot read NIfTI")
    assert str(path) in str(err)


def test_truncated_png(pristine, tmp_path):
    root = tmp_path / "fives"
    shutil.copytree(pristine["fives"], root)
    path = root / "train" / "Original" / "2_D.png"
    path.write_bytes(path.read_bytes()[:2000])
    err = _prepare_fails(root, tmp_path / "out", preset="fives", match="cannot read image file")
    assert str(path) in str(err)


def test_label_grid_mismatch(brats, tmp_path):
    seg = _file(brats, "BraTS-GLI-00002-000", "seg")
    img = nib.load(seg)
    shifted = img.affine.copy()
    shifted[0, 3] += 0.5  # half a voxel: beyond the tolerance
    _resave(seg, np.asarray(img.dataobj), shifted)
    err = _prepare_fails(brats, tmp_path / "out", match="label grid")
    assert str(seg) in str(err) and "t1n" in str(err)


def test_label_shape_mismatch(brats, tmp_path):
    seg = _file(brats, "BraTS-GLI-00002-000", "seg")
    _resave(seg, np.asarray(nib.load(seg).dataobj)[:-2])
    err = _prepare_fails(brats, tmp_path / "out", match="label grid")
    assert str(seg) in str(err) and "(62, 64, 48)" in str(err)


def test_channel_grid_mismatch(brats, tmp_path):
    t2f = _file(brats, "BraTS-GLI-00001-000", "t2f")
    data = np.asarray(nib.load(t2f).dataobj)
    _resave(t2f, data[:, :, :-1])
    err = _prepare_fails(brats, tmp_path / "out", match="differs from")
    assert str(t2f) in str(err)


def test_tiny_affine_difference_is_tolerated(brats, tmp_path):
    seg = _file(brats, "BraTS-GLI-00002-000", "seg")
    img = nib.load(seg)
    _resave(seg, np.asarray(img.dataobj), img.affine + 2e-7)  # what ISLES'22 masks really carry
    assert prepare_dataset(load_preset("brats23"), brats, tmp_path / "out", progress=False)["written"] == 3


def test_2d_mask_size_mismatch(pristine, tmp_path):
    root = tmp_path / "glas"
    shutil.copytree(pristine["glas"], root)
    anno = root / "train_1_anno.bmp"
    Image.fromarray(np.asarray(Image.open(anno))[:-3]).save(anno)
    err = _prepare_fails(root, tmp_path / "out", preset="glas", match="does not match the image")
    assert str(anno) in str(err)


def test_missing_modality(brats):
    path = _file(brats, "BraTS-GLI-00001-000", "t1c")
    path.unlink()
    with pytest.raises(DatasetError, match=r"BraTS-GLI-00001-000: missing modality \['t1c'\]") as info:
        read_dataset(load_preset("brats23"), brats)
    assert str(path.parent) in str(info.value)


def test_unexpected_label_values(brats, tmp_path):
    seg = _file(brats, "BraTS-GLI-00000-000", "seg")
    data = np.asarray(nib.load(seg).dataobj).copy()
    data[data == 3] = 4  # the pre-2023 ET code
    _resave(seg, data)
    err = _prepare_fails(brats, tmp_path / "out", match=r"unexpected label values \[4\]")
    assert str(seg) in str(err) and "[0, 1, 2, 3]" in str(err)


def test_non_integer_float_labels(brats, tmp_path):
    seg = _file(brats, "BraTS-GLI-00000-000", "seg")
    data = np.asarray(nib.load(seg).dataobj).astype(np.float32)
    data[data == 2] = 1.5
    _resave(seg, data)
    err = _prepare_fails(brats, tmp_path / "out", match="non-integer")
    assert str(seg) in str(err)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_intensities(brats, tmp_path, bad):
    path = _file(brats, "BraTS-GLI-00001-000", "t1n")
    data = np.asarray(nib.load(path).dataobj).astype(np.float32)
    data[30, 30, 20] = bad
    _resave(path, data)
    err = _prepare_fails(brats, tmp_path / "out", match="1 NaN or inf intensities")
    assert str(path) in str(err)


def test_empty_and_missing_root(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "Thumbs.db").write_bytes(b"x")  # only stray files: still empty
    for preset in ("isles22", "brats23", "glas", "fives", "hippocampus"):
        with pytest.raises(DatasetError, match=f"dataset root {empty} is empty"):
            read_dataset(load_preset(preset), empty)
        with pytest.raises(DatasetError, match=f"dataset root {tmp_path / 'absent'} does not exist"):
            read_dataset(load_preset(preset), tmp_path / "absent")


def test_root_without_cases(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DatasetError, match=f"no BraTS files .* under {tmp_path}"):
        read_dataset(load_preset("brats23"), tmp_path)
    with pytest.raises(DatasetError, match=f"no dataset.json in {tmp_path}"):
        read_dataset(load_preset("hippocampus"), tmp_path)


def test_duplicate_case_id(brats):
    case = next(brats.rglob("BraTS-GLI-00001-000"))
    copy = brats / "extra" / case.name
    shutil.copytree(case, copy)
    with pytest.raises(DatasetError, match="duplicate case id 'BraTS-GLI-00001-000'") as info:
        read_dataset(load_preset("brats23"), brats)
    assert str(copy) in str(info.value) and str(case) in str(info.value)


def test_duplicate_case_id_glas(pristine, tmp_path):
    root = tmp_path / "glas"
    shutil.copytree(pristine["glas"], root)
    (root / "backup").mkdir()
    shutil.copy(root / "train_1.bmp", root / "backup" / "train_1.bmp")
    with pytest.raises(DatasetError, match="duplicate case id 'train_1'"):
        read_dataset(load_preset("glas"), root)


def test_msd_errors(tmp_path):
    task = tmp_path / "Task99_Toy"
    (task / "imagesTr").mkdir(parents=True)
    (task / "dataset.json").write_text('{"modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "a"}, '
                                       '"training": [{"image": "./imagesTr/toy_1.nii.gz", "label": "./labelsTr/toy_1.nii.gz"}]}')
    with pytest.raises(DatasetError, match=r"label values \[2\] are not among"):
        read_dataset(load_preset("hippocampus"), task)
    (task / "dataset.json").write_text('{"modality": {"0": "MRI"}, "training": [{"image": "./imagesTr/toy_1.nii.gz", '
                                       '"label": "./labelsTr/toy_1.nii.gz"}]}')
    with pytest.raises(DatasetError, match=r"imagesTr/toy_1.nii.gz does not exist"):
        read_dataset(load_preset("hippocampus"), task)
    (task / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match=f"{task / 'dataset.json'}: cannot read"):
        read_dataset(load_preset("hippocampus"), task)
