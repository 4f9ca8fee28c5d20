"""The `nnunet` reader (nnU-Net v2 raw datasets): the real Hippocampus task converted by nnU-Net's own
converter reads as through the MSD reader; 2D RGB PNG and 3D multi-channel region datasets in MHA; the
geometry of SimpleITK formats; clear errors for broken datasets."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deconver.config import DatasetPreset, load_preset
from deconver.data import DatasetError, native_suffix, read_dataset, save_native
from deconver.data.loading import load_case, read_sitk
from deconver.data.preprocess import preprocess
from deconver.data.readers.nnunet import parse_labels
from nnunet_data import DIRECTION, convert_msd, write_regions_dataset, write_rgb_png_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "Task04_Hippocampus"
PROTOCOL_2D = {"roi_size": [32, 32], "batch_size": 2}
PROTOCOL_3D = {"roi_size": [16, 16, 8], "batch_size": 2}


def preset_2d(**changes) -> DatasetPreset:
    data = {"name": "png", "reader": "nnunet", "spatial_dims": 2, "channels": ["R", "G", "B"], "task": "multiclass",
            "labels": {"disc": [1], "core": [2]}, "protocol": PROTOCOL_2D,
            "preprocessing": {"orientation": None, "crop_foreground": False, "normalize": "zscore"}}
    return DatasetPreset.model_validate({**data, **changes})


def preset_regions(**changes) -> DatasetPreset:
    data = {"name": "reg", "reader": "nnunet", "spatial_dims": 3, "channels": ["T1", "T2"], "task": "regions",
            "labels": {"whole": [1, 2], "core": [2]}, "protocol": PROTOCOL_3D}
    return DatasetPreset.model_validate({**data, **changes})


@pytest.fixture(scope="module")
def png_dataset(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("png")
    return write_rgb_png_dataset(work / "Dataset901_Discs", work)


@pytest.fixture(scope="module")
def mha_dataset(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("mha")
    return write_regions_dataset(work / "Dataset902_Regions", work)


def broken_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- the real task, nnU-Net's converter
@pytest.mark.timeout(900)
def test_hippocampus_through_nnunet_format_matches_msd_reader(tmp_path):
    """nnUNetv2_convert_MSD_dataset's output gives the same cases, labels and prepared arrays as the MSD task."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real Hippocampus data not found at {HIPPOCAMPUS}")
    converted = convert_msd(HIPPOCAMPUS, tmp_path)
    assert converted.name == "Dataset004_Hippocampus"
    msd = load_preset("hippocampus")
    nn = load_preset("hippocampus", {"reader": "nnunet"})
    a, b = read_dataset(msd, HIPPOCAMPUS), read_dataset(nn, converted)
    assert [c.id for c in a] == [c.id for c in b] and len(a) == 260
    assert all(c.subset == "train" and c.meta["spacing"] == d.meta["spacing"] for c, d in zip(b, a))
    for ca, cb in zip(a[::13], b[::13]):  # 20 cases spread over the task: decoded, reoriented, cropped, normalised
        la, lb = load_case(ca, msd), load_case(cb, nn)
        np.testing.assert_array_equal(la.label, lb.label)
        np.testing.assert_allclose(la.affine, lb.affine, atol=1e-5)
        ia, ya, ga = preprocess(la, msd)
        ib, yb, gb = preprocess(lb, nn)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ya, yb)
        assert ga["crop_start"] == gb["crop_start"] and ga["prepared_shape"] == gb["prepared_shape"]


# --------------------------------------------------------------------------- 2D RGB PNG
def test_png_dataset_cases_subsets_and_channels(png_dataset):
    cases = read_dataset(preset_2d(), png_dataset)
    assert [c.id for c in cases if c.subset == "train"] == [f"img_{i:03d}" for i in range(8)]
    assert [c.id for c in cases if c.subset == "test"] == ["test_008", "test_009"]
    loaded = load_case(cases[0], preset_2d())
    assert loaded.image.shape[0] == 3 and loaded.image.shape[1:] == loaded.label.shape
    assert set(np.unique(loaded.label)) == {0, 1, 2}
    # labelsTs gone: the test images are left out, or read unlabelled when labels are not required
    folder = png_dataset.parent / "nolabelsTs"
    shutil.copytree(png_dataset, folder)
    shutil.rmtree(folder / "labelsTs")
    assert {c.subset for c in read_dataset(preset_2d(), folder)} == {"train"}
    unlabelled = [c for c in read_dataset(preset_2d(), folder, require_labels=False) if c.subset == "test"]
    assert len(unlabelled) == 2 and all(c.label is None for c in unlabelled)


