"""Named metric conventions: the same predictions scored the suite's way, the authors' way and the challenges'.

Every row of ``evaluation.csv`` names its convention in the ``convention`` column (docs/metrics.md,
"Conventions"); metric names stay the same across conventions (``dice``, ``hd95`` …), so a table or a
ranking picks a convention by that column alone.

* ``suite`` — native grid, true spacing (mm in 3D, px in 2D), HD95 = max of the two directed 95th
  percentiles over voxel-centre surfaces, the preset's explicit empty-mask rule; the challenge metrics as
  the suite computes them.
* ``authors`` — what the authors' MONAI evaluator reports: Dice and HD95 on the *prepared* grid (the
  thresholded channels against the prepared label), HD95 without spacing (voxels of the resampled grid),
  Dice 1 when both masks are empty, cases with an empty side dropped from HD95 (MONAI's NaN, skipped by
  its mean): the ``exclude`` rule.
* ``challenge`` — the challenge's official definitions: BraTS 2023 whole-region and lesion-wise Dice and
  HD95 with the surface-distance package's robust Hausdorff (surfels on the voxel-corner grid,
  area-weighted, percentile without interpolation; penalty 374, both empty Dice 1 / HD95 0); ISLES'22 as
  the suite; GlaS object F1 undefined (NaN) when no object matches, with the count of such cases.
"""
from __future__ import annotations

from typing import Any

CONVENTIONS: dict[str, str] = {
    "suite": "native grid, true spacing (mm in 3D, px in 2D); HD95 = max of the directed 95th percentiles over "
             "voxel-centre surfaces; the preset's empty-mask rule",
    "authors": "the authors' MONAI evaluator: Dice and HD95 on the prepared grid, HD95 in voxels of that grid, "
               "both empty Dice 1, a case with an empty side dropped from HD95 (rule exclude)",
    "challenge": "the challenge's official code: BraTS 2023 whole-region and lesion-wise HD95 with the "
                 "surface-distance robust Hausdorff (penalty 374); ISLES'22 as the suite; GlaS object F1 NaN "
                 "when no object matches",
}


def conventions_for(preset) -> dict[str, str]:
    """The conventions `deconver evaluate` writes for a preset (challenge only where it names a challenge)."""
    names = ["suite", "authors"] + (["challenge"] if preset.metrics.challenge else [])
    return {n: CONVENTIONS[n] for n in names}


def convention_rule(convention: str, rule: str, penalty: Any, challenge: str | None = None) -> tuple[str, Any]:
    """(empty-mask rule, penalty) applied when aggregating a convention's rows: the preset's for ``suite``,
    ``exclude`` for ``authors`` (MONAI's NaN-skipping mean), BraTS' 374 penalty for the BraTS challenge."""
    if convention == "authors":
        return "exclude", penalty
    if convention == "challenge":
        return "penalize", 374.0 if challenge == "brats23" else penalty
    return rule, penalty
