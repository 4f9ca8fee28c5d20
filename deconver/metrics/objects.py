"""Objects of a label map as pixel sets, and distances between them in time linear in their pixels.

The lesion-wise and object metrics (``deconver.metrics.challenge``) compare many objects with many
others. Cropping each pair's bounding box out of the image and running a distance transform on it costs
objects × image area when boxes are large or pairs many (a speck paired with every object of the other
map). Here a label map is sorted once into per-object pixel lists (``ObjectSet``), each object's surface
pixels are found in one pass over the map, and distances are nearest-neighbour queries (k-d tree) against
one object's surface pixels: the cost grows with the pixels of the objects compared, not with the image.

Surfaces are those of ``deconver.metrics.surface.surface`` (pixels with a face neighbour outside the
object; the image border counts as outside), taken per object: a pixel of object k is on k's surface when
a face neighbour carries another label. The nearest pixel of a set B to a point outside B always lies on
B's surface (its neighbour one step towards the point would otherwise be nearer), so a distance to B's
surface pixels equals the distance to B for every point outside B.
"""
from __future__ import annotations

from functools import cached_property
from typing import Sequence

import numpy as np
from scipy.spatial import cKDTree


def object_surface(labels: np.ndarray) -> np.ndarray:
    """Per-object surface of a label map: label > 0 and a face neighbour with another label (or the border)."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        differ = labels[tuple(lo)] != labels[tuple(hi)]
        edge[tuple(lo)] |= differ
        edge[tuple(hi)] |= differ
        first, last = [slice(None)] * labels.ndim, [slice(None)] * labels.ndim
        first[axis], last[axis] = 0, -1
        edge[tuple(first)] = True
        edge[tuple(last)] = True
    return edge & (labels > 0)


def _group(flat_labels: np.ndarray, where: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of `where`, sorted by label (stable), and the start offsets of labels 1..n (n + 1 entries)."""
    idx = np.flatnonzero(where)
    lab = flat_labels[idx]
    # a stable sort of 16-bit keys is a radix sort: linear in the pixels
    order = idx[np.argsort(lab.astype(np.uint16) if n < 65536 else lab, kind="stable")]
    counts = np.bincount(lab, minlength=n + 1)[1:]
    return order, np.concatenate([[0], np.cumsum(counts)])


class ObjectSet:
    """The objects 1..n of a label map (0 = background): pixels, surface pixels, areas, boxes.

    Coordinates are in voxel units scaled by `spacing` (default 1): the distances of
    ``deconver.metrics.surface`` (mm in 3D, pixels in 2D).
    """

    def __init__(self, labels: np.ndarray, n: int, spacing: Sequence[float] | None = None):
        self.labels = labels
        self.flat = labels.ravel()
        self.n = n
        self.spacing = np.ones(labels.ndim) if spacing is None else np.asarray(spacing, dtype=float)
        self._pix, self._pix_start = _group(self.flat, self.flat > 0, n)
        self.area = np.diff(self._pix_start)  # object k at index k - 1
        self._trees: dict[int, cKDTree] = {}
        self._surface_points: dict[int, np.ndarray] = {}

    @cached_property
    def _surface(self) -> tuple[np.ndarray, np.ndarray]:
        return _group(self.flat, object_surface(self.labels).ravel(), self.n)

    def pixels(self, k: int) -> np.ndarray:
        """Flat indices of object k's pixels."""
        return self._pix[self._pix_start[k - 1]:self._pix_start[k]]

    def surface_pixels(self, k: int) -> np.ndarray:
        """Flat indices of object k's surface pixels."""
        order, start = self._surface
        return order[start[k - 1]:start[k]]

    def points(self, flat_indices: np.ndarray) -> np.ndarray:
        """Physical coordinates (N, ndim) of flat pixel indices."""
        return np.column_stack(np.unravel_index(flat_indices, self.labels.shape)) * self.spacing

    def surface_points(self, k: int) -> np.ndarray:
        """Physical coordinates of object k's surface pixels (cached)."""
        if k not in self._surface_points:
            self._surface_points[k] = self.points(self.surface_pixels(k))
        return self._surface_points[k]

    def tree(self, k: int) -> cKDTree:
        """k-d tree over object k's surface points (cached)."""
        if k not in self._trees:
            self._trees[k] = cKDTree(self.surface_points(k))
        return self._trees[k]

    def union_percentiles(self, parts: Sequence[int], other: "ObjectSet", k: int,
                          percentile: float = 95.0) -> tuple[float, float]:
        """The directed surface-distance percentiles between the union of objects `parts` and object k of
        `other`, ``(p(d(∂union→∂k)), p(d(∂k→∂union)))`` — ``deconver.metrics.surface.directed_percentiles``
        of ``surface_distances`` of the two masks. The parts must not touch (distinct components), so the
        union's surface is theirs together."""
        k_points, k_tree = other.surface_points(k), other.tree(k)
        to_k = nearest_distance_percentile(np.concatenate([self.surface_points(m) for m in parts]),
                                           k_tree, k_points, percentile)
        from_k = np.min([self.tree(m).query(k_points, k=1)[0] for m in parts], axis=0)
        return to_k, float(np.percentile(from_k, percentile))

    @cached_property
    def boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """Per object (index k - 1) the lowest and highest voxel index along each axis, inclusive: (n, ndim) each."""
        coords = np.column_stack(np.unravel_index(self._pix, self.labels.shape))
        starts = self._pix_start[:-1]
        return np.minimum.reduceat(coords, starts, axis=0), np.maximum.reduceat(coords, starts, axis=0)


