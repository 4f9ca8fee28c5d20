"""Object and lesion-wise metrics on instance-dense data give the numbers of the implementation they replaced.

The reference (`benchmarks/metrics_reference.py`, the first code, kept outside the package) computes a
full Hausdorff distance per candidate pair; the package searches nearest objects with lower bounds and
k-d trees. Cases come from the benchmark's generators (`benchmarks/metrics.py`) at smaller sizes.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from deconver.metrics.challenge import brats23_lesionwise, glas_object_metrics
from deconver.metrics.objects import ObjectSet, full_hausdorff, nearest_by_hausdorff

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


bench = _load("metrics")
reference = _load("metrics_reference")


def _assert_same(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for key in ours:
        if math.isinf(ref[key]):
            assert ours[key] == ref[key], key
        else:
            assert ours[key] == pytest.approx(ref[key], abs=1e-9, rel=0), key


def test_glas_object_metrics_equal_the_reference_on_20_dense_tiles():
    unmatched_total = 0
    for seed in range(20):
        pred, gt = bench.nuclei_case(170, seed)  # ~16 GT nuclei, specks, splits, merges, boundary fragments
        assert gt.max() >= 10 and pred.max() > gt.max() // 2
        unmatched_total += np.setdiff1d(np.unique(pred), np.unique(pred[gt > 0])).size - 1
        _assert_same(glas_object_metrics(pred, gt), reference.glas_object_metrics(pred, gt))
    assert unmatched_total >= 40  # the nearest-object search really ran


def test_glas_object_metrics_equal_the_reference_with_unmatched_gt_and_arbitrary_ids():
    rng = np.random.default_rng(5)
    pred, gt = bench.nuclei_case(150, 99)
    ids = rng.permutation(np.arange(1, 60000))[: gt.max() + 1]
    ids[0] = 0
    gt_sparse = ids[gt]  # non-consecutive ids up to 60,000
    pred_cut = np.where(np.arange(150)[:, None] < 100, pred, 0)  # a third of the GT without any prediction
    for p in (pred, pred_cut):
        _assert_same(glas_object_metrics(p, gt_sparse), reference.glas_object_metrics(p, gt_sparse))


def test_nearest_by_hausdorff_is_the_exhaustive_minimum():
    pred, gt = bench.nuclei_case(200, 3)
    s, g = ObjectSet(pred, int(pred.max())), ObjectSet(gt, int(gt.max()))
    for i in range(1, s.n + 1, 3):
        exhaustive = min(range(1, g.n + 1), key=lambda j: (full_hausdorff(s, i, g, j), j))
        calls: list[int] = []

        def distance(j, i=i):
            calls.append(j)
            return full_hausdorff(s, i, g, j)

        assert nearest_by_hausdorff(s, i, g, distance) == exhaustive
        assert len(calls) < g.n  # the bounds pruned candidates


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 0.9, 2.0)])
@pytest.mark.parametrize("leak", [False, True])
def test_brats23_lesionwise_equal_the_reference_with_many_lesions(spacing, leak):
    for seed in range(2):
        pred, gt = bench.lesions_case((64, 64, 48), n_lesions=25, seed=seed)
        if leak:
            pred[8:30, 8:56, 6:40] = True  # one component swallowing several lesions
        ours = brats23_lesionwise(pred, gt, spacing, min_volume=10.0)
        assert ours["brats23_lw_tp"] >= 5
        _assert_same(ours, reference.brats23_lesionwise(pred, gt, spacing, min_volume=10.0))


@pytest.mark.parametrize("percentile", [0.0, 50.0, 95.0, 100.0])
def test_nearest_distance_percentile_is_exact(percentile):
    from scipy.spatial import cKDTree

    from deconver.metrics.objects import nearest_distance_percentile

    rng = np.random.default_rng(int(percentile))
    for trial in range(5):
        small = rng.integers(0, 6, (30, 3)) * np.array([0.9, 0.9, 2.0]) + rng.integers(0, 50, 3)
        big = rng.integers(0, 80, (5000, 3)) * np.array([0.9, 0.9, 2.0])
        if trial == 0:
            big[:2500] = big[0]  # many equal distances
        tree = cKDTree(small)
        full = float(np.percentile(tree.query(big, k=1)[0], percentile))
        assert nearest_distance_percentile(big, tree, small, percentile) == full


def test_brats23_challenge_hd95_on_lesion_boxes_equals_it_on_the_whole_volume():
    """The challenge convention's per-lesion HD95 (surface-distance package) gets each lesion's box, not the
    volume: the same values as on masks padded out to the whole volume."""
    from deconver.metrics.conventions import robust_hd95

    pred, gt = bench.lesions_case((64, 64, 48), n_lesions=25, seed=4)
    pred[8:30, 8:56, 6:40] = True  # one component swallowing several lesions
    shapes = []

    def on_box(p, g, sp):
        shapes.append(p.shape)
        return robust_hd95(p, g, sp)

    def padded(p, g, sp):  # the box placed in a volume twice its size: the crop cannot matter
        big = tuple(2 * n + 6 for n in p.shape)
        at = tuple(slice(3, 3 + n) for n in p.shape)
        pp, gg = np.zeros(big, bool), np.zeros(big, bool)
        pp[at], gg[at] = p, g
        return robust_hd95(pp, gg, sp)

    spacing = (0.9, 0.9, 2.0)
    boxed = brats23_lesionwise(pred, gt, spacing, min_volume=10.0, hd95=on_box)
    assert boxed == brats23_lesionwise(pred, gt, spacing, min_volume=10.0, hd95=padded)
    assert boxed["brats23_lw_tp"] >= 5 and min(int(np.prod(s)) for s in shapes) < pred.size // 100
