"""Readers of the official dataset layouts: ``read_dataset(preset, root) -> list[Case]``."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from deconver.data.readers.brats23 import read_brats23
from deconver.data.readers.fives import read_fives
from deconver.data.readers.glas import read_glas, read_grade_csv
from deconver.data.readers.isles22 import read_isles22
from deconver.data.readers.msd import read_msd
from deconver.data.readers.nnunet import read_nnunet
from deconver.data.records import Case, DatasetError

READERS: dict[str, Callable[..., list[Case]]] = {
    "isles22": read_isles22,
    "brats23": read_brats23,
    "glas": read_glas,
    "fives": read_fives,
    "msd": read_msd,
    "nnunet": read_nnunet,
}


def read_dataset(preset, root: str | Path, *, require_labels: bool = True) -> list[Case]:
    """The cases of `root` read with the preset's reader and reader options, sorted by id.

    require_labels=False accepts cases without a label file (e.g. to predict an unlabelled folder).
    """
    if preset.reader not in READERS:
        raise DatasetError(f"unknown reader {preset.reader!r}; available: {sorted(READERS)}")
    reader = READERS[preset.reader]
    options = dict(preset.reader_options)
    params = inspect.signature(reader).parameters
    if "label_values" in params and "label_values" not in options:
        options["label_values"] = sorted({v for vals in preset.labels.values() for v in vals})
    if not require_labels:
        options["require_label"] = False
    unknown = sorted(set(options) - set(params) - {"root", "channels"})
    if unknown:
        known = sorted(set(params) - {"root", "channels", "label_values"})
        raise DatasetError(f"preset {preset.name!r}: unknown reader_options {unknown} for reader "
                           f"{preset.reader!r}; it accepts {known}")
    return reader(Path(root), list(preset.channels), **options)


__all__ = ["READERS", "read_dataset", "read_grade_csv", "read_isles22", "read_brats23", "read_glas",
           "read_fives", "read_msd", "read_nnunet"]
