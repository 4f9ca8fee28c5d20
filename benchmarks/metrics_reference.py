"""Reference for benchmarks/metrics.py and its test: the lesion-wise and object metrics as first written.

This is ``deconver.metrics.challenge`` (BraTS 2023 lesion-wise, GlaS object metrics) as it stood before
issue 24, kept verbatim so the benchmark can time the package against it and the tests can check the
package gives the same numbers. Its cost grows with objects × image area (a full Hausdorff distance
per candidate pair over the pair's bounding box); it is not part of the package and nothing in
deconver/ imports it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from deconver.metrics.challenge import BRATS_PENALTY, label_components
from deconver.metrics.surface import _check_pair, as_spacing, bounding_box, compare_masks


def _union_slices(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def brats23_lesionwise(pred, gt, spacing: float | Sequence[float] | None = None, *, dilation: int = 3,
                       min_volume: float = 50.0, penalty: float = BRATS_PENALTY) -> dict[str, float]:
    """BraTS 2023 lesion-wise Dice and HD95 of one region (binary masks, spacing in mm).

    GT lesions: 26-connected components of the GT dilated ``dilation`` times by the 18-connected
    structuring element, each restricted to the GT voxels (so lesions closer than the dilation are one
    lesion). A predicted component (26-connected) matches a GT lesion if it touches the lesion's dilated
    extent; each GT lesion is scored against the union of its matched components (Dice, and HD95 as in
    ``deconver.metrics.surface``; a missed lesion scores Dice 0, HD95 ``penalty``). GT lesions of volume
    ≤ ``min_volume`` mm³ are left out of the averages (their matches are not false positives); predicted
    components matching no GT lesion are false positives, each adding Dice 0 / HD95 ``penalty``:
    ``LW-Dice = Σ dice / (n_lesions + n_fp)``, ``LW-HD95 = (Σ hd95 + penalty·n_fp) / (n_lesions + n_fp)``;
    1 and 0 when that denominator is 0.
    """
    p, g = _check_pair(pred, gt)
    sp = as_spacing(spacing, p.ndim)
    voxel_volume = float(np.prod(sp))
    pred_lab, n_pred = label_components(p)
    dil_lab = np.zeros(g.shape, dtype=np.int32)
    n_dil = 0
    box = bounding_box(g)
    if box is not None:
        # the dilation reaches `dilation` voxels beyond the GT: dilate on a padded crop
        pad = dilation + 1
        big = tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(box, g.shape))
        struct = ndimage.generate_binary_structure(g.ndim, 2)
        dilated = ndimage.binary_dilation(g[big], structure=struct, iterations=dilation)
        sub_lab, n_dil = label_components(dilated)
        dil_lab[big] = sub_lab
    dil_boxes = ndimage.find_objects(dil_lab) if n_dil else []
    pred_boxes = ndimage.find_objects(pred_lab) if n_pred else []

    matched_pred: set[int] = set()
    dices: list[float] = []
    hds: list[float] = []
    n_tp = n_fn = 0
    for k, dbox in enumerate(dil_boxes, start=1):
        extent = dil_lab[dbox] == k
        lesion_here = extent & g[dbox]
        volume = int(np.count_nonzero(lesion_here)) * voxel_volume
        matches = np.unique(pred_lab[dbox][extent])
        matches = [int(m) for m in matches if m != 0]
        matched_pred.update(matches)
        if volume <= min_volume:
            continue
        if not matches:
            n_fn += 1
            dices.append(0.0)
            hds.append(float(penalty))
            continue
        n_tp += 1
        region = dbox
        for m in matches:
            region = _union_slices(region, pred_boxes[m - 1])
        lesion = (dil_lab[region] == k) & g[region]
        pred_lesion = np.isin(pred_lab[region], matches)
        r = compare_masks(pred_lesion, lesion, sp)
        dices.append(r.dice)
        hds.append(r.hd95 if math.isfinite(r.hd95) else float(penalty))
    n_fp = n_pred - len(matched_pred)
    denom = len(dices) + n_fp
    if denom == 0:
        lw_dice, lw_hd = 1.0, 0.0
    else:
        lw_dice = float(sum(dices)) / denom
        lw_hd = (float(sum(hds)) + penalty * n_fp) / denom
    return {
        "brats23_lw_dice": lw_dice,
        "brats23_lw_hd95": lw_hd,
        "brats23_lw_tp": float(n_tp),
        "brats23_lw_fp": float(n_fp),
        "brats23_lw_fn": float(n_fn),
    }


def _relabel(instances: np.ndarray) -> tuple[np.ndarray, int]:
    """Instance map → consecutive labels 1..n (0 stays background)."""
    values, inverse = np.unique(instances, return_inverse=True)
    inverse = inverse.reshape(instances.shape)
    if values[0] == 0:
        return inverse.astype(np.int32), len(values) - 1
    return (inverse + 1).astype(np.int32), len(values)


def _full_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Hausdorff distance (max, in pixels) between two non-empty pixel sets — all pixels, not only edges."""
    box = bounding_box(a, b)
    a, b = a[box], b[box]
    d_ab = ndimage.distance_transform_edt(~b)[a].max()
    d_ba = ndimage.distance_transform_edt(~a)[b].max()
    return float(max(d_ab, d_ba))


