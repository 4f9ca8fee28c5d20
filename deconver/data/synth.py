"""`deconver synth`: small SYNTHETIC stand-ins written in each dataset's official layout.

They exist so the embedded-default study and the tests run anywhere; they are not real data and say
so (a ``SYNTHETIC.txt`` at the root, which every reader turns into ``meta["synthetic"] = True``). Each
looks like its task, so a model learns something in a few epochs, and carries the real layouts' quirks:

- isles22: DWI/ADC on an oblique 2 mm LAS grid with lesions bright on DWI and dark on ADC, FLAIR on
  another grid (1 x 1 x 5 mm, shifted origin), uint16 masks whose affine differs from DWI by ~1e-7;
  case 2 has an empty mask, case 3 has no FLAIR. Zenodo layout by default (``layout="challenge"``
  writes rawdata/ + derivatives/).
- brats23: 4 channels (t1n, t1c, t2w, t2f, int16), uint8 labels with nested regions (ET 3 rim inside
  TC = NCR 1 + ET, inside WT = TC + edema 2); the last case sits in a doubly nested top folder.
- glas: RGB BMP H&E-like tiles of varying size with glands (pale lumen, purple epithelium), stain varying
  from tile to tile, purple lymphoid aggregates without lumen that are not glands, stromal nuclei and a
  slight blur; the annotation an 8-bit instance map, Grade.csv with leading spaces and CR-only line endings.
- fives: 256 x 256 RGB fundus images (the real ones are 2048 x 2048; the tree is drawn to scale) with a branching vessel tree from the optic disc, masks 0/255 (every
  third one stored as RGB), Thumbs.db files, ``Quality Assessment.xlsx``, and the test split's
  ground truth in the misspelt ``Groud truth`` folder of one mirror.

The dataset is written into a temporary folder beside `out` and renamed into place at the end, so an
interrupted run leaves nothing that looks like a dataset. The 3D stand-ins are written here, the 2D
ones (GlaS, FIVES) in `deconver.data.synth_2d`.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from deconver.data.readers._common import SYNTHETIC_MARKER
from deconver.data.records import DatasetError
from deconver.data.synth_2d import texture as _texture
from deconver.data.synth_2d import write_fives, write_glas

KINDS = ("isles22", "brats23", "glas", "fives")
BRATS_TOP = "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"


# --------------------------------------------------------------------------- helpers
def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _grid_world(shape, affine) -> np.ndarray:
    """World coordinates (mm) of every voxel centre, shape (*shape, 3)."""
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _rotation_z(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


# --------------------------------------------------------------------------- ISLES'22
def _isles_case(rng: np.random.Generator, lesions: int, with_flair: bool) -> dict:
    shape = (56, 64, 44)
    rot = _rotation_z(rng.uniform(-0.08, 0.08))
    lin = rot @ np.diag([-2.0, 2.0, 2.0])  # LAS, slightly oblique, as the real sample
    centre_vox = (np.asarray(shape) - 1) / 2
    origin = -lin @ centre_vox + rng.uniform(-5, 5, 3)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = lin, origin
    head_c = affine[:3, 3] + lin @ centre_vox + rng.uniform(-3, 3, 3)
    axes = np.array([47.0, 56.0, 37.0]) * rng.uniform(0.92, 1.0, 3)
    vent = [(head_c + np.array([sx * 9.0, 4.0, 4.0]), np.array([5.0, 14.0, 7.0])) for sx in (-1, 1)]
    spots = []
    for _ in range(lesions):
        for _try in range(50):
            u = rng.normal(size=3)
            u = u / np.linalg.norm(u) * rng.uniform(0.1, 0.7)
            centre = head_c + u * axes
            if all(np.linalg.norm((centre - c) / a) > 1.6 for c, a in vent):
                break
        # a lobulated lesion (an infarct is rarely an ellipsoid): a main blob and 1-3 smaller lobes
        size = rng.uniform(7.0, 15.0)  # mm: infarcts of ~2-30 ml (ISLES'22 spans 0.1 to over 100 ml)
        spots.append((centre, size * rng.uniform(0.7, 1.3, 3)))
        for _lobe in range(int(rng.integers(1, 4))):
            offset = rng.normal(size=3)
            offset *= size * rng.uniform(0.5, 0.9) / np.linalg.norm(offset)
            spots.append((centre + offset, size * rng.uniform(0.35, 0.7) * rng.uniform(0.7, 1.3, 3)))
    tex_seed = int(rng.integers(1 << 31))

    def phantom(world):
        q = np.linalg.norm((world - head_c) / axes, axis=-1)
        head = q < 1.0
        csf = np.zeros(world.shape[:-1], bool)
        for c, a in vent:
            csf |= np.linalg.norm((world - c) / a, axis=-1) < 1.0
        lesion = np.zeros(world.shape[:-1], bool)
        for c, a in spots:
            lesion |= np.linalg.norm((world - c) / a, axis=-1) < 1.0
        lesion &= head & ~csf
        tex = _texture(world, np.random.default_rng(tex_seed), scale=25.0)
        return head, csf, lesion, tex

    head, csf, lesion, tex = phantom(_grid_world(shape, affine))
    noise = lambda s: rng.normal(0, s, shape)  # noqa: E731
    # acute infarct: about twice the tissue's DWI signal, ADC down by ~45 %, both with scanner-like noise
    dwi = head * (100 + 12 * tex + noise(8)) + csf * -60 + lesion * 110
    adc = head * (800 + 60 * tex + noise(40)) + csf * 1500 - lesion * 360
    out = {"affine": affine, "dwi": np.clip(dwi, 0, None) * head, "adc": np.clip(adc, 1, None) * head,
           "mask": lesion.astype(np.uint16)}
    if with_flair:
        f_shape = (112, 128, 18)
        f_rot = _rotation_z(rng.uniform(-0.05, 0.05)) @ rot
        f_lin = f_rot @ np.diag([-1.0, 1.0, 5.0])
        f_aff = np.eye(4)
        f_aff[:3, :3] = f_lin
        f_aff[:3, 3] = head_c - f_lin @ ((np.asarray(f_shape) - 1) / 2) + np.array([3.0, -4.0, 2.0])
        fh, fc, fl, ft = phantom(_grid_world(f_shape, f_aff))
        flair = fh * (300 + 30 * ft + rng.normal(0, 12, f_shape)) - fc * 220 + fl * 170
        out["flair"], out["flair_affine"] = np.clip(flair, 0, None) * fh, f_aff
    return out


def write_isles22(out: Path, cases: int, seed: int, layout: str = "zenodo") -> list[str]:
    """ISLES'22-like cases in the Zenodo (default) or challenge layout; returns the planted quirks."""
    if layout not in ("zenodo", "challenge"):
        raise ValueError(f"layout must be 'zenodo' or 'challenge', got {layout!r}")
    quirks = ["mask affine differs from DWI by ~1e-7"]
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        sub = f"sub-strokecase{i + 1:04d}"
        empty, no_flair = i == 1, i == 2
        if empty:
            quirks.append(f"{sub}: empty mask")
        if no_flair:
            quirks.append(f"{sub}: no FLAIR")
        data = _isles_case(rng, lesions=0 if empty else int(rng.integers(1, 4)), with_flair=not no_flair)
        stem = f"{sub}_ses-0001"
        if layout == "zenodo":
            base = out / "ISLES-2022"
            img_dir, anat_dir = base / sub / "ses-0001" / "dwi", base / sub / "ses-0001" / "anat"
            mask_dir, flair_name = base / "derivatives" / sub / "ses-0001", f"{stem}_FLAIR.nii.gz"
        else:
            img_dir = anat_dir = out / "rawdata" / sub / "ses-0001"
            mask_dir, flair_name = out / "derivatives" / sub / "ses-0001", f"{stem}_flair.nii.gz"
        _save_nifti(data["dwi"].astype(np.float32), data["affine"], img_dir / f"{stem}_dwi.nii.gz")
        _save_nifti(data["adc"].astype(np.float32), data["affine"], img_dir / f"{stem}_adc.nii.gz")
        if "flair" in data:
            _save_nifti(data["flair"].astype(np.float32), data["flair_affine"], anat_dir / flair_name)
        mask_affine = data["affine"] + rng.uniform(-1e-7, 1e-7, (4, 4)) * np.r_[np.ones(3), 0][:, None]
        _save_nifti(data["mask"], mask_affine, mask_dir / f"{stem}_msk.nii.gz")
    return quirks


