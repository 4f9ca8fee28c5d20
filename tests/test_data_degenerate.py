"""Degenerate or broken inputs are refused (or warned about) per case, with a count, instead of being
cached as if they were fine; a truncated cache file is never trusted (issue 21)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deconver.config import load_preset
from deconver.data import DatasetError, PreparedDataset
from deconver.data.prepare import prepare_dataset
from deconver.data.synth import write_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = ("BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-GLI-00002-000")
KINDS = ("t1n", "t1c", "t2w", "t2f", "seg")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_synthetic("brats23", tmp_path_factory.mktemp("pristine") / "brats23", cases=3, seed=2)


@pytest.fixture
def brats(pristine, tmp_path):
    root = tmp_path / "brats23"
    shutil.copytree(pristine, root)
    return root


def _file(root: Path, case: str, kind: str) -> Path:
    return next(root.rglob(f"{case}-{kind}.nii.gz"))


def _prepare(root: Path, out: Path):
    return prepare_dataset(load_preset("brats23"), root, out, progress=False)


def _refused(root: Path, out: Path, match: str) -> str:
    with pytest.raises(DatasetError, match=match) as info:
        _prepare(root, out)
    assert not (out / "manifest.json").exists()
    return str(info.value)


def test_text_file_as_label_is_one_clear_line(brats, tmp_path):
    path = _file(brats, CASES[0], "seg")
    path.write_text("this is a text file, not a NIfTI volume\n" * 20)
    msg = _refused(brats, tmp_path / "out", "cannot read NIfTI")
    first = [line for line in msg.splitlines() if str(path) in line]
    assert len(first) == 1 and len(first[0]) < 600
    assert "install" not in msg.lower() and "LoadImage" not in msg
    assert "1 of 3 cases" in msg


def _set_sform(path: Path, affine: np.ndarray) -> None:
    """Write `affine` into the header's sform (which readers prefer), as a broken converter would."""
    img = nib.load(path)
    header = img.header.copy()
    header.set_sform(affine, code=1)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header), path)


def test_affine_with_a_zero_column_is_refused_naming_the_file(brats, tmp_path):
    affine = nib.load(_file(brats, CASES[1], "t1n")).affine.copy()
    affine[:3, 1] = 0
    for kind in KINDS:
        _set_sform(_file(brats, CASES[1], kind), affine)
    msg = _refused(brats, tmp_path / "out", "zero column")
    assert str(_file(brats, CASES[1], "t1n")) in msg and "1 of 3 cases" in msg


def test_nan_in_the_sform_is_refused(brats, tmp_path):
    affine = nib.load(_file(brats, CASES[2], "t1n")).affine.copy()
    affine[0, 3] = np.nan
    for kind in KINDS:
        _set_sform(_file(brats, CASES[2], kind), affine)
    msg = _refused(brats, tmp_path / "out", "NaN")
    assert str(_file(brats, CASES[2], "t1n")) in msg


def test_single_slices_are_not_volumes_and_every_bad_case_is_counted(brats, tmp_path):
    rng = np.random.default_rng(0)
    for case in CASES[:2]:
        for kind in KINDS:
            path = _file(brats, case, kind)
            data = (rng.integers(0, 2, (35, 51, 1)) if kind == "seg" else rng.random((35, 51, 1))).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    msg = _refused(brats, tmp_path / "out", "single slice")
    assert "2 of 3 cases" in msg and "(35, 51, 1)" in msg
    assert all(case in msg for case in CASES[:2]) and CASES[2] + ":" not in msg
    # the good case is cached and kept for the rerun after the bad ones are fixed
    assert (tmp_path / "out" / "cases" / f"{CASES[2]}.json").is_file()


def test_constant_image_with_a_label_is_warned_per_case_and_counted(brats, tmp_path, repo_root):
    for kind in KINDS[:4]:
        path = _file(brats, CASES[0], kind)
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), path)
    result = _prepare(brats, tmp_path / "out")
    assert len(result["warnings"]) == 1 and "constant" in result["warnings"][0]
    ds = PreparedDataset(tmp_path / "out")
    assert ds.manifest["warnings"] == result["warnings"] and ds.case(CASES[0])["warnings"]
    assert ds.case(CASES[1])["warnings"] == []
    # the command says it per case and counts, also when the cache is up to date
    proc = subprocess.run([sys.executable, "-m", "deconver.cli", "prepare", "--preset", "brats23", "--root",
                           str(brats), "--out", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "1 of 3 cases with warnings" in proc.stderr
    assert "up to date" in proc.stdout


def test_a_truncated_cached_array_is_redone(brats, tmp_path):
    out = tmp_path / "out"
    _prepare(brats, out)
    victim = out / "cases" / f"{CASES[1]}_image.npy"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    result = _prepare(brats, out)
    assert result["status"] == "prepared" and result["written"] == 1 and result["reused"] == 2
    assert victim.read_bytes() == good
    image, _ = PreparedDataset(out).load(CASES[1])
    assert image.shape[0] == 4
