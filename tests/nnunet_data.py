"""nnU-Net v2 raw datasets for the tests, made with nnU-Net's own code where it can run here.

nnunetv2 is a test-only client: its full dependency set conflicts with the project's pins (its
dynamic-network-architectures wants timm<1.0.23), but ``pip install --no-deps --target DIR nnunetv2
batchgenerators`` is enough for its MSD converter and its ``generate_dataset_json``. The install is
cached in the git-ignored ``.cache/nnunetv2`` and run in subprocesses with that folder on PYTHONPATH, so
the project's environment is never touched; where pip cannot reach the package the tests skip.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NNUNET_DIR = REPO / ".cache" / "nnunetv2"
NNUNET_PINS = ["nnunetv2==2.8.1", "batchgenerators==0.25.5"]


def nnunet_lib() -> Path:
    """The folder holding nnunetv2 (installed on first use); skips the test when pip cannot install it."""
    if (NNUNET_DIR / "nnunetv2" / "dataset_conversion" / "convert_MSD_dataset.py").is_file():
        return NNUNET_DIR
    NNUNET_DIR.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".nnunetv2-", dir=NNUNET_DIR.parent))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                           "--target", str(tmp), *NNUNET_PINS], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"cannot install {' '.join(NNUNET_PINS)} (test-only): {proc.stderr.strip()[-300:]}")
    try:
        tmp.rename(NNUNET_DIR)
    except OSError:  # another process installed it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return NNUNET_DIR


def run_nnunet(code: str, workdir: Path) -> None:
    """Run Python `code` with nnunetv2 importable and its three folders set under `workdir`."""
    env = dict(os.environ, PYTHONPATH=str(nnunet_lib()), OMP_NUM_THREADS="1")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(workdir / var)
        (workdir / var).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nnunetv2 failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def convert_msd(task: Path, workdir: Path) -> Path:
    """nnU-Net's own `nnUNetv2_convert_MSD_dataset` on an MSD task; returns the DatasetXXX_Name folder.

    The converter asserts an imagesTs/ folder, which the labelled-only copy lacks: it reads the task
    through a folder of links with an empty imagesTs/.
    """
    src = workdir / "msd" / task.name
    src.mkdir(parents=True)
    for name in ("imagesTr", "labelsTr", "dataset.json"):
        (src / name).symlink_to(task / name)
    (src / "imagesTs").mkdir()
    run_nnunet("from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset\n"
               f"convert_msd_dataset({str(src)!r}, num_processes=1)", workdir)
    (out,) = (workdir / "nnUNet_raw").glob("Dataset*")
    return out


def dataset_json(folder: Path, workdir: Path, **kwargs) -> None:
    """dataset.json written by nnunetv2's `generate_dataset_json` (the documented way to make one)."""
    run_nnunet("import json, sys\n"
               "from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json\n"
               f"kw = json.loads({json.dumps(json.dumps(kwargs))})\n"
               "kw['channel_names'] = {int(k): v for k, v in kw['channel_names'].items()}\n"
               f"generate_dataset_json({str(folder)!r}, **kw)", workdir)


# --------------------------------------------------------------------------- datasets written by the tests
def _blob(shape, rng, radius_frac=0.3) -> np.ndarray:
    """A filled ellipsoid (bool) at a random centre."""
    grid = np.indices(shape, dtype=np.float32)
    centre = [rng.uniform(0.35, 0.65) * s for s in shape]
    radii = [radius_frac * s * rng.uniform(0.8, 1.2) for s in shape]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def write_rgb_png_dataset(folder: Path, workdir: Path, *, train: int = 8, test: int = 2, seed: int = 0) -> Path:
    """A 2D RGB PNG dataset (two classes: a disc, 1, with a core, 2) in nnU-Net v2's format, sizes varying."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(train + test):
        shape = (int(rng.integers(60, 76)), int(rng.integers(70, 90)))
        disc = _blob(shape, rng)
        core = disc & _blob(shape, rng, 0.15)
        label = disc.astype(np.uint8) + core.astype(np.uint8)
        rgb = rng.normal(60, 12, (*shape, 3))
        rgb[disc] += [120, 40, 10]
        rgb[core] += [0, 90, 60]
        sub, case = ("Tr", f"img_{i:03d}") if i < train else ("Ts", f"test_{i:03d}")
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(folder / f"images{sub}" / f"{case}_0000.png")
        Image.fromarray(label, "L").save(folder / f"labels{sub}" / f"{case}.png")
    dataset_json(folder, workdir, channel_names={0: "R", 1: "G", 2: "B"},
                 labels={"background": 0, "disc": 1, "core": 2}, num_training_cases=train, file_ending=".png",
                 dataset_name=folder.name)
    return folder


def _sitk_image(arr_xyz: np.ndarray, spacing, origin, direction):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_xyz.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    return img


# an oblique, flipped direction (a rotation about z by 30 degrees, then x flipped), to test the geometry
DIRECTION = np.array([[np.cos(0.52), -np.sin(0.52), 0], [np.sin(0.52), np.cos(0.52), 0], [0, 0, 1]]) @ np.diag([-1, 1, 1])


def write_regions_dataset(folder: Path, workdir: Path, *, ending: str = ".mha", train: int = 8, test: int = 2,
                          seed: int = 0) -> Path:
    """A 3D two-channel dataset with nested regions (whole = {1, 2}, core = {2}) and anisotropic spacing."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(train + test):
        shape = (int(rng.integers(30, 38)), int(rng.integers(30, 38)), int(rng.integers(12, 16)))
        spacing = (1.0, 1.0, float(rng.choice([2.5, 3.0])))
        origin = rng.uniform(-50, 50, 3)
        whole = _blob(shape, rng)
        core = whole & _blob(shape, rng, 0.15)
        label = whole.astype(np.uint8) + core.astype(np.uint8)
        t1 = rng.normal(100, 10, shape) + 80 * whole
        t2 = rng.normal(50, 10, shape) + 120 * core
        sub, case = ("Tr", f"case_{i:03d}") if i < train else ("Ts", f"test_{i:03d}")
        for ch, arr in enumerate((t1, t2)):
            sitk.WriteImage(_sitk_image(arr.astype(np.float32), spacing, origin, DIRECTION),
                            str(folder / f"images{sub}" / f"{case}_{ch:04d}{ending}"))
        sitk.WriteImage(_sitk_image(label, spacing, origin, DIRECTION), str(folder / f"labels{sub}" / f"{case}{ending}"))
    dataset_json(folder, workdir, channel_names={0: "T1", 1: "T2"},
                 labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2],
                 num_training_cases=train, file_ending=ending, dataset_name=folder.name)
    return folder