# --------------------------------------------------------------------------- BraTS'23
def _brats_case(rng: np.random.Generator) -> dict:
    shape = (64, 64, 48)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    centre = (np.asarray(shape) - 1) / 2 + rng.uniform(-1.5, 1.5, 3)
    axes = np.array([27.0, 29.0, 20.0]) * rng.uniform(0.93, 1.0, 3)
    brain = np.linalg.norm((grid - centre) / axes, axis=-1) < 1.0
    tex = _texture(grid, rng, scale=14.0)
    t_centre = centre + rng.uniform(-0.35, 0.35, 3) * axes
    rel = grid - t_centre
    dist = np.linalg.norm(rel, axis=-1)
    direction = rel / np.maximum(dist[..., None], 1e-6)
    bumps = 1 + 0.18 * np.sin(direction @ rng.normal(size=3) * 3 + rng.uniform(0, 6))
    r_wt = rng.uniform(7.0, 13.0)
    r_tc = r_wt * rng.uniform(0.45, 0.7)
    rim = rng.uniform(1.8, 3.0)
    d = dist / bumps
    label = np.zeros(shape, np.uint8)
    label[(d < r_wt) & brain] = 2                       # edema (WT only)
    label[(d < r_tc) & brain] = 3                       # enhancing rim (ET, TC, WT)
    if rng.uniform() < 0.8:
        label[(d < r_tc - rim) & brain] = 1             # necrotic core (TC, WT)
    ncr, ed, et = label == 1, label == 2, label == 3
    base = brain * (1 + 0.08 * tex)
    noise = lambda s: rng.normal(0, s, shape)  # noqa: E731
    chans = {
        "t1n": base * 500 - ed * 80 - (ncr | et) * 150 + noise(15),
        "t1c": base * 520 - ed * 60 - ncr * 250 + et * 600 + noise(15),
        "t2w": base * 400 + ed * 450 + ncr * 600 + et * 250 + noise(15),
        "t2f": base * 420 + ed * 500 + ncr * 150 + et * 300 + noise(15),
    }
    affine = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, shape[1] - 1.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    return {"affine": affine, "label": label,
            **{k: (np.clip(v, 0, None) * brain).round().astype(np.int16) for k, v in chans.items()}}


