"""Challenge metrics on constructed cases (split, merged, missed and spurious lesions/glands), answers by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from deconver.metrics.challenge import (
    brats23_lesionwise,
    glas_object_metrics,
    isles22_metrics,
    label_components,
)


def box(m, lo, hi, value=True):
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return m


# --------------------------------------------------------------------------- ISLES'22
def isles_case():
    """GT lesions A, B, C, D, E (cubes); prediction: A partly hit, B split in two pieces, C missed,
    D and E merged by one bridge-shaped blob, one spurious blob S."""
    shape = (60, 40, 20)
    gt, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    box(gt, (2, 2, 2), (8, 8, 8))          # A: 216 voxels
    box(gt, (2, 20, 2), (8, 26, 8))        # B: 216
    box(gt, (20, 2, 2), (24, 6, 6))        # C: 64 (missed)
    box(gt, (40, 2, 2), (44, 6, 6))        # D: 64
    box(gt, (40, 10, 2), (44, 14, 6))      # E: 64
    box(pred, (4, 4, 4), (8, 8, 8))        # A': 64, inside A
    box(pred, (2, 20, 2), (8, 22, 8))      # B1: 72
    box(pred, (2, 24, 2), (8, 26, 8))      # B2: 72 (gap of two columns to B1)
    box(pred, (40, 2, 2), (44, 14, 6))     # DE: 4·12·4 = 192, covers D, E and the gap between them
    box(pred, (30, 30, 10), (33, 33, 13))  # S: 27, no GT
    return gt, pred


def test_isles22_split_merged_missed_spurious():
    gt, pred = isles_case()
    spacing = (2.0, 2.0, 2.0)
    m = isles22_metrics(pred, gt, spacing)
    # GT lesions 5; TP = A, B, D, E (4); FN = C; predicted lesions A', B1, B2, DE, S = 5; FP = S
    assert (m["isles22_tp"], m["isles22_fp"], m["isles22_fn"]) == (4, 1, 1)
    assert m["isles22_lesion_f1"] == pytest.approx(4 / (4 + (1 + 1) / 2))  # 0.8
    assert m["isles22_lesion_count_diff"] == 0
    # volumes: GT 216+216+64+64+64 = 624, pred 64+72+72+192+27 = 427 voxels of 8 mm³
    assert m["isles22_volume_diff_ml"] == pytest.approx((624 - 427) * 8 / 1000)


def test_isles22_lesions_are_26_connected():
    gt, pred = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    gt[2, 2, 2] = gt[3, 3, 3] = True      # touch at a corner: one lesion with 26-connectivity
    pred[2, 2, 2] = True
    pred[5, 5, 5] = True                  # separate
    m = isles22_metrics(pred, gt)
    assert label_components(gt)[1] == 1
    assert m["isles22_lesion_count_diff"] == 1
    assert (m["isles22_tp"], m["isles22_fp"], m["isles22_fn"]) == (1, 1, 0)
    assert m["isles22_lesion_f1"] == pytest.approx(1 / 1.5)
    assert m["isles22_volume_diff_ml"] == pytest.approx(0.0)  # 2 voxels each, 1 mm³


def test_isles22_empty_masks():
    z = np.zeros((8, 8, 8), bool)
    one = box(np.zeros((8, 8, 8), bool), (2, 2, 2), (4, 4, 4))
    assert isles22_metrics(z, z)["isles22_lesion_f1"] == 1.0
    assert isles22_metrics(one, z)["isles22_lesion_f1"] == 0.0   # one FP
    missed = isles22_metrics(z, one, (1.0, 1.0, 5.0))
    assert missed["isles22_lesion_f1"] == 0.0 and missed["isles22_fn"] == 1
    assert missed["isles22_volume_diff_ml"] == pytest.approx(8 * 5 / 1000)


# --------------------------------------------------------------------------- BraTS 2023
def brats_case():
    """L1 125 voxels predicted shifted by one voxel; L2 27 voxels (≤ 50, ignored) with a predicted blob on
    it; L3 64 voxels missed; L4a + L4b (64 each) four voxels apart — one lesion after dilation by 3 —
    predicted exactly; a spurious blob far from everything."""
    shape = (80, 60, 40)
    gt, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    box(gt, (5, 5, 5), (10, 10, 10))        # L1
    box(pred, (6, 5, 5), (11, 10, 10))      # L1 shifted by 1 along axis 0
    box(gt, (30, 5, 5), (33, 8, 8))         # L2 (27)
    box(pred, (30, 5, 5), (32, 7, 7))       # on L2: not a false positive
    box(gt, (5, 40, 5), (9, 44, 9))         # L3 (64), missed
    box(gt, (50, 30, 20), (54, 34, 24))     # L4a
    box(gt, (50, 38, 20), (54, 42, 24))     # L4b: gap of 4 voxels (34..37)
    box(pred, (50, 30, 20), (54, 34, 24))
    box(pred, (50, 38, 20), (54, 42, 24))
    box(pred, (70, 50, 30), (73, 53, 33))   # spurious
    return gt, pred


def test_brats23_lesionwise_by_hand():
    gt, pred = brats_case()
    m = brats23_lesionwise(pred, gt, (1.0, 1.0, 1.0))
    # L1: Dice 2·100/250 = 0.8; HD95 of a 5-cube shifted by 1 (98 surface voxels): the trailing face
    # (25) and the 9 inner voxels of the leading face (inside the other cube, next to its face) are 1
    # away, the 64 side-face voxels 0 → sorted 64 zeros, 34 ones; p95 at rank 92.15 → 1. L3: Dice 0, HD95 374.
    # L4 (a+b, one lesion): Dice 1, HD95 0. L2 ignored. One FP: Dice 0, HD95 374. 3 lesions + 1 FP.
    assert (m["brats23_lw_tp"], m["brats23_lw_fn"], m["brats23_lw_fp"]) == (2, 1, 1)
    assert m["brats23_lw_dice"] == pytest.approx((0.8 + 0 + 1) / 4)
    assert m["brats23_lw_hd95"] == pytest.approx((1 + 374 + 0 + 374) / 4)


def test_brats23_dilation_merges_near_lesions_only():
    gt, pred = np.zeros((40, 40, 20), bool), np.zeros((40, 40, 20), bool)
    box(gt, (5, 5, 5), (9, 9, 9))
    box(gt, (5, 16, 5), (9, 20, 9))   # gap of 7 voxels: dilations (3 + 3) leave one voxel between
    box(pred, (5, 5, 5), (9, 9, 9))   # only the first predicted
    m = brats23_lesionwise(pred, gt)
    # two lesions of 64 voxels: one perfect, one missed
    assert (m["brats23_lw_tp"], m["brats23_lw_fn"], m["brats23_lw_fp"]) == (1, 1, 0)
    assert m["brats23_lw_dice"] == pytest.approx(0.5)
    assert m["brats23_lw_hd95"] == pytest.approx(374 / 2)
    near = box(np.zeros_like(gt), (5, 5, 5), (9, 9, 9))
    box(near, (5, 15, 5), (9, 19, 9))  # gap of 6 voxels: one lesion of 128 voxels, half predicted
    merged = brats23_lesionwise(pred, near)
    assert (merged["brats23_lw_tp"], merged["brats23_lw_fn"], merged["brats23_lw_fp"]) == (1, 0, 0)
    assert merged["brats23_lw_dice"] == pytest.approx(2 * 64 / (64 + 128))


def test_brats23_volume_threshold_is_in_mm3():
    gt, pred = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
    box(gt, (5, 5, 5), (8, 8, 8))  # 27 voxels
    at_1mm = brats23_lesionwise(pred, gt, (1.0, 1.0, 1.0))
    assert (at_1mm["brats23_lw_dice"], at_1mm["brats23_lw_hd95"], at_1mm["brats23_lw_fn"]) == (1.0, 0.0, 0)
    at_2mm = brats23_lesionwise(pred, gt, (2.0, 1.0, 1.0))  # 54 mm³ > 50: counts, and is missed
    assert (at_2mm["brats23_lw_dice"], at_2mm["brats23_lw_hd95"], at_2mm["brats23_lw_fn"]) == (0.0, 374.0, 1)


def test_brats23_empty_cases():
    z = np.zeros((12, 12, 12), bool)
    blob = box(np.zeros((12, 12, 12), bool), (2, 2, 2), (7, 7, 7))
    assert (brats23_lesionwise(z, z)["brats23_lw_dice"], brats23_lesionwise(z, z)["brats23_lw_hd95"]) == (1.0, 0.0)
    fp_only = brats23_lesionwise(blob, z)
    assert (fp_only["brats23_lw_dice"], fp_only["brats23_lw_hd95"], fp_only["brats23_lw_fp"]) == (0.0, 374.0, 1)
    missed = brats23_lesionwise(z, blob)
    assert (missed["brats23_lw_dice"], missed["brats23_lw_hd95"], missed["brats23_lw_fn"]) == (0.0, 374.0, 1)


# --------------------------------------------------------------------------- GlaS
def test_glas_split_merged_missed_spurious():
    g, s = np.zeros((80, 60), np.int32), np.zeros((80, 60), np.int32)
    box(g, (0, 0), (10, 10), 1)      # G1 100
    box(g, (20, 0), (30, 10), 2)     # G2 100, split
    box(g, (40, 0), (50, 10), 3)     # G3 100 } merged
    box(g, (40, 12), (48, 20), 4)    # G4 64  }
    box(g, (60, 30), (70, 40), 5)    # G5 100, missed
    box(s, (0, 0), (10, 10), 1)      # S1 = G1
    box(s, (20, 0), (30, 6), 2)      # S2a: 60 px of G2 (60% > 50%: TP)
    box(s, (20, 7), (30, 10), 3)     # S2b: 30 px of G2 (FP)
    box(s, (40, 0), (50, 10), 4)     # S34 = G3 + bridge + G4 = 168
    box(s, (44, 10), (46, 12), 4)
    box(s, (40, 12), (48, 20), 4)
    box(s, (70, 50), (75, 55), 5)    # S6: spurious, 25 px
    m = glas_object_metrics(s, g)
    # TP: S1, S2a, S34 (its partner G3 is fully covered); FP: S2b, S6; FN: 5 − 3
    assert (m["glas_tp"], m["glas_fp"], m["glas_fn"]) == (3, 2, 2)
    assert m["glas_object_f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 2))
    total_s, total_g = 100 + 60 + 30 + 168 + 25, 100 + 100 + 100 + 64 + 100
    s_side = (100 * 1 + 60 * (2 * 60 / 160) + 30 * (2 * 30 / 130) + 168 * (2 * 100 / 268) + 25 * 0) / total_s
    g_side = (100 * 1 + 100 * (2 * 60 / 160) + 100 * (2 * 100 / 268) + 64 * (2 * 64 / 232) + 100 * 0) / total_g
    assert m["glas_object_dice"] == pytest.approx((s_side + g_side) / 2)
    assert math.isfinite(m["glas_object_hausdorff"])


def test_glas_object_hausdorff_pairs_unmatched_objects_with_the_nearest():
    g, s = np.zeros((10, 40), np.int32), np.zeros((10, 40), np.int32)
    box(g, (0, 0), (10, 10), 7)     # G1 (label 7: labels need not be consecutive)
    box(g, (0, 30), (10, 40), 9)    # G2
    box(s, (0, 0), (10, 10), 1)     # S1 = G1
    box(s, (0, 14), (10, 24), 2)    # S2 overlaps nothing: Hausdorff 14 to G1, 16 to G2
    m = glas_object_metrics(s, g)
    # S side: ½·0 + ½·H(S2, G1)=14; G side: ½·0 + ½·H(G2, nearest S = S2)=16; mean of the two sides
    assert m["glas_object_hausdorff"] == pytest.approx((0.5 * 14 + 0.5 * 16) / 2)
    assert m["glas_object_dice"] == pytest.approx(0.5)
    assert m["glas_object_f1"] == pytest.approx(0.5)
    # a shifted copy: Hausdorff of the whole objects (all pixels), 3 px
    s2 = np.zeros_like(s)
    box(s2, (0, 3), (10, 13), 1)
    box(s2, (0, 30), (10, 40), 2)
    shifted = glas_object_metrics(s2, g)
    assert shifted["glas_object_hausdorff"] == pytest.approx((0.5 * 3 + 0.5 * 0 + 0.5 * 3 + 0.5 * 0) / 2)
    assert shifted["glas_object_f1"] == 1.0


def test_glas_empty_maps():
    z = np.zeros((10, 10), np.int32)
    one = box(np.zeros((10, 10), np.int32), (2, 2), (5, 5), 1)
    both = glas_object_metrics(z, z)
    assert (both["glas_object_f1"], both["glas_object_dice"], both["glas_object_hausdorff"]) == (1.0, 1.0, 0.0)
    missed = glas_object_metrics(z, one)
    assert (missed["glas_object_f1"], missed["glas_object_dice"], missed["glas_fn"]) == (0.0, 0.0, 1)
    assert missed["glas_object_hausdorff"] == math.inf
