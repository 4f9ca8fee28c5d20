"""Dice, HD95 and NSD on hand-made masks with known answers, and cross-checks against MONAI and medpy."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from deconver.metrics.surface import (
    HD_IMPL,
    compare_masks,
    diagonal,
    dice,
    hausdorff,
    hd95,
    nsd,
    surface,
    surface_distances,
)

ANISO = (0.5, 1.0, 3.0)


def one_voxel(shape, where):
    m = np.zeros(shape, bool)
    m[where] = True
    return m


def cube(shape, start, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


def random_shape(rng, shape, sigma=2.0, level=0.6):
    """An irregular blob (smoothed noise above a level), possibly several pieces, touching borders."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > level * field.std()


# --------------------------------------------------------------------------- hand-made cases
def test_one_voxel_masks_distance_is_the_euclidean_distance_in_mm():
    a = one_voxel((8, 9, 6), (2, 3, 4))
    b = one_voxel((8, 9, 6), (5, 7, 4))
    assert hd95(a, b) == pytest.approx(5.0)  # the 3-4-5 triangle, unit spacing
    # anisotropic: (3 voxels * 2 mm, 4 voxels * 0.5 mm) -> sqrt(36 + 4)
    assert hd95(a, b, spacing=(2.0, 0.5, 3.0)) == pytest.approx(math.sqrt(40.0))
    assert dice(a, b) == 0.0
    assert nsd(a, b, tolerance=5.0) == 1.0
    assert nsd(a, b, tolerance=4.99) == 0.0
    same = compare_masks(a, a, (2.0, 0.5, 3.0))
    assert (same.dice, same.hd95, same.nsd) == (1.0, 0.0, 1.0)
    assert (same.gt_voxels, same.pred_voxels) == (1, 1)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("d", [1, 3])
def test_parallel_planes_distance_is_the_shift_times_the_spacing_of_that_axis(axis, d):
    shape = (12, 12, 12)
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    idx_a, idx_b = [slice(2, 10)] * 3, [slice(2, 10)] * 3
    idx_a[axis], idx_b[axis] = 4, 4 + d
    a[tuple(idx_a)] = True
    b[tuple(idx_b)] = True
    expected = d * ANISO[axis]  # every voxel of one plane is exactly this far from the other plane
    r = compare_masks(a, b, ANISO, nsd_tolerance=expected)
    assert r.hd95 == pytest.approx(expected)
    assert r.hd95_pred_to_gt == pytest.approx(expected) and r.hd95_gt_to_pred == pytest.approx(expected)
    assert r.dice == 0.0
    assert r.nsd == 1.0
    assert nsd(a, b, tolerance=expected * 0.99, spacing=ANISO) == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cubes(axis):
    """Cube of 10 shifted by 2 voxels along `axis`: worked out by hand (local coordinates, A = [0,10)³,
    B = A + 2 along the axis, call it x).

    Dice = 2·(8·10·10) / (2·1000) = 0.8. Surface of a 10-cube: 1000 − 8³ = 488 voxels. From A's surface to
    B's: the x=0 face (100 voxels) is 2 away (B's face x=2); the ring at x=1 (36) is 1 away; the 64 inner
    voxels of the face x=9 lie inside B, at distance min(2, y, 9−y, z, 9−z): 1 for the 28 next to an
    edge, 2 for the other 36; the 288 side-face voxels with x ≥ 2 lie on B's surface (0). Sorted: 288
    zeros, 64 ones, 136 twos; the 95th percentile sits at rank 0.95·487 = 462.65, among the twos →
    HD95 = 2 voxels (both directions, by symmetry). NSD at 1 voxel: 352/488; at half a voxel: 288/488.
    With anisotropic spacing the x=0 face (100 of 488, more than 5%) still holds the largest distance,
    2·s_x, so HD95 = 2·s_x; the NSD counts are checked with isotropic voxels (1.5 mm).
    """
    shape = (16, 16, 16)
    start_b = [3, 3, 3]
    start_b[axis] += 2
    a, b = cube(shape, (3, 3, 3), 10), cube(shape, start_b, 10)
    s = ANISO[axis]
    r = compare_masks(b, a, ANISO)
    assert r.dice == pytest.approx(0.8)
    assert r.hd95 == pytest.approx(2 * s)
    assert hausdorff(b, a, ANISO) == pytest.approx(2 * s)  # plain Hausdorff (the max) too
    iso = (1.5, 1.5, 1.5)
    assert nsd(b, a, tolerance=1.5, spacing=iso) == pytest.approx(352 / 488)
    assert nsd(b, a, tolerance=0.75, spacing=iso) == pytest.approx(288 / 488)
    assert hd95(b, a, iso) == pytest.approx(3.0)
    d_pg, d_gp = surface_distances(b, a, iso)
    assert d_pg.size == d_gp.size == 488
    for d in (d_pg, d_gp):
        assert np.count_nonzero(d == 0) == 288 and np.count_nonzero(np.isclose(d, 1.5)) == 64
        assert np.count_nonzero(np.isclose(d, 3.0)) == 136


