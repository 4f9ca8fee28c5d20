"""Metric conventions from the same predictions: `suite`, `authors` (MONAI on the prepared grid, voxels,
empty cases dropped) and `challenge` (BraTS 2023 HD95 by the surface-distance package, GlaS F1 NaN)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import surface_distance
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from deconver.config import load_preset
from deconver.engine.labels import LabelCodec
from deconver.metrics.empty_rules import apply_rule
from deconver.metrics.conventions import authors_rows, challenge_rows, convention_rule, robust_hd95
from deconver.metrics.evaluate import evaluate_case
from deconver.metrics.surface import compare_masks
from deconver.report.conventions import pool_conventions


def _ball(shape, centre, radius, spacing=(1, 1, 1)):
    grid = np.indices(shape).astype(float)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
    return d2 <= radius ** 2


def _cases():
    """>= 20 (pred, gt, spacing): anisotropic spacings, thin tails, several blobs, shifts, empty masks."""
    rng = np.random.default_rng(0)
    out = []
    for i, spacing in enumerate([(1, 1, 1), (1, 1, 2.5), (0.5, 0.8, 3.0), (2, 2, 2), (0.9, 0.9, 5.0)]):
        shape = (40, 40, 24)
        gt = _ball(shape, (20, 20, 12), 8, spacing)
        out.append((np.roll(gt, 1 + i % 2, axis=i % 3), gt, spacing))           # shifted ball
        tail = gt.copy()
        tail[20, 20:38, 12] = True                                               # ball with a thin tail
        out.append((gt, tail, spacing))
        blobs = _ball(shape, (8, 8, 6), 4, spacing) | _ball(shape, (32, 30, 18), 3, spacing)
        out.append((blobs, _ball(shape, (8, 8, 6), 4, spacing), spacing))        # a second, far blob
        noisy = gt ^ (rng.random(shape) < 0.02)
        out.append((noisy, gt, spacing))                                         # scattered noise
    two_d = _ball((60, 60, 1), (30, 30, 0), 12)[..., 0]
    out.append((np.roll(two_d, 3, axis=1), two_d, (0.7, 1.3)))                 # 2D, anisotropic pixels
    return out


CASES = _cases()


def test_challenge_hd95_is_the_surface_distance_packages():
    assert len(CASES) >= 20
    for pred, gt, spacing in CASES:
        ref = surface_distance.compute_robust_hausdorff(
            surface_distance.compute_surface_distances(gt, pred, tuple(float(s) for s in spacing)), 95)
        assert robust_hd95(pred, gt, spacing) == pytest.approx(ref, abs=1e-6)
        rows = challenge_rows({"case": "c"}, "WT", pred, gt, spacing, "mm", "brats23")
        hd = next(r["value"] for r in rows if r["metric"] == "hd95")
        assert hd == pytest.approx(ref, abs=1e-6)
        if len(spacing) == 3:  # one lesion each: lesion-wise HD95 of the package too (no false positives)
            lw = next(r["value"] for r in rows if r["metric"] == "brats23_lw_hd95")
            fp = next(r["value"] for r in rows if r["metric"] == "brats23_lw_fp")
            assert fp > 0 or lw == pytest.approx(ref, abs=1e-6) or lw == 374.0
    # the two definitions differ (surfels on the corner grid, area weights, no interpolation): by > 4 mm here
    gaps = [abs(compare_masks(p, g, s).hd95 - robust_hd95(p, g, s)) for p, g, s in CASES]
    assert max(gaps) > 4.0 and sum(gap > 0.3 for gap in gaps) >= 10


def test_empty_masks_follow_the_brats_rules():
    gt = _ball((20, 20, 20), (10, 10, 10), 5)
    empty = np.zeros_like(gt)
    assert math.isinf(robust_hd95(empty, gt, (1, 1, 1))) and math.isnan(robust_hd95(empty, empty, (1, 1, 1)))
    rows = pd.DataFrame(challenge_rows({"case": "a"}, "ET", empty, gt, (1, 1, 1), "mm", "brats23")
                        + challenge_rows({"case": "b"}, "ET", empty, empty, (1, 1, 1), "mm", "brats23"))
    rule, penalty = convention_rule("challenge", "penalize", "diagonal", "brats23")
    values, _ = apply_rule(rows, rule, penalty)
    hd = values[values["metric"] == "hd95"].set_index("case")["value"]
    assert (hd["a"], hd["b"]) == (374.0, 0.0)


def test_authors_convention_is_monai_on_the_prepared_grid():
    rng = np.random.default_rng(1)
    dice_m, hd_m = DiceMetric(include_background=True, ignore_empty=False), HausdorffDistanceMetric(percentile=95)
    rows = []
    for i in range(8):
        gt = _ball((24, 24, 24), (12, 12, 12), 4 + i % 3)
        pred = np.roll(gt, i % 3, axis=0) if i % 4 else np.zeros_like(gt)       # some missed entirely
        if i == 5:
            gt = np.zeros_like(gt)                                               # an empty ground truth
        if i == 6:
            gt, pred = np.zeros_like(gt), np.zeros_like(gt)                      # both empty
        p, g = torch.from_numpy(pred)[None, None].float(), torch.from_numpy(gt)[None, None].float()
        dice_m(p, g)
        hd_m(p, g)
        rows += authors_rows({"case": f"c{i}", "dataset": "d", "model": "m", "fold": 0}, ["lesion"],
                             pred[None], gt[None])
    table = pd.DataFrame(rows)
    assert set(table["unit"]) == {"ratio", "vox"}
    rule, _ = convention_rule("authors", "penalize", "diagonal")
    values, counts = apply_rule(table, rule, "diagonal")
    means = values.groupby("metric")["value"].mean()
    monai_hd = hd_m.aggregate().item()
    assert means["dice"] == pytest.approx(dice_m.aggregate().item())
    assert means["hd95"] == pytest.approx(monai_hd)  # MONAI's NaN-skipping mean = cases dropped
    assert counts.set_index("metric").loc["hd95", "n_excluded"] == 4


def test_glas_f1_is_undefined_without_a_match_and_counted():
    gt = np.zeros((40, 40), bool)
    gt[5:15, 5:15] = True
    far = np.zeros_like(gt)
    far[25:35, 25:35] = True
    rows = challenge_rows({"case": "x"}, "gland", far, gt, (1, 1), "px", "glas")
    f1 = next(r["value"] for r in rows if r["metric"] == "glas_object_f1")
    assert math.isnan(f1)
    suite = evaluate_case("x", far.astype(int), gt.astype(int), None, load_preset("glas"))
    assert next(r["value"] for r in suite if r["metric"] == "glas_object_f1" and r["convention"] == "suite") == 0.0
    raw = pd.DataFrame([{**r, "dataset": "glas", "model": "m", "fold": 0, "diagonal": 56.6} for r in suite])
    _, summary = pool_conventions(raw, "penalize", "diagonal")
    f1_rows = summary[(summary["metric"] == "glas_object_f1")].set_index("convention")
    assert f1_rows.loc["suite", "mean"] == 0.0 and f1_rows.loc["challenge", "n_excluded"] == 1
    assert f1_rows.loc["challenge", "n"] == 0


def test_priority_decoding_and_region_sources():
    preset = load_preset("brats23", {"protocol": {"region_decoding": "priority"}})
    codec = LabelCodec.from_preset(preset)
    assert codec.priority_values() == [("ET", 3), ("TC", 1), ("WT", 2)]
    probs = np.zeros((3, 4, 1, 1), np.float32)
    probs[:, 0, 0, 0] = [0.9, 0.1, 0.1]   # ET alone -> 3 (the match rule would say 3 too: ET implies TC and WT)
    probs[:, 1, 0, 0] = [0.1, 0.9, 0.1]   # TC without WT -> 1
    probs[:, 2, 0, 0] = [0.1, 0.1, 0.9]   # WT -> 2
    probs[:, 3, 0, 0] = [0.9, 0.1, 0.9]   # ET and WT, no TC -> 3 (priority); match: 3 agrees with 2 of 3, 2 with 2 of 3
    assert codec.to_label_map(probs)[:, 0, 0].tolist() == [3, 1, 2, 3]
    # per-channel scoring sees the channels as predicted, the label map re-derives them
    gt = np.zeros((4, 1, 1), int)
    gt[0] = 3
    channels = {name: probs[k] > 0.5 for k, name in enumerate(preset.labels)}
    by_channel = evaluate_case("c", codec.to_label_map(probs), gt, (1, 1, 1), preset, pred_regions=channels)
    by_map = evaluate_case("c", codec.to_label_map(probs), gt, (1, 1, 1), preset)

    def tc(rows):
        return next(r["pred_voxels"] for r in rows if r["region"] == "TC" and r["metric"] == "dice"
                    and r["convention"] == "suite")

    assert (tc(by_channel), tc(by_map)) == (1, 3)  # TC channel: one voxel; label map {3, 1, 3} ⊂ TC: three