def directed_distance(a: ObjectSet, i: int, b: ObjectSet, j: int) -> float:
    """max over the pixels of object i of `a` of the distance to object j of `b` (same grid); 0 if i ⊆ j."""
    pix = a.pixels(i)
    outside = pix[b.flat[pix] != j]
    if outside.size == 0:
        return 0.0
    return float(b.tree(j).query(a.points(outside), k=1)[0].max())


def full_hausdorff(a: ObjectSet, i: int, b: ObjectSet, j: int) -> float:
    """Hausdorff distance (max over all pixels, both directions) between object i of `a` and j of `b`."""
    return max(directed_distance(a, i, b, j), directed_distance(b, j, a, i))


def hausdorff_lower_bounds(a: ObjectSet, i: int, b: ObjectSet) -> np.ndarray:
    """For every object j of `b` (index j - 1), a lower bound of the Hausdorff distance of object i of `a` to j.

    Along every axis the two objects' extents differ at one end by some amount: a pixel at that end of
    one object lies at least that far from every pixel of the other, so the Hausdorff distance is at
    least the largest such difference (scaled by the spacing).
    """
    lo_a, hi_a = a.boxes
    lo_b, hi_b = b.boxes
    gap = np.maximum(np.abs(lo_b - lo_a[i - 1]), np.abs(hi_b - hi_a[i - 1])) * b.spacing
    return gap.max(axis=1)


def nearest_by_hausdorff(a: ObjectSet, i: int, b: ObjectSet, distance) -> int:
    """The object j of `b` at the smallest Hausdorff distance from object i of `a` (ties: lowest j).

    `distance(j)` gives the exact distance; it is called only for objects whose lower bound does not
    exceed the best distance found so far (visited in order of the bound), so the answer is the exact
    minimum over all of `b`'s objects.
    """
    bound = hausdorff_lower_bounds(a, i, b)
    order = np.lexsort((np.arange(b.n), bound))
    best_d, best_j = np.inf, 0
    for idx in order:
        if bound[idx] > best_d * (1 + 1e-12) + 1e-12:  # margin: the bound and the distance round apart
            break
        j = int(idx) + 1
        d = distance(j)
        if d < best_d or (d == best_d and j < best_j):
            best_d, best_j = d, j
    return best_j


def overlap_pairs(a_flat: np.ndarray, b_flat: np.ndarray, n_b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels of a, labels of b, overlapping pixels) for every pair of objects that overlap (labels > 0)."""
    both = (a_flat > 0) & (b_flat > 0)
    keys, counts = np.unique(a_flat[both].astype(np.int64) * (n_b + 1) + b_flat[both], return_counts=True)
    return keys // (n_b + 1), keys % (n_b + 1), counts


def best_partner(owner: np.ndarray, other: np.ndarray, counts: np.ndarray, n_owner: int) -> np.ndarray:
    """For owners 1..n (index k - 1), the `other` label with the largest count (ties: lowest), 0 if none."""
    partner = np.zeros(n_owner, dtype=np.int64)
    if owner.size:
        order = np.lexsort((other, -counts, owner))
        first = np.concatenate([[True], owner[order][1:] != owner[order][:-1]])
        partner[owner[order][first] - 1] = other[order][first]
    return partner


def nearest_distance_percentile(points: np.ndarray, tree: cKDTree, tree_points: np.ndarray, percentile: float) -> float:
    """``numpy.percentile`` (linear) of the distances from `points` to their nearest point of `tree`, exactly,
    querying only the points that can sit at the percentile.

    With c one of the tree's points and r the tree's extent around c, every distance lies in
    [|x − c| − r, |x − c|]. The two order statistics the percentile interpolates lie between the k-th
    smallest lower and the (k+1)-th smallest upper bound; points whose whole interval is below (above)
    that range keep their rank when replaced by a smaller (larger) stand-in, so only the others are
    queried. A large set against a small one (a predicted component swallowing many small lesions, each
    lesion scored against it) then costs a few queries instead of one per surface point.
    """
    n = len(points)
    if n <= 4 * len(tree_points) + 256:
        return float(np.percentile(tree.query(points, k=1)[0], percentile))
    centre = tree_points[0]
    reach = float(np.sqrt(((tree_points - centre) ** 2).sum(axis=1).max()))
    to_centre = np.sqrt(((points - centre) ** 2).sum(axis=1))
    margin = 1e-9 * (1.0 + to_centre)  # bounds that rounding cannot cross
    upper, lower = to_centre + margin, np.maximum(to_centre - reach - margin, 0.0)
    pos = percentile / 100.0 * (n - 1)
    k = int(np.floor(pos))
    k1 = min(k + 1, n - 1)
    below = upper < np.partition(lower, k)[k]
    above = lower > np.partition(upper, k1)[k1]
    middle = ~(below | above)
    stand_in = np.concatenate([np.full(int(below.sum()), -1.0), tree.query(points[middle], k=1)[0],
                               np.full(int(above.sum()), np.finfo(float).max)])
    return float(np.percentile(stand_in, percentile))
