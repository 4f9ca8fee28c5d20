"""FIVES reader (fundus vessels, 2D RGB).

Layout: ``train/Original/1_A.png``, ``train/Ground truth/1_A.png`` (one mirror spells the folder
``Groud truth``), the same under ``test/``; ``Quality Assessment.xlsx`` and stray ``Thumbs.db`` files are
ignored. The split folders may sit inside one wrapper folder. Images and masks pair by file name; the
letter after ``_`` is the category (A AMD, D DR, G glaucoma, N normal). Masks are 0/255, sometimes RGB:
the target is channel 0 > 127.
"""
from __future__ import annotations

import re
from pathlib import Path

from deconver.data.readers._common import is_stray, rgb_root, unique_cases
from deconver.data.records import Case, DatasetError

_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
_GT_NAMES = {"ground truth", "groud truth", "groundtruth", "ground_truth"}
_CATEGORY_RE = re.compile(r"_([A-Za-z])$")


def _split_dirs(root: Path) -> list[tuple[str, Path]]:
    """(subset, folder) pairs: train/ and test/ at the root or inside one wrapper folder."""
    for base in [root, *sorted(p for p in root.iterdir() if p.is_dir() and not is_stray(p))]:
        found = [(p.name.lower(), p) for p in sorted(base.iterdir())
                 if p.is_dir() and p.name.lower() in ("train", "test")]
        if found:
            return found
    raise DatasetError(f"no train/ or test/ folder found in {root} (FIVES layout: train/Original, train/Ground truth)")


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and not is_stray(p) and p.suffix.lower() in _IMAGE_EXT}


def read_fives(root: Path, channels: list[str], *, require_label: bool = True) -> list[Case]:
    """Case records of a FIVES root; ids are ``<subset>_<file stem>`` (e.g. ``train_1_A``)."""
    root, synthetic = rgb_root(root, channels, "fives")
    cases = []
    for subset, folder in _split_dirs(root):
        subdirs = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
        if "original" not in subdirs:
            raise DatasetError(f"{folder}: no 'Original' folder")
        gts = [subdirs[n] for n in _GT_NAMES if n in subdirs]
        if len(gts) > 1:
            raise DatasetError(f"{folder}: several ground-truth folders {sorted(str(g) for g in gts)}")
        if not gts and require_label:
            raise DatasetError(f"{folder}: no 'Ground truth' (or 'Groud truth') folder")
        images = _images(subdirs["original"])
        masks = _images(gts[0]) if gts else {}
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise DatasetError(f"mask without image: {masks[orphans[0]]}")
        for stem, image in images.items():
            label = masks.get(stem)
            if label is None and require_label:
                raise DatasetError(f"case {subset}_{stem}: no mask {gts[0] / image.name}")
            m = _CATEGORY_RE.search(stem)
            meta = {"format": "image2d", "spacing": [1.0, 1.0], "label_encoding": "threshold", "synthetic": synthetic,
                    "resample_channels": [], "zero_channels": [], "category": m.group(1).upper() if m else None}
            cases.append(Case(id=f"{subset}_{stem}", images=[image], label=label, subset=subset, meta=meta))
    return unique_cases(cases, root)
