"""The challenges' own metrics, so results can be set beside their leaderboards.

* ISLES'22 (de la Rosa et al., official ``eval_utils.py``): lesion-wise F1, absolute lesion-count
  difference and absolute volume difference (ml); lesions are 26-connected components.
* BraTS 2023 (Saluja et al., BraTS-2023-Metrics ``eval.py``, BraTS-GLI parameters): lesion-wise Dice and
  HD95 per region, GT dilated by 3 to group and match lesions, GT lesions ≤ 50 mm³ ignored, each
  false-positive lesion adds Dice 0 / HD95 374.
* GlaS 2015 (Sirinukunwattana et al., MedIA 35, 2017): object-level F1, object Dice and object Hausdorff.

Each function returns a flat ``{metric name: value}`` dict; the names are the ``metric`` column of
``evaluation.csv``. Definitions, edge cases and where this code departs from the official scripts are in
docs/metrics.md.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from deconver.metrics.objects import (ObjectSet, best_partner, full_hausdorff, nearest_by_hausdorff,
                                      overlap_pairs)
from deconver.metrics.surface import _check_pair, as_spacing, bounding_box

BRATS_PENALTY = 374.0


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components with full connectivity (26 in 3D, 8 in 2D): ``(labels int32, count)``."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, n = ndimage.label(mask, structure=structure)
    return labels.astype(np.int32, copy=False), int(n)


# --------------------------------------------------------------------------- ISLES'22
def isles22_metrics(pred, gt, spacing: float | Sequence[float] | None = None) -> dict[str, float]:
    """ISLES'22 lesion metrics of one case (binary masks, spacing in mm).

    A GT lesion (26-connected component) is a true positive if any of its voxels is predicted, otherwise a
    false negative; a predicted lesion with no GT voxel is a false positive. F1 = TP / (TP + (FP + FN)/2),
    1 when both masks are empty. Count difference = |#GT lesions − #predicted lesions|; volume
    difference = |V_gt − V_pred| in ml (voxel volume = product of the spacing / 1000).
    """
    p, g = _check_pair(pred, gt)
    sp = as_spacing(spacing, p.ndim)
    gt_lab, n_gt = label_components(g)
    pred_lab, n_pred = label_components(p)
    both = p & g
    tp = int(np.count_nonzero(np.unique(gt_lab[both]))) if n_gt else 0
    fn = n_gt - tp
    pred_hit = int(np.count_nonzero(np.unique(pred_lab[both]))) if n_pred else 0
    fp = n_pred - pred_hit
    f1 = 1.0 if tp + fp + fn == 0 else tp / (tp + (fp + fn) / 2.0)
    voxel_ml = float(np.prod(sp)) / 1000.0
    return {
        "isles22_lesion_f1": float(f1),
        "isles22_lesion_count_diff": float(abs(n_gt - n_pred)),
        "isles22_volume_diff_ml": abs(int(np.count_nonzero(g)) - int(np.count_nonzero(p))) * voxel_ml,
        "isles22_tp": float(tp),
        "isles22_fp": float(fp),
        "isles22_fn": float(fn),
    }


# --------------------------------------------------------------------------- BraTS 2023
def brats23_lesionwise(pred, gt, spacing: float | Sequence[float] | None = None, *, dilation: int = 3,
                       min_volume: float = 50.0, penalty: float = BRATS_PENALTY,
                       hd95: Callable[[np.ndarray, np.ndarray, Sequence[float]], float] | None = None) -> dict[str, float]:
    """BraTS 2023 lesion-wise Dice and HD95 of one region (binary masks, spacing in mm).

    GT lesions: 26-connected components of the GT dilated ``dilation`` times by the 18-connected
    structuring element, each restricted to the GT voxels (so lesions closer than the dilation are one
    lesion). A predicted component (26-connected) matches a GT lesion if it touches the lesion's dilated
    extent; each GT lesion is scored against the union of its matched components (Dice, and HD95 as in
    ``deconver.metrics.surface``; a missed lesion scores Dice 0, HD95 ``penalty``). GT lesions of volume
    ≤ ``min_volume`` mm³ are left out of the averages (their matches are not false positives); predicted
    components matching no GT lesion are false positives, each adding Dice 0 / HD95 ``penalty``:
    ``LW-Dice = Σ dice / (n_lesions + n_fp)``, ``LW-HD95 = (Σ hd95 + penalty·n_fp) / (n_lesions + n_fp)``;
    1 and 0 when that denominator is 0. ``hd95(pred_mask, lesion_mask, spacing)`` replaces the suite's HD95
    of a lesion (the ``challenge`` convention passes the surface-distance package's).
    """
    p, g = _check_pair(pred, gt)
    sp = as_spacing(spacing, p.ndim)
    voxel_volume = float(np.prod(sp))
    box = bounding_box(p, g)
    if box is not None:
        # everything happens within `dilation` + 1 voxels of the masks: work on that crop. No mask voxel
        # reaches the crop's edge unless it is the image's, so surfaces and the dilation are unchanged.
        pad = dilation + 1
        box = tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(box, g.shape))
        p, g = p[box], g[box]
    pred_lab, n_pred = label_components(p)
    dil_lab, n_dil = np.zeros(g.shape, dtype=np.int32), 0
    if g.any():
        struct = ndimage.generate_binary_structure(g.ndim, 2)
        dil_lab, n_dil = label_components(ndimage.binary_dilation(g, structure=struct, iterations=dilation))
    lesion_lab = np.where(g, dil_lab, 0)  # lesion k = GT voxels of dilated component k
    lesions, preds = ObjectSet(lesion_lab, n_dil, sp), ObjectSet(pred_lab, n_pred, sp)
    # a predicted component matches lesion k when it touches k's dilated extent
    dil_of, match_of, _ = overlap_pairs(dil_lab.ravel(), pred_lab.ravel(), n_pred)
    matches_of: dict[int, list[int]] = {}
    for k, m in zip(dil_of.tolist(), match_of.tolist()):
        matches_of.setdefault(k, []).append(m)
    les_of, les_pred, inter = overlap_pairs(lesions.flat, preds.flat, n_pred)
    inter_of = dict(zip(zip(les_of.tolist(), les_pred.tolist()), inter.tolist()))
    matched_pred = set(match_of.tolist())

    dices: list[float] = []
    hds: list[float] = []
    n_tp = n_fn = 0
    for k in range(1, n_dil + 1):
        volume = int(lesions.area[k - 1]) * voxel_volume
        matches = matches_of.get(k, [])
        if volume <= min_volume:
            continue
        if not matches:
            n_fn += 1
            dices.append(0.0)
            hds.append(float(penalty))
            continue
        n_tp += 1
        # each lesion against the union of its matches (distinct 26-connected components, never touching)
        pred_voxels = sum(int(preds.area[m - 1]) for m in matches)
        overlap = sum(inter_of.get((k, m), 0) for m in matches)
        dices.append(2.0 * overlap / (pred_voxels + int(lesions.area[k - 1])))
        if hd95 is None:
            hd = max(preds.union_percentiles(matches, lesions, k))
        else:  # on the box of the lesion and its matches (whole masks inside: the same distances)
            lo = np.min([lesions.boxes[0][k - 1], *(preds.boxes[0][m - 1] for m in matches)], axis=0)
            hi = np.max([lesions.boxes[1][k - 1], *(preds.boxes[1][m - 1] for m in matches)], axis=0)
            box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
            hd = hd95(np.isin(pred_lab[box], matches), lesion_lab[box] == k, sp)
        hds.append(hd if math.isfinite(hd) else float(penalty))
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


# --------------------------------------------------------------------------- GlaS
def _relabel(instances: np.ndarray) -> tuple[np.ndarray, int]:
    """Instance map → consecutive labels 1..n in the order of the ids (0 stays background)."""
    flat = instances.ravel()
    if flat.size and flat.dtype.kind in "iu" and flat.min() >= 0 and flat.max() <= 4 * flat.size + 65536:
        present = np.bincount(flat) > 0  # a lookup table instead of sorting the pixels
        rank = np.cumsum(present, dtype=np.int64) - (1 if present[0] else 0)
        return rank[flat].reshape(instances.shape).astype(np.int32), int(present.sum() - present[0])
    values, inverse = np.unique(instances, return_inverse=True)
    inverse = inverse.reshape(instances.shape)
    if values[0] == 0:
        return inverse.astype(np.int32), len(values) - 1
    return (inverse + 1).astype(np.int32), len(values)


def glas_object_metrics(pred_instances, gt_instances) -> dict[str, float]:
    """GlaS object-level F1, object Dice and object Hausdorff (pixels) of one image.

    Inputs are instance maps (0 background, one integer per object); a binary prediction is split into
    objects by 8-connected components before calling this (``label_components``). Matching follows the
    challenge: an object's partner is the object of the other map it overlaps most (ties: lowest label).
    F1: a predicted object is a true positive if it covers more than 50% of its partner GT object;
    FP = other predicted objects, FN = GT objects − TP; F1 = 2TP / (2TP + FP + FN).
    Object Dice = ½ [Σ_i ω_i Dice(S_i, G*(S_i)) + Σ_j ω̃_j Dice(G_j, S*(G_j))], weights = object area /
    total area of its map, Dice 0 for an object without partner. Object Hausdorff: the same weighted sum
    of Hausdorff distances (over all pixels of both objects), where an object without an overlapping
    partner is paired with the object of the other map at the smallest Hausdorff distance (ties: lowest
    label). Empty maps: F1 and Dice 1 (both) or 0 (one); Hausdorff 0 (both) or +inf (one, raw — the
    aggregation rule replaces it).

    Cost: linear in the pixels (one sort per map) plus k-d tree queries over the objects' pixels for the
    pairs compared; the nearest object of an unmatched one is searched among the objects whose
    bounding-box lower bound (``deconver.metrics.objects.nearest_by_hausdorff``) can beat the best so far.
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
    s_obj, g_obj = ObjectSet(s_lab, n_s), ObjectSet(g_lab, n_g)
    area_s, area_g = s_obj.area, g_obj.area  # object k at index k - 1
    s_of, g_of, counts = overlap_pairs(s_obj.flat, g_obj.flat, n_g)
    ov = dict(zip(zip(s_of.tolist(), g_of.tolist()), counts.tolist()))  # (i, j) -> overlapping pixels
    partner_of_s = best_partner(s_of, g_of, counts, n_s)  # lowest label on ties, 0 without overlap
    partner_of_g = best_partner(g_of, s_of, counts, n_g)

    # F1 (detection)
    tp = sum(1 for i, j in enumerate(partner_of_s.tolist(), start=1)
             if j and ov[(i, j)] / area_g[j - 1] > 0.5)
    fp, fn = n_s - tp, n_g - tp
    f1 = 2.0 * tp / (2.0 * tp + fp + fn)

    # object Dice
    total_s, total_g = area_s.sum(), area_g.sum()
    dice_s = sum(area_s[i - 1] / total_s * (2.0 * ov[(i, j)] / (area_s[i - 1] + area_g[j - 1]) if j else 0.0)
                 for i, j in enumerate(partner_of_s.tolist(), start=1))
    dice_g = sum(area_g[j - 1] / total_g * (2.0 * ov[(i, j)] / (area_s[i - 1] + area_g[j - 1]) if i else 0.0)
                 for j, i in enumerate(partner_of_g.tolist(), start=1))
    obj_dice = 0.5 * (dice_s + dice_g)

    # object Hausdorff
    cache: dict[tuple[int, int], float] = {}

    def haus(i: int, j: int) -> float:
        if (i, j) not in cache:
            cache[(i, j)] = full_hausdorff(s_obj, i, g_obj, j)
        return cache[(i, j)]

    h_s = 0.0
    for i, j in enumerate(partner_of_s.tolist(), start=1):
        j = j or nearest_by_hausdorff(s_obj, i, g_obj, lambda jj: haus(i, jj))
        h_s += area_s[i - 1] / total_s * haus(i, j)
    h_g = 0.0
    for j, i in enumerate(partner_of_g.tolist(), start=1):
        i = i or nearest_by_hausdorff(g_obj, j, s_obj, lambda ii: haus(ii, j))
        h_g += area_g[j - 1] / total_g * haus(i, j)
    obj_haus = 0.5 * (h_s + h_g)
    return dict(zip(names, (float(f1), float(obj_dice), float(obj_haus), float(tp), float(fp), float(fn))))