def write_brats23(out: Path, cases: int, seed: int) -> list[str]:
    """BraTS'23-like cases; the last one lies in a doubly nested top folder."""
    quirks = []
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        case = f"BraTS-GLI-{i:05d}-000"
        top = out / BRATS_TOP
        if i == cases - 1 and cases > 1:
            top = top / BRATS_TOP
            quirks.append(f"{case}: inside a doubly nested {BRATS_TOP}/{BRATS_TOP}/ folder")
        data = _brats_case(rng)
        for mod in ("t1c", "t1n", "t2f", "t2w"):
            _save_nifti(data[mod], data["affine"], top / case / f"{case}-{mod}.nii.gz")
        _save_nifti(data["label"], data["affine"], top / case / f"{case}-seg.nii.gz")
    return quirks


# --------------------------------------------------------------------------- entry points
WRITERS = {"isles22": write_isles22, "brats23": write_brats23, "glas": write_glas, "fives": write_fives}


def write_synthetic(kind: str, out: str | Path, cases: int = 12, seed: int = 0, **options) -> Path:
    """Write a synthetic `kind` dataset at `out` (atomically, via a temporary folder beside it).

    A folder that already holds a synthetic dataset is left as it is (a no-op); any other non-empty
    folder is refused. Returns `out`.
    """
    from deconver import __version__

    if kind not in WRITERS:
        raise DatasetError(f"no synthetic stand-in for {kind!r}; available: {sorted(WRITERS)}")
    if cases < 1:
        raise ValueError(f"cases must be positive, got {cases}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if (out / SYNTHETIC_MARKER).is_file():
            return out
        raise DatasetError(f"{out} exists and is not empty: refusing to write a synthetic dataset into it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        quirks = WRITERS[kind](tmp, cases, seed, **options)
        note = [f"SYNTHETIC DATA - a stand-in for {kind}, written by `deconver synth` (deconver {__version__}).",
                "Not real images or annotations: results on it say nothing about the real dataset.",
                f"kind: {kind}", f"cases: {cases}", f"seed: {seed}",
                *(f"option {k}: {v}" for k, v in sorted(options.items())), "planted quirks:",
                *(f"  - {q}" for q in quirks)]
        (tmp / SYNTHETIC_MARKER).write_text("\n".join(note) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="study config: write the dataset's stand-in at its root "
                        "(when the study marks it synthetic and it is absent)")
    parser.add_argument("--dataset", required=True, help=f"with --config a dataset of the study, else one of {KINDS}")
    parser.add_argument("--out", help="hand use: folder to write")
    parser.add_argument("--cases", type=int, help="number of cases (default 12, or the study's synth_cases)")
    parser.add_argument("--seed", type=int, help="seed (default 0, or the dataset's synth_seed in the study)")
    parser.add_argument("--layout", choices=["zenodo", "challenge"], help="isles22 only: which official layout")


def run(args: argparse.Namespace) -> int:
    from deconver.config import load_study
    from deconver.steps import UsageError, pipeline_mode

    options = {"layout": args.layout} if args.layout else {}
    if pipeline_mode(args, by_hand=["out"]):
        study = load_study(args.config)
        preset = study.preset(args.dataset)
        entry = study.datasets[args.dataset]
        out = Path(args.out or entry.root)
        if not entry.synthetic:
            print(f"dataset {args.dataset!r} is not synthetic in {args.config}: nothing to write")
            return 0
        if out.exists() and any(out.iterdir()) and not (out / SYNTHETIC_MARKER).is_file():
            print(f"{out} exists and holds data: nothing to write")
            return 0
        kind, cases = preset.reader, args.cases or entry.synth_cases
        seed = entry.synth_seed if args.seed is None else args.seed
    else:
        if args.dataset not in KINDS:
            raise UsageError(f"--dataset: {args.dataset!r} is not one of {KINDS} (or give --config)")
        kind, out, cases = args.dataset, Path(args.out), args.cases or 12
        seed = 0 if args.seed is None else args.seed
    if options and kind != "isles22":
        raise UsageError("--layout applies to isles22 only")
    if cases < 1:
        raise UsageError(f"--cases must be positive, got {cases}")
    existed = (out / SYNTHETIC_MARKER).is_file()
    if existed:
        written = dict(line.split(": ", 1) for line in (out / SYNTHETIC_MARKER).read_text().splitlines()
                       if line.startswith(("cases: ", "seed: ")))
        asked = {"cases": str(cases), "seed": str(seed)}
        if written != asked:
            print(f"warning: {out / SYNTHETIC_MARKER} records {written}, not the {asked} asked for: the stand-in "
                  f"is reused as it is (delete {out} to write it again)", file=sys.stderr)
    write_synthetic(kind, out, cases=cases, seed=seed, **options)
    print(f"{out}: {'already present, nothing to do' if existed else f'wrote {cases} synthetic {kind} cases'}")
    return 0
