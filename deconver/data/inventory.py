"""The inventory of a dataset root: every file's relative path, size and mtime, cheap to take.

The workflow takes it before any job and rewrites `StudyPaths.inventory(dataset)` only when it changed
(`write_inventory`). It is an input of the `prepare` rule, so a dataset that gained, lost or changed
files is newer than its prepared cache: Snakemake prepares it again and reruns what depends on it
(`snakemake -n` names the inventory as the reason). Only stat calls, no file is read: about a second
for the BraTS 2023 training set's 6,000 files on a local disk.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from deconver.io import write_text_atomic


def take_inventory(root: str | Path) -> list[list]:
    """[relative path, size, mtime_ns] of every file under `root` (hidden files and folders skipped), sorted."""
    root = Path(root)
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            try:
                st = path.stat()
            except OSError:  # a dangling link or a file removed while walking: not part of the dataset
                continue
            out.append([path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return sorted(out)


def write_inventory(root: str | Path, path: str | Path) -> bool:
    """Write the inventory of `root` to `path` when it differs from the one there; True when written."""
    path = Path(path)
    files = take_inventory(root)
    text = json.dumps({"root": str(Path(root).resolve()), "files": files}, indent=0) + "\n"
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    write_text_atomic(path, text)
    return True
