"""The geometry check of hand evaluation: a prediction must lie on its ground truth's voxel grid.

`deconver evaluate --pred-dir --gt-dir` compares arrays voxel by voxel, so a prediction stored in
another orientation, shifted, or with another spacing would be scored against the wrong voxels
without any error. `check_same_grid` compares the two NIfTI headers' shape and voxel-to-world affine
(orientation, direction, origin, spacing) within `GEOMETRY_ATOL` mm and raises `EvaluationError`
naming both files and what differs; `resample_to` puts a prediction on the ground truth's grid
instead (nearest neighbour, `--resample`). 2D image files carry no geometry and are not checked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Largest difference (mm) between two affines' entries for "the same grid"; the readers' tolerance.
from deconver.data.loading import GRID_ATOL as GEOMETRY_ATOL

NIFTI = (".nii.gz", ".nii")


def _header(path: Path):
    import nibabel as nib

    from deconver.metrics.evaluate import EvaluationError

    try:
        img = nib.load(str(path))
    except Exception as err:  # noqa: BLE001 - reported with the file
        raise EvaluationError(f"cannot read label file {path}: {type(err).__name__}: {err}") from None
    return tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)


def grid_difference(pred: Path, gt: Path) -> str | None:
    """What differs between the two files' grids (shape, orientation, spacing, origin, direction), or None."""
    import nibabel as nib

    (ps, pa), (gs, ga) = _header(pred), _header(gt)
    if ps == gs and np.allclose(pa, ga, rtol=0, atol=GEOMETRY_ATOL):
        return None
    parts = []
    if ps != gs:
        parts.append(f"shape {ps} vs {gs}")
    for name, get in (("orientation", lambda a: "".join(nib.aff2axcodes(a))),
                      ("spacing", lambda a: tuple(round(float(s), 4) for s in np.sqrt((a[:3, :3] ** 2).sum(0)))),
                      ("origin", lambda a: tuple(round(float(s), 3) for s in a[:3, 3]))):
        p, g = get(pa), get(ga)
        if p != g:
            parts.append(f"{name} {p} vs {g}")
    return ", ".join(parts or ["direction cosines differ"])


def check_same_grid(pred: Path, gt: Path) -> None:
    """Raise `EvaluationError` naming both files when a NIfTI prediction is not on its ground truth's grid."""
    from deconver.metrics.evaluate import EvaluationError

    if not (str(pred).lower().endswith(NIFTI) and str(gt).lower().endswith(NIFTI)):
        return
    why = grid_difference(pred, gt)
    if why is not None:
        raise EvaluationError(f"prediction {pred} is not on the grid of its ground truth {gt} ({why}; tolerance "
                              f"{GEOMETRY_ATOL} mm): write the prediction on the ground truth's grid, or pass "
                              "--resample to resample it (nearest neighbour) before scoring")


def resample_to(pred: Path, gt: Path) -> np.ndarray:
    """The prediction's labels on the ground truth's grid (nearest neighbour through both affines)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    gt_img = nib.load(str(gt))
    out = resample_from_to(nib.load(str(pred)), (gt_img.shape[:3], gt_img.affine), order=0, mode="constant", cval=0)
    return np.rint(np.asanyarray(out.dataobj)).astype(np.int64)


def aligned_prediction(pred: Path, gt: Path, resample: bool = False) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """(labels, spacing) of a prediction checked to lie on its ground truth's grid, or resampled onto it."""
    from deconver.metrics.evaluate import read_label_file

    if resample and str(pred).lower().endswith(NIFTI) and str(gt).lower().endswith(NIFTI) \
            and grid_difference(pred, gt) is not None:
        return resample_to(pred, gt), read_label_file(gt)[1]
    check_same_grid(pred, gt)
    return read_label_file(pred)