def test_grey_2d_files_are_one_channel_each(png_dataset, tmp_path):
    """A two-file grey dataset: each file one channel, concatenated in channel-index order."""
    from PIL import Image

    folder = broken_copy(png_dataset, tmp_path)
    spec = json.loads((folder / "dataset.json").read_text())
    spec["channel_names"] = {"0": "red", "1": "green"}
    (folder / "dataset.json").write_text(json.dumps(spec))
    for sub in ("imagesTr", "imagesTs"):
        for path in sorted((folder / sub).glob("*_0000.png")):
            rgb = np.asarray(Image.open(path))
            Image.fromarray(rgb[..., 0]).save(path)
            Image.fromarray(rgb[..., 1]).save(path.with_name(path.name.replace("_0000", "_0001")))
    preset = preset_2d(channels=["red", "green"])
    case = read_dataset(preset, folder)[0]
    loaded = load_case(case, preset)
    rgb = np.asarray(Image.open(png_dataset / "imagesTr" / "img_000_0000.png"))
    np.testing.assert_array_equal(loaded.image, rgb[..., :2].transpose(2, 0, 1).astype(np.float32))


# --------------------------------------------------------------------------- 3D MHA, regions
def test_mha_regions_geometry_matches_nifti_reading(mha_dataset, tmp_path):
    """An oblique MHA case is read on the affine nibabel gives the same image written as NIfTI by SimpleITK,
    and a label map saved back lands in the source's format and geometry."""
    import SimpleITK as sitk

    preset = preset_regions()
    cases = read_dataset(preset, mha_dataset)
    assert len(cases) == 10 and cases[0].meta["format"] == "sitk" and len(cases[0].images) == 2
    case = cases[0]
    loaded = load_case(case, preset)
    assert loaded.image.shape[0] == 2 and set(np.unique(loaded.label)) == {0, 1, 2}
    nifti = tmp_path / "same.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(case.images[0])), str(nifti))
    ref = nib.load(nifti)
    np.testing.assert_allclose(loaded.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(loaded.image[0].numpy(), np.asarray(ref.dataobj), rtol=1e-6)
    assert loaded.spacing == pytest.approx(ref.header.get_zooms()[:3], abs=1e-5)

    entry = {"id": case.id, "spatial_dims": 3, "meta": case.meta, "source": {"images": [str(p) for p in case.images]},
             "geometry": {"native_shape": list(loaded.shape)}}
    assert native_suffix(entry) == ".mha"
    out = save_native(loaded.label, entry, tmp_path / f"{case.id}{native_suffix(entry)}")
    back, affine = read_sitk(out)
    np.testing.assert_array_equal(back, loaded.label)
    np.testing.assert_allclose(affine, loaded.affine, atol=1e-6)
    written = sitk.ReadImage(str(out))
    np.testing.assert_allclose(np.asarray(written.GetDirection()).reshape(3, 3), DIRECTION, atol=1e-6)


def test_nrrd_and_nifti_endings_read_the_same(mha_dataset, tmp_path):
    import SimpleITK as sitk

    for ending in (".nrrd", ".nii.gz"):
        folder = tmp_path / ending.strip(".")
        shutil.copytree(mha_dataset, folder)
        for path in list(folder.rglob("*.mha")):
            sitk.WriteImage(sitk.ReadImage(str(path)), str(path.with_name(path.name[:-4] + ending)))
            path.unlink()
        spec = json.loads((folder / "dataset.json").read_text())
        (folder / "dataset.json").write_text(json.dumps({**spec, "file_ending": ending}))
        a = load_case(read_dataset(preset_regions(), mha_dataset)[3], preset_regions())
        b = load_case(read_dataset(preset_regions(), folder)[3], preset_regions())
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
        np.testing.assert_allclose(a.image.numpy(), b.image.numpy(), rtol=1e-6)


@pytest.mark.parametrize("labels, task, parsed", [
    ({"background": 0, "a": 1, "b": 2}, "multiclass", {"a": [1], "b": [2]}),
    ({"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}, "regions",
     {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}),
    ({"background": [0], "single": [1]}, "multiclass", {"single": [1]}),
])
def test_every_labels_form(labels, task, parsed):
    spec = {"labels": labels, "regions_class_order": [1, 2, 3]}
    assert parse_labels(spec, Path("dataset.json")) == (task, parsed)


# --------------------------------------------------------------------------- errors
def _edit_json(folder: Path, **changes) -> None:
    spec = json.loads((folder / "dataset.json").read_text())
    spec.update(changes)
    (folder / "dataset.json").write_text(json.dumps(spec))


def test_missing_channel_file(mha_dataset, tmp_path):
    folder = broken_copy(mha_dataset, tmp_path)
    (folder / "imagesTr" / "case_002_0001.mha").unlink()
    with pytest.raises(DatasetError, match=r"case case_002: missing channel file .*imagesTr/case_002_0001\.mha"):
        read_dataset(preset_regions(), folder)


def test_label_value_not_in_labels(mha_dataset, tmp_path):
    import SimpleITK as sitk

    folder = broken_copy(mha_dataset, tmp_path)
    path = folder / "labelsTr" / "case_001.mha"
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 5
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))
    case = [c for c in read_dataset(preset_regions(), folder) if c.id == "case_001"][0]
    with pytest.raises(DatasetError, match=r"case_001\.mha: unexpected label values \[5\]"):
        load_case(case, preset_regions())
    # and a preset asking for a value dataset.json does not declare
    with pytest.raises(DatasetError, match=r"dataset\.json: the preset's label values \[4\] are not among"):
        read_dataset(preset_regions(labels={"whole": [1, 2], "core": [4]}), folder)


