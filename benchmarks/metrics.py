"""Benchmark: the suite's metrics on one BraTS-size case (vs medpy) and on instance-dense data (vs the first code).

Two parts, both written to ``results/benchmarks/metrics.json``:

* **brats** (issue 7): Dice + HD95 of one BraTS-size case (240×240×155, 1 mm, realistic multi-lesion
  masks), ours vs medpy. Goal ≤ 1 s per case, ≥ 3× faster than medpy. For each region (ET, TC, WT)
  both sides compute the region masks, Dice and HD95 with the voxel spacing; ours
  (``compare_masks``) also returns NSD from the same distances.
* **dense** (issue 24): the object and lesion-wise metrics on many objects, against the implementation
  they replaced (``benchmarks/metrics_reference.py``, kept here, not in the package), checking the values
  agree. GlaS object metrics of a 1000×1000 nuclei tile (~560 GT objects, a prediction with ~200 unmatched
  objects: specks, split and merged nuclei; goal ≤ 2 s); the reference needs about 2 s per unmatched
  object there, so its ratio is measured on a smaller tile of the same density (``--reference-size``;
  ``--reference-size 1000`` runs it on the full tile). BraTS 2023 lesion-wise metrics and ISLES'22
  lesion metrics of a 240×240×155 volume with 200 lesions (goal ≤ 3 s), and the BraTS case again with
  a predicted leak that merges dozens of lesions into one component (the old cost: lesions × that
  component's bounding box). ISLES'22's code did not change (it was linear already): timed, no ratio.
* **evaluate** (issue 24): ``deconver evaluate`` by hand (GlaS preset, 16-bit GT maps) of a fold of six
  such tiles on the available cores (``--workers``); goal ≤ 30 s. The replaced code needed 29-41 min.

    python benchmarks/metrics.py [--parts brats dense evaluate] [--repeats 3] [--seed 0] [--reference-size 400]
                                 [--out results/benchmarks/metrics.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from deconver.io import provenance, write_json_atomic
from deconver.metrics.challenge import brats23_lesionwise, glas_object_metrics, isles22_metrics, label_components
from deconver.metrics.surface import HD_IMPL, compare_masks

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics_reference as reference  # noqa: E402  (benchmarks/ is not a package)

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


# --------------------------------------------------------------------------- instance-dense cases
NUCLEI_TILE = 1000          # px a side
NUCLEI_PER_MPX = 560        # GT objects per 10^6 px (real H&E nuclei tiles: 294-1,862)
SPECKS_PER_MPX = 120        # false-positive specks per 10^6 px (with boundary fragments: ~200 unmatched)
LESION_SHAPE = (240, 240, 155)
LESIONS = 200


def _ellipse(shape, centre, radii, angle):
    """(box, mask within the box) of a 2D ellipse."""
    r = max(radii) + 1
    box = tuple(slice(max(0, int(c - r)), min(n, int(c + r) + 2)) for c, n in zip(centre, shape))
    yy, xx = np.ogrid[box]
    dy, dx = yy - centre[0], xx - centre[1]
    u, v = np.cos(angle) * dy + np.sin(angle) * dx, -np.sin(angle) * dy + np.cos(angle) * dx
    return box, (u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1.0


def nuclei_case(size: int = NUCLEI_TILE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(predicted objects, GT instance map) of a size×size H&E-nuclei-like tile at the density above.

    GT: elliptic nuclei (radii 5-13 px), ids 1..n, touching allowed. Prediction: the GT mask with a
    noisy one-pixel boundary, 1 in 30 nuclei missed, 1 in 25 split by a cut, 1 in 30 merged with its
    nearest neighbour by a bridge, and false-positive specks; objects = its 8-connected components.
    """
    rng = np.random.default_rng(seed)
    shape = (size, size)
    n_target = round(NUCLEI_PER_MPX * size * size / 1e6)
    gt = np.zeros(shape, np.int32)
    centres = []
    for _ in range(n_target * 50):
        if len(centres) == n_target:
            break
        c = rng.uniform(0, size, 2)
        box, ell = _ellipse(shape, c, rng.uniform(5, 13, 2), rng.uniform(0, np.pi))
        if (gt[box][ell] > 0).mean() > 0.1:
            continue
        centres.append(c)
        gt[box][ell & (gt[box] == 0)] = len(centres)
    n = len(centres)
    fg = gt > 0
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    pred = (ndimage.binary_dilation(fg) & (noise > -0.05)) | ndimage.binary_erosion(fg, iterations=2)
    pred &= ~np.isin(gt, rng.choice(np.arange(1, n + 1), size=max(1, n // 30), replace=False))  # missed
    for k in rng.choice(np.arange(1, n + 1), size=max(1, n // 25), replace=False):  # split by a cut
        cy, cx = centres[k - 1]
        box = tuple(slice(max(0, int(c) - 15), min(size, int(c) + 16)) for c in (cy, cx))
        yy, xx = np.ogrid[box]
        a = rng.uniform(0, np.pi)
        pred[box] &= ~((np.abs(np.cos(a) * (yy - cy) + np.sin(a) * (xx - cx)) < 1.0) & (gt[box] == k))
    pts = np.array(centres)
    for k in rng.choice(np.arange(n), size=max(1, n // 30), replace=False):  # merged with the nearest
        d = np.hypot(*(pts - pts[k]).T)
        d[k] = np.inf
        (y0, x0), (y1, x1) = pts[k], pts[int(np.argmin(d))]
        steps = np.linspace(0, 1, int(d.min()) * 2 + 2)
        ys, xs = np.rint(y0 + steps * (y1 - y0)).astype(int), np.rint(x0 + steps * (x1 - x0)).astype(int)
        for oy in (-1, 0, 1):
            pred[np.clip(ys + oy, 0, size - 1), np.clip(xs, 0, size - 1)] = True
    for _ in range(round(SPECKS_PER_MPX * size * size / 1e6)):
        box, ell = _ellipse(shape, rng.uniform(0, size, 2), rng.uniform(0.8, 3, 2), rng.uniform(0, np.pi))
        pred[box] |= ell
    return label_components(pred)[0], gt


def _balls(shape, rng, n: int, rmin: float, rmax: float) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for _ in range(n):
        c = [rng.uniform(0.05 * s, 0.95 * s) for s in shape]
        r = rng.uniform(rmin, rmax, 3)
        box = tuple(slice(max(0, int(ci - ri) - 1), min(s, int(ci + ri) + 2)) for ci, ri, s in zip(c, r, shape))
        mask[box] |= sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(np.ogrid[box], c, r)) <= 1.0
    return mask


def lesions_case(shape=LESION_SHAPE, n_lesions: int = LESIONS, seed: int = 0, leak: bool = False):
    """(pred, gt) binary volumes with `n_lesions` small lesions (radii 1.5-6 voxels, some touching), a
    prediction with noisy boundaries and 60 false-positive blobs; with `leak`, one predicted slab
    (60×170×110 voxels) that swallows the lesions inside it into one component."""
    rng = np.random.default_rng(seed)
    gt = _balls(shape, rng, n_lesions, 1.5, 6)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.5)
    pred = (ndimage.binary_dilation(gt) & (noise > 0)) | ndimage.binary_erosion(gt)
    pred |= _balls(shape, rng, 60, 1, 3)
    if leak:
        pred[30:90, 30:200, 20:130] = True
    return pred, gt


def max_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two metric dicts (inf = inf counts as equal)."""
    return max(0.0 if a[k] == b[k] else abs(a[k] - b[k]) for k in a)


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


def brats_part(args) -> dict:
    """Issue 7: Dice + HD95 of one BraTS-size case, ours vs medpy."""
    pred, gt = brats_like_case(args.seed)
    voxels = {name: {"gt": int(np.isin(gt, v).sum()), "pred": int(np.isin(pred, v).sum())} for name, v in REGIONS.items()}
    ours(pred, gt)  # warm-up (imports, caches)
    t_ours, r_ours = timed(ours, pred, gt, repeats=args.repeats)
    t_medpy, r_medpy = timed(medpy_reference, pred, gt, repeats=args.medpy_repeats)
    med_ours, med_medpy = statistics.median(t_ours), statistics.median(t_medpy)
    print(f"ours : median {med_ours:.3f} s per case ({', '.join(f'{t:.3f}' for t in t_ours)})")
    print(f"medpy: median {med_medpy:.3f} s per case ({', '.join(f'{t:.3f}' for t in t_medpy)})")
    print(f"speedup {med_medpy / med_ours:.1f}x; goal met: {med_ours <= 1.0 and med_medpy / med_ours >= 3.0}")
    for name in REGIONS:
        print(f"  {name}: dice {r_ours[name]['dice']:.4f} / {r_medpy[name]['dice']:.4f}, "
              f"hd95 {r_ours[name]['hd95']:.3f} / {r_medpy[name]['hd95']:.3f} mm (ours / medpy), voxels {voxels[name]}")
    return {
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
    }


def _compare(name: str, fn, ref_fn, inputs: tuple, repeats: int, goal_s: float | None, kwargs=None) -> dict:
    """Time ours (median of `repeats`) and the reference (once, if given) on the same inputs."""
    kwargs = kwargs or {}
    cpu0 = time.process_time()
    t_ours, r_ours = timed(lambda: fn(*inputs, **kwargs), repeats=repeats)
    out = {"ours_seconds": t_ours, "ours_median_s": statistics.median(t_ours),
           "ours_cpu_s_per_run": (time.process_time() - cpu0) / repeats, "values": r_ours}
    line = f"{name}: ours {out['ours_median_s']:.3f} s (CPU {out['ours_cpu_s_per_run']:.3f} s)"
    if ref_fn is not None:
        t_ref, r_ref = timed(lambda: ref_fn(*inputs, **kwargs), repeats=1)
        out.update(reference_s=t_ref[0], speedup=t_ref[0] / out["ours_median_s"],
                   max_abs_difference=max_difference(r_ours, r_ref), reference_values=r_ref)
        line += (f", reference {t_ref[0]:.3f} s, {out['speedup']:.1f}x; "
                 f"max |difference| {out['max_abs_difference']:.2e}")
    if goal_s is not None:
        out["goal"] = {"max_s": goal_s, "met": bool(out["ours_median_s"] <= goal_s)}
        line += f"; goal <= {goal_s} s met: {out['goal']['met']}"
    print(line)
    return out


def dense_part(args) -> dict:
    """Issue 24: object / lesion-wise metrics on many objects, ours vs the replaced implementation."""
    result: dict = {"benchmark": "GlaS object metrics and lesion-wise metrics on instance-dense data, "
                                 "ours vs the implementation they replaced (benchmarks/metrics_reference.py)"}
    pred, gt = nuclei_case(NUCLEI_TILE, args.seed)
    unmatched = int(np.setdiff1d(np.unique(pred), np.unique(pred[gt > 0])).size) - 1  # minus background
    result["glas_tile"] = {
        "size": NUCLEI_TILE, "gt_objects": int(gt.max()), "pred_objects": int(pred.max()),
        "pred_objects_overlapping_no_gt": unmatched,
        **_compare(f"GlaS object metrics, {NUCLEI_TILE}² tile, {gt.max()} GT / {pred.max()} predicted objects "
                   f"({unmatched} unmatched)", glas_object_metrics,
                   reference.glas_object_metrics if args.reference_size >= NUCLEI_TILE else None,
                   (pred, gt), args.repeats, 2.0)}
    if args.reference_size < NUCLEI_TILE:
        small_pred, small_gt = nuclei_case(args.reference_size, args.seed)
        result["glas_reference_tile"] = {
            "size": args.reference_size, "gt_objects": int(small_gt.max()), "pred_objects": int(small_pred.max()),
            **_compare(f"GlaS object metrics, {args.reference_size}² tile (same density), {small_gt.max()} GT / "
                       f"{small_pred.max()} predicted objects", glas_object_metrics, reference.glas_object_metrics,
                       (small_pred, small_gt), args.repeats, None)}
    spacing = (1.0, 1.0, 1.0)
    for key, leak in (("lesions", False), ("lesions_leak", True)):
        pred, gt = lesions_case(seed=args.seed, leak=leak)
        what = f"{LESIONS} lesions in {'x'.join(map(str, LESION_SHAPE))}" + (" + a leak" if leak else "")
        result[f"brats23_{key}"] = _compare(f"BraTS 2023 lesion-wise, {what}", brats23_lesionwise,
                                            reference.brats23_lesionwise, (pred, gt, spacing), args.repeats, 3.0)
        if not leak:
            result["isles22_lesions"] = _compare(f"ISLES'22 lesion metrics, {what} (unchanged code)",
                                                 isles22_metrics, None, (pred, gt, spacing), args.repeats, 3.0)
            from deconver.metrics.conventions import robust_hd95

            result["brats23_lesions_challenge"] = _compare(
                f"BraTS 2023 lesion-wise, challenge convention (surface-distance HD95), {what}", brats23_lesionwise,
                None, (pred, gt, spacing), args.repeats, 3.0, kwargs={"hd95": robust_hd95})
    return result


def evaluate_part(args) -> dict:
    """Issue 24: `deconver evaluate` (by hand, GlaS preset) of a fold of six nuclei tiles; goal <= 30 s."""
    import tempfile

    from PIL import Image

    from deconver.config import load_preset
    from deconver.metrics.evaluate import evaluate_folder
    from deconver.metrics.parallel import available_cores

    workers = args.workers or available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        gt_dir, pred_dir = Path(tmp) / "gt", Path(tmp) / "pred"
        gt_dir.mkdir(), pred_dir.mkdir()
        objects = []
        for k in range(6):
            pred, gt = nuclei_case(NUCLEI_TILE, args.seed + k)
            objects.append([int(gt.max()), int(pred.max())])
            Image.fromarray(gt.astype(np.uint16)).save(gt_dir / f"testA_{k + 1}_anno.png")  # 16-bit instance map
            Image.fromarray((pred > 0).astype(np.uint8)).save(pred_dir / f"testA_{k + 1}.png")
        t0, cpu0 = time.perf_counter(), os.times()
        evaluate_folder(pred_dir, gt_dir, load_preset("glas"), Path(tmp) / "eval.csv", gt_suffix="_anno",
                        workers=workers)
        seconds, cpu1 = time.perf_counter() - t0, os.times()
    cpu = sum(b - a for a, b in zip(cpu0[:4], cpu1[:4]))  # this process and its (joined) workers
    print(f"evaluate of 6 nuclei tiles ({NUCLEI_TILE}², GT/predicted objects {objects}) on {workers} workers: "
          f"{seconds:.1f} s (CPU {cpu:.1f} s in all); goal <= 30 s met: {seconds <= 30}")
    return {"benchmark": "deconver evaluate (GlaS preset, by hand) of six 1000x1000 nuclei tiles",
            "objects_gt_pred": objects, "workers": workers, "seconds": seconds, "cpu_seconds": cpu,
            "goal": {"max_s": 30.0, "met": bool(seconds <= 30.0)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("brats", "dense", "evaluate"),
                        default=["brats", "dense", "evaluate"])
    parser.add_argument("--workers", type=int, default=None, help="evaluate part: worker processes (default: cores)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours (medpy: --medpy-repeats)")
    parser.add_argument("--medpy-repeats", type=int, default=1)
    parser.add_argument("--reference-size", type=int, default=400,
                        help="tile size (px) on which the replaced GlaS code is timed; >= 1000: the full tile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "metrics.json")
    args = parser.parse_args(argv)

    result: dict = {"seed": args.seed}
    if "brats" in args.parts:
        result["brats"] = brats_part(args)
    if "dense" in args.parts:
        result["dense"] = dense_part(args)
    if "evaluate" in args.parts:
        result["evaluate"] = evaluate_part(args)
    result["provenance"] = provenance("cpu")
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
