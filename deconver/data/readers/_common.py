"""Helpers shared by the readers: root checks, the synthetic marker, duplicate ids, file matching."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from deconver.data.records import Case, DatasetError

SYNTHETIC_MARKER = "SYNTHETIC.txt"
NIFTI_RE = r"\.nii(?:\.gz)?$"
# Files that unpacked archives carry and no reader should look at.
STRAY_NAMES = {"thumbs.db", ".ds_store", "desktop.ini"}


def check_root(root: Path) -> Path:
    """The root as an existing, non-empty folder, or a DatasetError naming it."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder")
    if not any(p for p in root.iterdir() if not is_stray(p)):
        raise DatasetError(f"dataset root {root} is empty")
    return root


def is_stray(path: Path) -> bool:
    """Hidden files, macOS resource forks and Windows thumbnails."""
    name = path.name
    return name.lower() in STRAY_NAMES or name.startswith(".") or name.startswith("._")


def is_synthetic(root: Path) -> bool:
    """A dataset written by `deconver synth` carries a SYNTHETIC.txt at its root (or one level up)."""
    return (root / SYNTHETIC_MARKER).is_file() or (root.parent / SYNTHETIC_MARKER).is_file()


def walk_files(root: Path) -> Iterator[Path]:
    """Every non-stray file under `root`, recursively, in a deterministic order (links followed)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not is_stray(path):
                yield path


def unique_cases(cases: Iterable[Case], root: Path) -> list[Case]:
    """The cases sorted by id; a repeated id is a DatasetError naming both places."""
    seen: dict[str, Case] = {}
    for case in cases:
        if case.id in seen:
            first = seen[case.id].label or seen[case.id].images[0]
            second = case.label or case.images[0]
            raise DatasetError(f"duplicate case id {case.id!r} in {root}: {first} and {second}")
        seen[case.id] = case
    if not seen:
        raise DatasetError(f"no cases found under {root}")
    return [seen[k] for k in sorted(seen)]


def match_channel_names(channels: list[str], available: Iterable[str], reader: str) -> list[str]:
    """Lower-cased channel names, each one the reader knows; an unknown name is a DatasetError."""
    known = list(available)
    out = [c.lower() for c in channels]
    bad = [c for c in out if c not in known]
    if bad:
        raise DatasetError(f"reader {reader!r}: unknown channel(s) {bad} in the preset's channels; "
                           f"this reader provides {known}")
    return out


def dataset_json_dir(root: Path, pattern: str, what: str) -> Path:
    """The folder of `root` that holds ``dataset.json``: the root itself or its one child matching `pattern`
    (``Task*`` for an MSD task, ``Dataset*`` for nnU-Net); `what` names such a folder in the errors."""
    if (root / "dataset.json").is_file():
        return root
    found = [p for p in sorted(root.glob(pattern)) if (p / "dataset.json").is_file()]
    if len(found) == 1:
        return found[0]
    if found:
        raise DatasetError(f"{root} holds several {what}s {[p.name for p in found]}: point the root at one")
    raise DatasetError(f"no dataset.json in {root}: not an {what} folder")


def rgb_root(root: Path, channels: list[str], reader: str) -> tuple[Path, bool]:
    """(root, synthetic) of a dataset of RGB images (GlaS, FIVES): the root checked, and the preset's
    channels checked to be the three the image gives (red, green, blue)."""
    root = check_root(root)
    match_channel_names(channels, ("red", "green", "blue"), reader)
    if len(channels) != 3:
        raise DatasetError(f"reader {reader!r} gives three channels (red, green, blue), the preset names {channels}")
    return root, is_synthetic(root)


def nifti_spacing(path: Path) -> list[float]:
    """Voxel size (mm) from a NIfTI header (cheap: the data is not read); DatasetError if unreadable."""
    import nibabel as nib

    try:
        zooms = nib.load(str(path)).header.get_zooms()
    except Exception as err:  # nibabel raises several types for a broken header
        raise DatasetError(f"{path}: cannot read NIfTI header ({type(err).__name__}: {err})") from None
    return [float(z) for z in zooms[:3]]


def strip_nifti(name: str) -> str:
    return re.sub(NIFTI_RE, "", name)
