"""ISLES'22 reader: the Zenodo release and the challenge (BIDS rawdata/derivatives) layouts.

Zenodo:     ISLES-2022/sub-strokecaseNNNN/ses-0001/dwi/sub-…_ses-0001_{dwi,adc}.nii.gz
            ISLES-2022/sub-…/ses-0001/anat/sub-…_ses-0001_FLAIR.nii.gz
            ISLES-2022/derivatives/sub-…/ses-0001/sub-…_ses-0001_msk.nii.gz
Challenge:  rawdata/sub-…/ses-0001/sub-…_ses-0001_{dwi,adc,flair}.nii.gz, derivatives/sub-…/ses-0001/…_msk.nii.gz

The root may be the folder holding ``ISLES-2022/`` or ``rawdata/``, or ``ISLES-2022/`` itself.
Channels are picked by name from {dwi, adc, flair} (matched case-insensitively); FLAIR lies on another
grid and is resampled into the DWI grid through the affines by `deconver prepare`.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from deconver.data.readers._common import (check_root, is_synthetic, match_channel_names, nifti_spacing, unique_cases,
                                            walk_files)
from deconver.data.records import Case, DatasetError

MODALITIES = ("dwi", "adc", "flair")
_IMAGE_RE = re.compile(r"^(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?.*_(dwi|adc|flair)\.nii(?:\.gz)?$", re.IGNORECASE)
_MASK_RE = re.compile(r"^(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?.*_msk\.nii(?:\.gz)?$", re.IGNORECASE)


def _bases(root: Path) -> tuple[Path, list[Path], str]:
    """(folder of the subject folders, folders of the masks, layout name)."""
    if (root / "rawdata").is_dir():
        return root / "rawdata", [root / "derivatives"], "challenge"
    base = root / "ISLES-2022" if (root / "ISLES-2022").is_dir() else root
    return base, [base / "derivatives", root / "derivatives"], "zenodo"


def read_isles22(root: Path, channels: list[str], *, flair: bool = False, missing_flair: str = "error",
                 require_label: bool = True) -> list[Case]:
    """Case records of an ISLES'22 root; `channels` picks and orders the modalities.

    flair: the preset asks for FLAIR (its channels must then name it). missing_flair: "error" (a case
    without FLAIR is a DatasetError) or "zeros" (the channel is filled with zeros and recorded in
    ``meta["zero_channels"]``).
    """
    root = check_root(root)
    names = match_channel_names(channels, MODALITIES, "isles22")
    if flair and "flair" not in names:
        raise DatasetError(f"reader_options.flair is true but channels {channels} lack 'flair': "
                           "set channels to [dwi, adc, flair] as well")
    if missing_flair not in ("error", "zeros"):
        raise DatasetError(f"reader_options.missing_flair must be 'error' or 'zeros', got {missing_flair!r}")
    base, mask_dirs, layout = _bases(root)
    synthetic = is_synthetic(root)

    images: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    derivative_dirs = [d.resolve() for d in mask_dirs if d.is_dir()]
    for path in walk_files(base):
        if any(d in path.resolve().parents for d in derivative_dirs):
            continue
        m = _IMAGE_RE.match(path.name)
        if not m:
            continue
        key, modality = (m.group(1), m.group(2) or ""), m.group(3).lower()
        if modality in images[key]:
            raise DatasetError(f"two {modality} files for {key[0]}: {images[key][modality]} and {path}")
        images[key][modality] = path
    if not images:
        raise DatasetError(f"no ISLES'22 images (sub-*_dwi.nii.gz …) found under {base}")

    masks: dict[tuple[str, str], Path] = {}
    for mask_dir in dict.fromkeys(derivative_dirs):
        for path in walk_files(mask_dir):
            m = _MASK_RE.match(path.name)
            if m:
                key = (m.group(1), m.group(2) or "")
                if key in masks and masks[key] != path:
                    raise DatasetError(f"two masks for {key[0]}: {masks[key]} and {path}")
                masks[key] = path

    sessions: dict[str, int] = defaultdict(int)
    for subject, _ in images:
        sessions[subject] += 1
    cases = []
    for (subject, session), found in sorted(images.items()):
        case_id = subject if sessions[subject] == 1 else f"{subject}_{session}"
        folder = next(iter(found.values())).parent
        paths, zero = [], []
        for i, name in enumerate(names):
            if name in found:
                paths.append(found[name])
            elif name == "flair" and missing_flair == "zeros":
                paths.append(found.get("dwi", next(iter(found.values()))))
                zero.append(i)
            else:
                raise DatasetError(f"case {case_id}: missing modality {name!r} (no *_{name}.nii.gz near {folder})")
        label = masks.get((subject, session))
        if label is None and require_label:
            raise DatasetError(f"case {case_id}: no mask *_msk.nii.gz under "
                               f"{' or '.join(str(d) for d in mask_dirs)} (images in {folder})")
        meta = {"format": "nifti", "spacing": nifti_spacing(paths[0]), "label_encoding": "values", "layout": layout,
                "synthetic": synthetic, "resample_channels": [i for i, n in enumerate(names) if n == "flair" and i not in zero],
                "zero_channels": zero}
        cases.append(Case(id=case_id, images=paths, label=label, subset=None, meta=meta))
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DatasetError(f"mask without images: {masks[orphans[0]]}")
    return unique_cases(cases, root)