@pytest.mark.parametrize("file, change, match", [
    ("labelsTr/case_003.mha", ("SetSpacing", [1.0, 1.0, 5.0]), r"case_003\.mha: label grid .* does not match the image"),
    ("imagesTr/case_003_0001.mha", ("SetOrigin", [0.0, 0.0, 0.0]), r"case_003_0001\.mha: grid .* differs from"),
])
def test_geometry_mismatch(mha_dataset, tmp_path, file, change, match):
    import SimpleITK as sitk

    folder = broken_copy(mha_dataset, tmp_path)
    img = sitk.ReadImage(str(folder / file))
    getattr(img, change[0])(change[1])
    sitk.WriteImage(img, str(folder / file))
    case = [c for c in read_dataset(preset_regions(), folder) if c.id == "case_003"][0]
    with pytest.raises(DatasetError, match=match):
        load_case(case, preset_regions())


def test_2d_mask_size_mismatch(png_dataset, tmp_path):
    from PIL import Image

    folder = broken_copy(png_dataset, tmp_path)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(folder / "labelsTr" / "img_002.png")
    case = [c for c in read_dataset(preset_2d(), folder) if c.id == "img_002"][0]
    with pytest.raises(DatasetError, match=r"img_002\.png: mask size 12x10 does not match"):
        load_case(case, preset_2d())


def test_file_ending_mismatch(png_dataset, tmp_path):
    folder = broken_copy(png_dataset, tmp_path)
    _edit_json(folder, file_ending=".bmp")
    with pytest.raises(DatasetError, match=r"img_000_0000\.png: does not end with the file_ending '\.bmp'"):
        read_dataset(preset_2d(), folder)
    _edit_json(folder, file_ending=".tiff")
    with pytest.raises(DatasetError, match=r"file_ending '\.tiff' is not supported \(3D TIFF"):
        read_dataset(preset_2d(), folder)


@pytest.mark.parametrize("change, match", [
    ({"numTraining": 9}, r"numTraining is 9 but the dataset holds 8 training cases"),
    ({"labels": {"background": 0, "disc": 1, "core": 2, "ignore": 3}}, r"'ignore' label .* not supported"),
    ({"labels": {"background": 0, "disc": [1, 2], "core": 2}}, r"region labels need regions_class_order"),
    ({"channel_names": {"0": "grey"}}, r"the dataset has 1 channels \['grey'\] but the preset names 3"),
])
def test_dataset_json_errors(png_dataset, tmp_path, change, match):
    folder = broken_copy(png_dataset, tmp_path)
    _edit_json(folder, **change)
    with pytest.raises(DatasetError, match=match):
        read_dataset(preset_2d(), folder)


def test_orphan_label_and_missing_label(png_dataset, tmp_path):
    folder = broken_copy(png_dataset, tmp_path)
    shutil.copy(folder / "labelsTr" / "img_000.png", folder / "labelsTr" / "img_099.png")
    with pytest.raises(DatasetError, match=r"label without images: .*labelsTr/img_099\.png"):
        read_dataset(preset_2d(), folder)
    (folder / "labelsTr" / "img_099.png").unlink()
    (folder / "labelsTr" / "img_001.png").unlink()
    with pytest.raises(DatasetError, match=r"case img_001: missing label .*labelsTr/img_001\.png"):
        read_dataset(preset_2d(), folder)


def test_dataset_key_lists_the_training_files(mha_dataset, tmp_path):
    """dataset.json's `dataset` key (files anywhere, relative to the dataset folder) replaces the imagesTr scan."""
    folder = broken_copy(mha_dataset, tmp_path)
    (folder / "elsewhere").mkdir()
    listed = {}
    for i in range(8):
        case = f"case_{i:03d}"
        images = []
        for ch in range(2):
            src = folder / "imagesTr" / f"{case}_{ch:04d}.mha"
            src.rename(folder / "elsewhere" / f"{case}_{'t1' if ch == 0 else 't2'}.mha")
            images.append(f"elsewhere/{case}_{'t1' if ch == 0 else 't2'}.mha")
        listed[case] = {"images": images, "label": f"labelsTr/{case}.mha"}
    _edit_json(folder, dataset=listed)
    cases = read_dataset(preset_regions(), folder)
    assert [c.id for c in cases if c.subset == "train"] == [f"case_{i:03d}" for i in range(8)]
    assert cases[0].images[1].name == "case_000_t2.mha"
    listed["case_001"]["images"] = listed["case_001"]["images"][:1]
    _edit_json(folder, dataset=listed)
    with pytest.raises(DatasetError, match=r"case case_001 lists 1 image files, dataset.json names 2 channels"):
        read_dataset(preset_regions(), folder)