def test_shifted_squares_in_2d_are_in_pixels():
    a, b = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    a[2:12, 2:12] = True
    b[2:12, 5:15] = True  # shifted by 3 columns
    r = compare_masks(b, a)
    assert r.dice == pytest.approx(0.7)
    # perimeter of a 10-square: 36 pixels. From A's: the left edge (10) is 3 away; top/bottom row pixels
    # in columns 1, 2 (4) are 2 and 1 away; the other 14 row pixels lie on B's edge (0); the 8 inner pixels
    # of A's right edge lie inside B at min(3, r, 9−r): 1,2,3,3,3,3,2,1. Sorted: 14 zeros, 4 ones, 4 twos,
    # 14 threes; p95 at rank 0.95·35 = 33.25 → 3 (same from B by symmetry)
    assert r.hd95 == pytest.approx(3.0)


def test_surface_is_face_connected_boundary_and_image_border_counts():
    m = cube((7, 7, 7), (1, 1, 1), 5)
    s = surface(m)
    assert s.sum() == 125 - 27
    full = np.ones((4, 4, 4), bool)  # touches every image border: all but the inner 2³ are surface
    assert surface(full).sum() == 64 - 8


def test_raw_values_of_empty_masks():
    z = np.zeros((6, 6, 6), bool)
    a = cube((6, 6, 6), (1, 1, 1), 3)
    both = compare_masks(z, z)
    assert math.isnan(both.dice) and math.isnan(both.hd95) and math.isnan(both.nsd)
    assert both.gt_empty and both.pred_empty
    for pred, gt in ((z, a), (a, z)):
        r = compare_masks(pred, gt, ANISO)
        assert r.dice == 0.0 and r.nsd == 0.0 and r.hd95 == math.inf
        assert r.gt_empty == (gt is z) and r.pred_empty == (pred is z)
    assert math.isnan(dice(z, z))
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(z, a)


def test_bad_inputs_are_rejected():
    a = cube((6, 6, 6), (1, 1, 1), 3)
    with pytest.raises(ValueError, match="shape"):
        compare_masks(a, a[:5])
    with pytest.raises(ValueError, match="spacing"):
        compare_masks(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        compare_masks(a, a, (1.0, 0.0, 1.0))


def test_diagonal():
    assert diagonal((240, 240, 155)) == pytest.approx(math.sqrt(240**2 + 240**2 + 155**2))
    assert diagonal((10, 20), (0.5, 2.0)) == pytest.approx(math.sqrt(25 + 1600))
    assert HD_IMPL


# --------------------------------------------------------------------------- cross-checks
def _random_pairs(seed, n, shape):
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n:
        g = random_shape(rng, shape)
        p = random_shape(rng, shape) if len(pairs) % 3 == 0 else ndimage.binary_dilation(g, iterations=1) ^ \
            (random_shape(rng, shape, sigma=1.0, level=1.2) & g)
        if g.any() and p.any():
            pairs.append((p, g))
    return pairs


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISO])
def test_hd95_and_nsd_equal_monai(spacing):
    """Our definition is MONAI's: the values agree to float32 precision on irregular, border-touching shapes."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    for p, g in _random_pairs(0, 6, (28, 24, 20)):
        P, G = torch.from_numpy(p[None, None]).float(), torch.from_numpy(g[None, None]).float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_hd = compute_hausdorff_distance(P, G, include_background=True, percentile=95, spacing=list(spacing)).item()
            ref_nsd = compute_surface_dice(P, G, [2.0], include_background=True, spacing=list(spacing)).item()
        r = compare_masks(p, g, spacing, nsd_tolerance=2.0)
        assert r.hd95 == pytest.approx(ref_hd, rel=1e-5, abs=1e-5)
        assert r.nsd == pytest.approx(ref_nsd, rel=1e-6)


@pytest.mark.parametrize("shape,spacing", [((30, 26, 22), ANISO), ((64, 56), (1.0, 1.0))])
def test_hd95_agrees_with_medpy_within_the_documented_difference(shape, spacing):
    """medpy pools both directions before the percentile; its value lies between the smaller directed
    percentile (lower order statistic) and the larger one (upper order statistic) — ours is the larger."""
    from medpy.metric.binary import dc, hd95 as medpy_hd95

    differ = 0
    for p, g in _random_pairs(1, 8, shape):
        ref = medpy_hd95(p, g, voxelspacing=spacing)
        ours = compare_masks(p, g, spacing)
        d_pg, d_gp = surface_distances(p, g, spacing)
        lower = min(np.percentile(d_pg, 95, method="lower"), np.percentile(d_gp, 95, method="lower"))
        upper = max(np.percentile(d_pg, 95, method="higher"), np.percentile(d_gp, 95, method="higher"))
        assert lower - 1e-9 <= ref <= upper + 1e-9
        assert ours.hd95 == pytest.approx(max(ours.hd95_pred_to_gt, ours.hd95_gt_to_pred))
        assert lower - 1e-9 <= ours.hd95 <= upper + 1e-9
        assert ours.dice == pytest.approx(dc(p, g))
        differ += ours.hd95 > ref + 1e-6
    assert differ >= 1  # the two definitions do differ on irregular shapes


def test_cropping_does_not_change_the_result():
    """The masks are cropped to their bounding box internally: the same masks inside a larger empty image
    give identical values (padded by one voxel first, so that no voxel sits on the image border)."""
    rng = np.random.default_rng(3)
    p, g = np.pad(random_shape(rng, (20, 18, 16)), 1), np.pad(random_shape(rng, (20, 18, 16)), 1)
    small = compare_masks(p, g, ANISO)
    big = compare_masks(np.pad(p, ((7, 30), (2, 0), (11, 4))), np.pad(g, ((7, 30), (2, 0), (11, 4))), ANISO)
    assert big == small
    assert small.hd95 > 0 and 0 < small.dice < 1
