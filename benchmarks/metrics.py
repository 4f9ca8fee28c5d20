"""Benchmark: Dice + HD95 of one BraTS-size case (240×240×155, 1 mm, realistic multi-lesion masks), ours vs medpy.

Goal (issue 7): ≤ 1 s per case on this CPU and ≥ 3× faster than medpy on the same case. Both sides start
from the two label maps and compute, for each region (ET, TC, WT), the region masks, Dice and HD95 with
the voxel spacing; ours (``compare_masks``) also returns NSD from the same distances. Results go to
``results/benchmarks/metrics.json``.

    python benchmarks/metrics.py [--repeats 3] [--seed 0] [--out results/benchmarks/metrics.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from deconver.io import provenance, write_json_atomic
from deconver.metrics.surface import HD_IMPL, compare_masks

REPO = Path(__file__).resolve().parents[1]

SHAPE = (240, 240, 155)
SPACING = (1.0, 1.0, 1.0)
REGIONS = {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}


def _ellipsoids(rng: np.random.Generator, n: int, rmin: float, rmax: float, centre_box) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    for _ in range(n):
        c = [rng.uniform(lo * s, hi * s) for (lo, hi), s in zip(centre_box, SHAPE)]
        r = rng.uniform(rmin, rmax, 3)
        box = tuple(slice(max(0, int(ci - ri) - 1), min(s, int(ci + ri) + 2)) for ci, ri, s in zip(c, r, SHAPE))
        grid = np.ogrid[box]
        mask[box] |= sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1.0
    return mask


def brats_like_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A BraTS-like ground truth (several irregular lesions: oedema 2 around necrosis 1 with an enhancing
    rim 3, plus two small satellites) and a prediction with boundary errors, a missed satellite and a
    spurious blob."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(SHAPE).astype(np.float32), 4.0)
    noise /= noise.std()
    cores = _ellipsoids(rng, 3, 8, 22, [(0.3, 0.7), (0.3, 0.7), (0.3, 0.7)])
    wt = ndimage.binary_dilation(cores, iterations=6) & (noise > -0.8) | cores
    wt |= _ellipsoids(rng, 2, 3, 5, [(0.2, 0.8), (0.2, 0.8), (0.2, 0.8)])
    tc = cores & (noise < 1.2)
    et = tc & ~ndimage.binary_erosion(tc, iterations=3)
    gt = np.zeros(SHAPE, np.uint8)
    gt[wt], gt[tc], gt[et] = 2, 1, 3

    noise2 = ndimage.gaussian_filter(rng.standard_normal(SHAPE).astype(np.float32), 3.0)
    noise2 /= noise2.std()
    grow = ndimage.binary_dilation(wt, iterations=2) & (noise2 > 0.3)
    shrink = wt & ~ndimage.binary_erosion(wt, iterations=2) & (noise2 < -0.5)
    pwt = (wt | grow) & ~shrink
    labels, n = ndimage.label(wt)
    if n > 1:  # miss the smallest lesion
        sizes = ndimage.sum(wt, labels, range(1, n + 1))
        pwt &= labels != 1 + int(np.argmin(sizes))
    pwt |= _ellipsoids(rng, 1, 4, 6, [(0.1, 0.2), (0.1, 0.2), (0.4, 0.6)])  # spurious
    ptc = np.roll(tc, 1, axis=0) & pwt
    pet = ptc & ~ndimage.binary_erosion(ptc, iterations=2 + int(rng.integers(0, 2)))
    pred = np.zeros(SHAPE, np.uint8)
    pred[pwt], pred[ptc], pred[pet] = 2, 1, 3
    return pred, gt


def ours(pred: np.ndarray, gt: np.ndarray) -> dict:
    out = {}
    for name, values in REGIONS.items():
        r = compare_masks(np.isin(pred, values), np.isin(gt, values), SPACING)
        out[name] = {"dice": r.dice, "hd95": r.hd95, "nsd": r.nsd}
    return out


def medpy_reference(pred: np.ndarray, gt: np.ndarray) -> dict:
    from medpy.metric.binary import dc, hd95

    out = {}
    for name, values in REGIONS.items():
        p, g = np.isin(pred, values), np.isin(gt, values)
        out[name] = {"dice": float(dc(p, g)), "hd95": float(hd95(p, g, voxelspacing=SPACING))}
    return out


def timed(fn, *args, repeats: int) -> tuple[list[float], dict]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t0)
    return times, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours (medpy: --medpy-repeats)")
    parser.add_argument("--medpy-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "metrics.json")
    args = parser.parse_args(argv)

    pred, gt = brats_like_case(args.seed)
    voxels = {name: {"gt": int(np.isin(gt, v).sum()), "pred": int(np.isin(pred, v).sum())} for name, v in REGIONS.items()}
    ours(pred, gt)  # warm-up (imports, caches)
    t_ours, r_ours = timed(ours, pred, gt, repeats=args.repeats)
    t_medpy, r_medpy = timed(medpy_reference, pred, gt, repeats=args.medpy_repeats)
    med_ours, med_medpy = statistics.median(t_ours), statistics.median(t_medpy)
    result = {
        "benchmark": "Dice + HD95 (+ NSD for ours) of one BraTS-size case, 3 regions (ET, TC, WT)",
        "shape": list(SHAPE), "spacing": list(SPACING), "seed": args.seed, "voxels": voxels,
        "hd_impl": HD_IMPL,
        "ours_seconds": t_ours, "ours_median_s": med_ours,
        "medpy_seconds": t_medpy, "medpy_median_s": med_medpy,
        "speedup": med_medpy / med_ours,
        "goal": {"ours_max_s": 1.0, "min_speedup": 3.0,
                 "met": bool(med_ours <= 1.0 and med_medpy / med_ours >= 3.0)},
        "values": {"ours": r_ours, "medpy": r_medpy},
        "note": "medpy pools both directions before the 95th percentile; ours is the max of the directed ones",
        "provenance": provenance("cpu"),
    }
    write_json_atomic(args.out, result)
    print(f"ours : median {med_ours:.3f} s per case ({', '.join(f'{t:.3f}' for t in t_ours)})")
    print(f"medpy: median {med_medpy:.3f} s per case ({', '.join(f'{t:.3f}' for t in t_medpy)})")
    print(f"speedup {med_medpy / med_ours:.1f}x; goal met: {result['goal']['met']}")
    for name in REGIONS:
        print(f"  {name}: dice {r_ours[name]['dice']:.4f} / {r_medpy[name]['dice']:.4f}, "
              f"hd95 {r_ours[name]['hd95']:.3f} / {r_medpy[name]['hd95']:.3f} mm (ours / medpy), voxels {voxels[name]}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
