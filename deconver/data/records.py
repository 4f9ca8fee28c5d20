"""The case record every reader returns, and the one error type of the data layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deconver.steps import StepError


class DatasetError(StepError, ValueError):
    """A dataset on disk is missing, malformed or inconsistent; the message names the file or folder (exit 1)."""


# How a reader's label files map onto the preset's label values (recorded in ``Case.meta["label_encoding"]``):
#   "values"     the file holds label values directly (ISLES, BraTS, MSD); values outside the preset's set are an error
#   "instances"  an instance map (GlaS): 0 background, one integer per object; the target is map > 0
#   "threshold"  an 8-bit mask, possibly RGB (FIVES): channel 0 > 127 is foreground
LABEL_ENCODINGS = ("values", "instances", "threshold")


@dataclass(frozen=True)
class Case:
    """One case of a dataset as it lies on disk.

    `images` holds one path per channel in the preset's channel order; a 2D RGB image is one file giving
    three channels, and a 4D NIfTI of a multi-modal MSD task is one file giving all of them
    (``meta["channels_per_file"]`` says how many). `subset` is the official split membership
    ("train", "test", "testA", "testB") where the dataset has one. `meta` carries what prepare needs
    (``format``: "nifti" | "image2d", ``label_encoding``, ``resample_channels``: channels that may lie on
    another grid and are resampled into the first channel's, ``spacing`` of the first channel from its
    header (pixels in 2D), ``synthetic``) and informative extras
    (GlaS grade, FIVES category). The stratification value (foreground voxels) needs the label's data,
    so `deconver prepare` computes it (``PreparedDataset.strata``).
    """

    id: str
    images: list[Path]
    label: Path | None
    subset: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
