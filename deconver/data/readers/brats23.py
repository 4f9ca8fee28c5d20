"""BraTS 2023 (BraTS-GLI) reader.

Layout: ``<root>/…/BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-{t1c,t1n,t2f,t2w,seg}.nii.gz``. Case folders
are found recursively, so a top folder nested twice by the unpacking is fine. Labels 1 NCR, 2 ED, 3 ET;
the preset's regions are ET = {3}, TC = {1, 3}, WT = {1, 2, 3}.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from deconver.data.readers._common import (check_root, is_synthetic, match_channel_names, nifti_spacing, unique_cases,
                                            walk_files)
from deconver.data.records import Case, DatasetError

MODALITIES = ("t1n", "t1c", "t2w", "t2f")
_FILE_RE = re.compile(r"^(.+)-(t1n|t1c|t2w|t2f|seg)\.nii(?:\.gz)?$", re.IGNORECASE)


def read_brats23(root: Path, channels: list[str], *, require_label: bool = True) -> list[Case]:
    """Case records of a BraTS'23 root; `channels` picks and orders {t1n, t1c, t2w, t2f}."""
    root = check_root(root)
    names = match_channel_names(channels, MODALITIES, "brats23")
    synthetic = is_synthetic(root)
    found: dict[tuple[Path, str], dict[str, Path]] = defaultdict(dict)
    for path in walk_files(root):
        m = _FILE_RE.match(path.name)
        if m:
            kind = m.group(2).lower()
            key = (path.parent, m.group(1))
            if kind in found[key]:
                raise DatasetError(f"two {kind} files in {path.parent}: {found[key][kind]} and {path}")
            found[key][kind] = path
    if not found:
        raise DatasetError(f"no BraTS files (*-t1n.nii.gz, *-seg.nii.gz …) found under {root}")
    cases = []
    for (folder, case_id), files in sorted(found.items()):
        missing = [n for n in names if n not in files]
        if missing:
            raise DatasetError(f"case {case_id}: missing modality {missing} in {folder} "
                               f"(expected {case_id}-{missing[0]}.nii.gz)")
        label = files.get("seg")
        if label is None and require_label:
            raise DatasetError(f"case {case_id}: missing label {folder / (case_id + '-seg.nii.gz')}")
        meta = {"format": "nifti", "spacing": nifti_spacing(files[names[0]]), "label_encoding": "values",
                "synthetic": synthetic, "resample_channels": [], "zero_channels": []}
        cases.append(Case(id=case_id, images=[files[n] for n in names], label=label, meta=meta))
    return unique_cases(cases, root)
