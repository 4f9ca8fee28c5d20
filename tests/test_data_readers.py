"""Readers on the synthetic stand-ins written in each official layout, planted quirks included."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from deconver.config import load_preset
from deconver.data import DatasetError, read_dataset
from deconver.data.readers import read_grade_csv
from deconver.data.synth import BRATS_TOP, write_synthetic

N = 6


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """One small synthetic dataset of each kind (and ISLES in both layouts), written once."""
    base = tmp_path_factory.mktemp("synth")
    roots = {kind: write_synthetic(kind, base / kind, cases=N, seed=7) for kind in ("isles22", "brats23", "glas")}
    roots["fives"] = write_synthetic("fives", base / "fives", cases=8, seed=7)
    roots["isles22_challenge"] = write_synthetic("isles22", base / "isles22_challenge", cases=N, seed=7,
                                                 layout="challenge")
    return roots


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / root.name
    shutil.copytree(root, dst)
    return dst


# --------------------------------------------------------------------------- ISLES'22
@pytest.mark.parametrize("layout", ["isles22", "isles22_challenge"])
def test_isles22_both_layouts(synth, layout):
    cases = read_dataset(load_preset("isles22"), synth[layout])
    assert [c.id for c in cases] == [f"sub-strokecase{i:04d}" for i in range(1, N + 1)]
    for c in cases:
        assert [p.name.split("_")[-1] for p in c.images] == ["dwi.nii.gz", "adc.nii.gz"]  # the preset's order
        assert c.label.name.endswith("_msk.nii.gz") and "derivatives" in c.label.parts
        assert c.meta["synthetic"] is True and c.meta["spacing"] == pytest.approx([2.0, 2.0, 2.0])
        assert c.meta["layout"] == ("zenodo" if layout == "isles22" else "challenge")
    assert nib.load(cases[0].label).get_data_dtype() == np.uint16  # masks as the real ones


def test_isles22_channel_order_follows_preset(synth):
    preset = load_preset("isles22", {"channels": ["adc", "dwi"]})
    case = read_dataset(preset, synth["isles22"])[0]
    assert [p.name.split("_")[-1] for p in case.images] == ["adc.nii.gz", "dwi.nii.gz"]


def test_isles22_lesion_bright_on_dwi_dark_on_adc(synth):
    case = read_dataset(load_preset("isles22"), synth["isles22"])[0]
    dwi, adc = (nib.load(p).get_fdata() for p in case.images)
    mask = nib.load(case.label).get_fdata() > 0
    brain = (dwi > 0) & ~mask
    assert mask.sum() > 20
    assert dwi[mask].mean() > 1.5 * dwi[brain].mean()
    assert adc[mask].mean() < 0.75 * adc[brain].mean()


def test_isles22_quirks_empty_mask_and_missing_flair(synth):
    cases = {c.id: c for c in read_dataset(load_preset("isles22"), synth["isles22"])}
    assert not np.asarray(nib.load(cases["sub-strokecase0002"].label).dataobj).any()  # the planted empty mask
    flair_preset = load_preset("isles22", {"channels": ["dwi", "adc", "flair"], "reader_options": {"flair": True}})
    with pytest.raises(DatasetError, match=r"sub-strokecase0003: missing modality 'flair'"):
        read_dataset(flair_preset, synth["isles22"])
    zeros = load_preset("isles22", {"channels": ["dwi", "adc", "flair"],
                                    "reader_options": {"flair": True, "missing_flair": "zeros"}})
    by_id = {c.id: c for c in read_dataset(zeros, synth["isles22"])}
    assert by_id["sub-strokecase0003"].meta["zero_channels"] == [2]
    first = by_id["sub-strokecase0001"]
    assert first.images[2].name == "sub-strokecase0001_ses-0001_FLAIR.nii.gz"  # Zenodo spelling, anat/ folder
    assert first.meta["resample_channels"] == [2]
    assert nib.load(first.images[2]).shape != nib.load(first.images[0]).shape  # FLAIR on another grid


def test_isles22_flair_option_needs_the_channel(synth):
    with pytest.raises(DatasetError, match="flair"):
        read_dataset(load_preset("isles22", {"reader_options": {"flair": True}}), synth["isles22"])


def test_isles22_unknown_reader_option(synth):
    with pytest.raises(DatasetError, match=r"unknown reader_options \['flare'\]"):
        read_dataset(load_preset("isles22", {"reader_options": {"flare": True}}), synth["isles22"])


def test_isles22_root_may_be_the_inner_folder(synth):
    cases = read_dataset(load_preset("isles22"), synth["isles22"] / "ISLES-2022")
    assert len(cases) == N


# --------------------------------------------------------------------------- BraTS'23
def test_brats23_nested_folders_found(synth):
    cases = read_dataset(load_preset("brats23"), synth["brats23"])
    assert [c.id for c in cases] == [f"BraTS-GLI-{i:05d}-000" for i in range(N)]
    last = cases[-1]
    assert list(last.label.parts).count(BRATS_TOP) == 2  # the planted doubly nested folder
    for c in cases:
        assert [p.name.rsplit("-", 1)[-1] for p in c.images] == ["t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]
        assert c.meta["synthetic"] is True


def test_brats23_regions_nested(synth):
    """Labels 1/2/3 as uint8; ET (3) is a rim that separates the necrotic core (1) from the edema (2)."""
    from scipy import ndimage

    for c in read_dataset(load_preset("brats23"), synth["brats23"]):
        seg = np.asarray(nib.load(c.label).dataobj)
        assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2, 3}
        assert (seg == 3).any() and (seg == 2).any()
        wt, tc = seg > 0, np.isin(seg, [1, 3])
        assert tc.sum() < wt.sum()
        ncr_grown = ndimage.binary_dilation(seg == 1)
        assert not (ncr_grown & (seg == 2)).any()
        # enhancing tumour is bright on t1c
        t1c = np.asarray(nib.load(c.images[1]).dataobj, dtype=float)
        assert t1c[seg == 3].mean() > 1.3 * t1c[(seg == 0) & (t1c > 0)].mean()


def test_brats23_missing_label_is_optional_on_request(synth, tmp_path):
    root = _copy(synth["brats23"], tmp_path)
    seg = next(root.rglob("BraTS-GLI-00001-000-seg.nii.gz"))
    seg.unlink()
    with pytest.raises(DatasetError, match=r"BraTS-GLI-00001-000: missing label .*BraTS-GLI-00001-000-seg\.nii\.gz"):
        read_dataset(load_preset("brats23"), root)
    cases = read_dataset(load_preset("brats23"), root, require_labels=False)
    assert {c.id: c.label for c in cases}["BraTS-GLI-00001-000"] is None


# --------------------------------------------------------------------------- GlaS
def test_glas_subsets_grades_and_instances(synth):
    cases = read_dataset(load_preset("glas"), synth["glas"])
    subsets = {c.id: c.subset for c in cases}
    assert set(subsets.values()) == {"train", "testA", "testB"}
    assert all(i.startswith(s + "_") for i, s in subsets.items())
    for c in cases:
        assert c.meta["grade"]["grade (GlaS)"] in ("benign", "malignant")  # leading space stripped
        assert c.meta["grade"]["patient ID"].isdigit() and c.meta["spacing"] == [1.0, 1.0]
        assert c.label.name == f"{c.id}_anno.bmp"
    inst = np.asarray(Image.open(cases[0].label))
    assert inst.ndim == 2 and len(np.unique(inst)) > 2  # an instance map, not a binary mask


def test_grade_csv_line_endings_and_spaces(tmp_path):
    rows = ["name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)", "testA_1,4, benign, adenomatous",
            "train_2, 12, malignant, adenocarcinoma"]
    for ending in ("\r", "\r\n", "\n"):
        path = tmp_path / f"grade{len(ending)}{ending == chr(10)}.csv"
        path.write_bytes(ending.join(rows).encode())
        table = read_grade_csv(path)
        assert table == {"testA_1": {"patient ID": "4", "grade (GlaS)": "benign",
                                     "grade (Sirinukunwattana et al. 2015)": "adenomatous"},
                         "train_2": {"patient ID": "12", "grade (GlaS)": "malignant",
                                     "grade (Sirinukunwattana et al. 2015)": "adenocarcinoma"}}
    raw = (Path(__file__).parent / "does-not-exist.csv")
    with pytest.raises(DatasetError, match="does-not-exist.csv"):
        read_grade_csv(raw)


def test_glas_synthetic_grade_csv_is_cr_only(synth):
    data = (synth["glas"] / "Grade.csv").read_bytes()
    assert b"\r" in data and b"\n" not in data
    assert b", benign" in data or b", malignant" in data


# --------------------------------------------------------------------------- FIVES
def test_fives_layout_quirks(synth):
    root = synth["fives"]
    assert (root / "train" / "Original" / "Thumbs.db").is_file() and (root / "test" / "Groud truth").is_dir()
    cases = read_dataset(load_preset("fives"), root)
    assert len(cases) == 8
    assert {c.subset for c in cases} == {"train", "test"}
    assert all(c.images[0].suffix == ".png" for c in cases)  # Thumbs.db and the xlsx are ignored
    test_case = next(c for c in cases if c.subset == "test")
    assert test_case.label.parent.name == "Groud truth"
    assert {c.meta["category"] for c in cases} <= set("ADGN")
    modes = {Image.open(c.label).mode for c in cases}
    assert modes == {"L", "RGB"}  # some masks are stored as RGB


def test_fives_ground_truth_spelling_and_pairing(synth, tmp_path):
    root = _copy(synth["fives"], tmp_path)
    (root / "test" / "Groud truth").rename(root / "test" / "Ground truth")
    cases = read_dataset(load_preset("fives"), root)
    assert len(cases) == 8
    orphan = root / "test" / "Ground truth" / "99_N.png"
    Image.new("L", (8, 8)).save(orphan)
    with pytest.raises(DatasetError, match="mask without image: .*99_N.png"):
        read_dataset(load_preset("fives"), root)
    orphan.unlink()
    next((root / "train" / "Ground truth").glob("1_*.png")).unlink()
    with pytest.raises(DatasetError, match=r"case train_1_A: no mask"):
        read_dataset(load_preset("fives"), root)


def test_fives_vessels_darker_than_fundus(synth):
    case = read_dataset(load_preset("fives"), synth["fives"])[0]
    img = np.asarray(Image.open(case.images[0]).convert("RGB")).astype(float)
    mask = np.asarray(Image.open(case.label))
    mask = (mask[..., 0] if mask.ndim == 3 else mask) > 127
    fundus = (img.sum(-1) > 30) & ~mask
    assert 0.005 < mask.mean() < 0.2
    assert img[mask, 0].mean() < img[fundus, 0].mean() - 15


# --------------------------------------------------------------------------- synth itself
def test_synthetic_marker_and_determinism(synth, tmp_path):
    for root in synth.values():
        text = (root / "SYNTHETIC.txt").read_text()
        assert text.startswith("SYNTHETIC DATA") and "planted quirks" in text
    a = write_synthetic("glas", tmp_path / "a", cases=2, seed=3)
    b = write_synthetic("glas", tmp_path / "b", cases=2, seed=3)
    c = write_synthetic("glas", tmp_path / "c", cases=2, seed=4)
    assert (a / "train_1.bmp").read_bytes() == (b / "train_1.bmp").read_bytes()
    assert (a / "train_1.bmp").read_bytes() != (c / "train_1.bmp").read_bytes()


def test_synth_is_noop_on_existing_and_refuses_foreign_folder(tmp_path):
    out = write_synthetic("glas", tmp_path / "g", cases=2, seed=0)
    stamp = (out / "train_1.bmp").stat().st_mtime_ns
    write_synthetic("glas", out, cases=5, seed=1)
    assert (out / "train_1.bmp").stat().st_mtime_ns == stamp and not (out / "train_3.bmp").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(DatasetError, match="not empty"):
        write_synthetic("fives", foreign, cases=2)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary folder left behind