def glas_object_metrics(pred_instances, gt_instances) -> dict[str, float]:
    """GlaS object-level F1, object Dice and object Hausdorff (pixels) of one image.

    Inputs are instance maps (0 background, one integer per object); a binary prediction is split into
    objects by 8-connected components before calling this (``label_components``). Matching follows the
    challenge: an object's partner is the object of the other map it overlaps most (ties: lowest label).
    F1: a predicted object is a true positive if it covers more than 50% of its partner GT object;
    FP = other predicted objects, FN = GT objects − TP; F1 = 2TP / (2TP + FP + FN).
    Object Dice = ½ [Σ_i ω_i Dice(S_i, G*(S_i)) + Σ_j ω̃_j Dice(G_j, S*(G_j))], weights = object area /
    total area of its map, Dice 0 for an object without partner. Object Hausdorff: the same weighted sum
    of Hausdorff distances, where an object without an overlapping partner is paired with the object of
    the other map at the smallest Hausdorff distance. Empty maps: F1 and Dice 1 (both) or 0 (one);
    Hausdorff 0 (both) or +inf (one, raw — the aggregation rule replaces it).
    """
    s_map, g_map = np.asarray(pred_instances), np.asarray(gt_instances)
    if s_map.shape != g_map.shape:
        raise ValueError(f"pred and gt instance maps differ in shape: {s_map.shape} vs {g_map.shape}")
    s_lab, n_s = _relabel(s_map)
    g_lab, n_g = _relabel(g_map)
    names = ("glas_object_f1", "glas_object_dice", "glas_object_hausdorff", "glas_tp", "glas_fp", "glas_fn")
    if n_s == 0 or n_g == 0:
        both = n_s == 0 and n_g == 0
        return dict(zip(names, (1.0 if both else 0.0, 1.0 if both else 0.0, 0.0 if both else float("inf"),
                                0.0, float(n_s), float(n_g))))
    area_s = np.bincount(s_lab.ravel(), minlength=n_s + 1).astype(np.int64)
    area_g = np.bincount(g_lab.ravel(), minlength=n_g + 1).astype(np.int64)
    overlap = np.bincount((s_lab.astype(np.int64) * (n_g + 1) + g_lab).ravel(),
                          minlength=(n_s + 1) * (n_g + 1)).reshape(n_s + 1, n_g + 1)
    ov = overlap[1:, 1:]  # (n_s, n_g) object-object overlaps in pixels
    partner_of_s = np.where(ov.max(axis=1) > 0, ov.argmax(axis=1) + 1, 0)  # argmax: lowest label on ties
    partner_of_g = np.where(ov.max(axis=0) > 0, ov.argmax(axis=0) + 1, 0)

    # F1 (detection)
    tp = 0
    for i in range(1, n_s + 1):
        j = partner_of_s[i - 1]
        if j and ov[i - 1, j - 1] / area_g[j] > 0.5:
            tp += 1
    fp, fn = n_s - tp, n_g - tp
    f1 = 2.0 * tp / (2.0 * tp + fp + fn)

    # object Dice
    total_s, total_g = area_s[1:].sum(), area_g[1:].sum()
    dice_s = sum(area_s[i] / total_s * (2.0 * ov[i - 1, j - 1] / (area_s[i] + area_g[j]) if j else 0.0)
                 for i, j in zip(range(1, n_s + 1), partner_of_s))
    dice_g = sum(area_g[j] / total_g * (2.0 * ov[i - 1, j - 1] / (area_s[i] + area_g[j]) if i else 0.0)
                 for j, i in zip(range(1, n_g + 1), partner_of_g))
    obj_dice = 0.5 * (dice_s + dice_g)

    # object Hausdorff
    cache: dict[tuple[int, int], float] = {}
    s_boxes, g_boxes = ndimage.find_objects(s_lab), ndimage.find_objects(g_lab)

    def haus(i: int, j: int) -> float:
        if (i, j) not in cache:
            region = _union_slices(s_boxes[i - 1], g_boxes[j - 1])
            cache[(i, j)] = _full_hausdorff(s_lab[region] == i, g_lab[region] == j)
        return cache[(i, j)]

    h_s = 0.0
    for i in range(1, n_s + 1):
        j = partner_of_s[i - 1] or min(range(1, n_g + 1), key=lambda jj: (haus(i, jj), jj))
        h_s += area_s[i] / total_s * haus(i, j)
    h_g = 0.0
    for j in range(1, n_g + 1):
        i = partner_of_g[j - 1] or min(range(1, n_s + 1), key=lambda ii: (haus(ii, j), ii))
        h_g += area_g[j] / total_g * haus(i, j)
    obj_haus = 0.5 * (h_s + h_g)
    return dict(zip(names, (float(f1), float(obj_dice), float(obj_haus), float(tp), float(fp), float(fn))))
