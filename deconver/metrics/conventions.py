"""Named metric conventions: the same predictions scored the suite's way, the authors' way and the challenges'.

Every row of ``evaluation.csv`` names its convention in the ``convention`` column (docs/metrics.md,
"Conventions"); metric names stay the same across conventions (``dice``, ``hd95`` …), so a table or a
ranking picks a convention by that column alone.

* ``suite`` — native grid, true spacing (mm in 3D, px in 2D), HD95 = max of the two directed 95th
  percentiles over voxel-centre surfaces, the preset's explicit empty-mask rule; the challenge metrics as
  the suite computes them.
* ``authors`` — what the authors' MONAI evaluator reports: Dice and HD95 on the *prepared* grid (the
  thresholded channels against the prepared label), HD95 without spacing (voxels of the resampled grid),
  Dice 1 when both masks are empty, cases with an empty side dropped from HD95 (MONAI's NaN, skipped by
  its mean): the ``exclude`` rule.
* ``challenge`` — the challenge's official definitions: BraTS 2023 whole-region and lesion-wise Dice and
  HD95 with the surface-distance package's robust Hausdorff (surfels on the voxel-corner grid,
  area-weighted, percentile without interpolation; penalty 374, both empty Dice 1 / HD95 0); ISLES'22 as
  the suite; GlaS object F1 undefined (NaN) when no object matches, with the count of such cases.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

CONVENTIONS: dict[str, str] = {
    "suite": "native grid, true spacing (mm in 3D, px in 2D); HD95 = max of the directed 95th percentiles over "
             "voxel-centre surfaces; the preset's empty-mask rule",
    "authors": "the authors' MONAI evaluator: Dice and HD95 on the prepared grid, HD95 in voxels of that grid, "
               "both empty Dice 1, a case with an empty side dropped from HD95 (rule exclude)",
    "challenge": "the challenge's official code: BraTS 2023 whole-region and lesion-wise HD95 with the "
                 "surface-distance robust Hausdorff (penalty 374); ISLES'22 as the suite; GlaS object F1 NaN "
                 "when no object matches",
}
AUTHORS_HD_IMPL = "monai-hd95-voxels"          # MONAI compute_hausdorff_distance(percentile=95), no spacing
CHALLENGE_HD_IMPL = "surface-distance-robust-hd95"  # DeepMind surface_distance.compute_robust_hausdorff(…, 95)


def conventions_for(preset) -> dict[str, str]:
    """The conventions `deconver evaluate` writes for a preset (challenge only where it names a challenge)."""
    names = ["suite", "authors"] + (["challenge"] if preset.metrics.challenge else [])
    return {n: CONVENTIONS[n] for n in names}


AGGREGATION_ONLY = ("empty_rule", "hd95_penalty")  # preset.metrics keys applied when pooling, not when evaluating


def metric_settings(preset) -> dict:
    """What decides an evaluation's values besides its files (``evaluation.json`` ``metric_settings``): the
    HD implementation, the regions, the conventions written and the preset's metric keys except the
    aggregation-only ones. The report flags a dataset whose runs differ in it (``deconver.report.settings``)."""
    from deconver.metrics.surface import HD_IMPL

    rules = preset.metrics.model_dump(mode="json")
    return {"hd_impl": HD_IMPL, "labels": preset.labels, "conventions": sorted(conventions_for(preset)),
            **{k: v for k, v in rules.items() if k not in AGGREGATION_ONLY}}


def convention_rule(convention: str, rule: str, penalty: Any, challenge: str | None = None) -> tuple[str, Any]:
    """(empty-mask rule, penalty) applied when aggregating a convention's rows: the preset's for ``suite``,
    ``exclude`` for ``authors`` (MONAI's NaN-skipping mean), BraTS' 374 penalty for the BraTS challenge."""
    if convention == "authors":
        return "exclude", penalty
    if convention == "challenge":
        return "penalize", 374.0 if challenge == "brats23" else penalty
    return rule, penalty


# --------------------------------------------------------------------------- per-case rows
def _empty_raw(p: np.ndarray, g: np.ndarray) -> float | None:
    """The raw value of a distance with an empty side (NaN both, +inf one; the rules decide later), else None."""
    if not p.any() and not g.any():
        return math.nan
    if not p.any() or not g.any():
        return math.inf
    return None


def _dice(p: np.ndarray, g: np.ndarray) -> float:
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    return math.nan if total == 0 else 2.0 * int(np.count_nonzero(p & g)) / total


def authors_rows(base: dict, names: Sequence[str], pred_masks: np.ndarray, gt_masks: np.ndarray) -> list[dict]:
    """Rows of the ``authors`` convention: each output channel on the prepared grid (``pred_masks`` and
    ``gt_masks`` (K, *S) bool), Dice and MONAI's HD95 without spacing (voxels)."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    from deconver.metrics.surface import diagonal

    rows = []
    shape = pred_masks.shape[1:]
    common = {**base, "convention": "authors", "spacing": "x".join("1" for _ in shape), "hd_impl": AUTHORS_HD_IMPL,
              "diagonal": diagonal(shape)}
    for name, p, g in zip(names, pred_masks.astype(bool), gt_masks.astype(bool)):
        hd = _empty_raw(p, g)
        if hd is None:
            hd = float(compute_hausdorff_distance(torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None],
                                                  include_background=True, percentile=95)[0, 0])
        flags = {"region": name, "gt_voxels": int(g.sum()), "pred_voxels": int(p.sum()),
                 "gt_empty": not g.any(), "pred_empty": not p.any()}
        rows.append({**common, **flags, "metric": "dice", "value": _dice(p, g), "unit": "ratio"})
        rows.append({**common, **flags, "metric": "hd95", "value": hd, "unit": "vox"})
    return rows


def robust_hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 by the BraTS 2023 code's definition: DeepMind ``surface_distance.compute_robust_hausdorff``
    (surfels on the voxel-corner grid, area-weighted, percentile without interpolation); NaN both empty,
    +inf one empty (the package itself fails on empty masks under NumPy 2)."""
    import surface_distance

    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    empty = _empty_raw(p, g)
    if empty is not None:
        return empty
    distances = surface_distance.compute_surface_distances(g, p, tuple(float(s) for s in spacing))
    return float(surface_distance.compute_robust_hausdorff(distances, 95))


def challenge_rows(base: dict, region: str, p: np.ndarray, g: np.ndarray, spacing: Sequence[float], unit: str,
                   challenge: str, gt_instances: np.ndarray | None = None) -> list[dict]:
    """Rows of the ``challenge`` convention for one region (masks on the native grid)."""
    from deconver.metrics.challenge import brats23_lesionwise, glas_object_metrics, isles22_metrics, label_components

    common = {**base, "convention": "challenge", "region": region, "gt_voxels": int(g.sum()),
              "pred_voxels": int(p.sum()), "gt_empty": not g.any(), "pred_empty": not p.any()}
    rows = [{**common, "metric": "dice", "value": _dice(p, g), "unit": "ratio"}]
    if challenge == "brats23":
        rows.append({**common, "metric": "hd95", "value": robust_hd95(p, g, spacing), "unit": unit,
                     "hd_impl": CHALLENGE_HD_IMPL})
        extra = brats23_lesionwise(p, g, spacing, hd95=robust_hd95)
    elif challenge == "isles22":
        extra = isles22_metrics(p, g, spacing)
    else:  # glas: F1 is undefined (NaN) when no object matches, as in the official evaluation
        inst = gt_instances if gt_instances is not None else label_components(g)[0]
        extra = glas_object_metrics(label_components(p)[0], np.where(g, inst, 0))
        if extra["glas_tp"] == 0 and (p.any() or g.any()):
            extra["glas_object_f1"] = math.nan
    for name, value in extra.items():
        kind = "count" if name.endswith(("_tp", "_fp", "_fn", "count_diff")) else "ratio"
        metric_unit = {"isles22_volume_diff_ml": "ml", "brats23_lw_hd95": unit, "glas_object_hausdorff": "px"}.get(name, kind)
        rows.append({**common, "metric": name, "value": float(value), "unit": metric_unit,
                     **({"hd_impl": CHALLENGE_HD_IMPL} if name == "brats23_lw_hd95" else {})})
    return rows


# --------------------------------------------------------------------------- inputs of a pipeline run
def run_loaders(prepared, preset, pred_dir, case: str) -> dict[str, Any]:
    """`CaseInput` loaders of one case of a run: its predicted region masks from their own channels (when
    ``metrics.region_source`` is ``channels``) and its masks on the prepared grid (the ``authors`` convention),
    both from the files `deconver predict` writes beside the label map (`mask_paths`)."""
    from deconver.engine.labels import LabelCodec
    from deconver.engine.predict import mask_paths

    codec = LabelCodec.from_preset(preset)
    prepared_path, channels_path = mask_paths(pred_dir, prepared.case(case))
    use_channels = preset.task == "regions" and preset.metrics.region_source == "channels"
    # label maps placed by hand (not by `deconver predict`) have neither file: suite and challenge only
    return {"load_regions": (lambda: region_masks(channels_path, codec.names))
            if use_channels and channels_path.is_file() else None,
            "load_prepared": (lambda: prepared_pair(prepared, codec, case, prepared_path))
            if prepared_path.is_file() else None}


def _need(path, case: str):
    from deconver.metrics.evaluate import EvaluationError

    if not path.is_file():
        raise EvaluationError(f"case {case}: {path} not found (`deconver predict` writes it beside the label map; "
                              "predict this run again)")


def region_masks(path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Region -> predicted mask on the native grid, from a bitmask file (bit k = output k)."""
    from deconver.metrics.evaluate import read_label_file

    _need(path, path.name)
    bits, _ = read_label_file(path)
    return {name: (bits >> k) & 1 == 1 for k, name in enumerate(names)}


def prepared_pair(prepared, codec, case: str, path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(output names, predicted masks (K, *S), ground-truth masks (K, *S)) of a case on the prepared grid."""
    import torch

    _need(path, case)
    with np.load(path) as f:
        masks = f["masks"].astype(bool)
    label = torch.from_numpy(prepared.load(case)[1][None])
    if codec.task == "multiclass":
        idx = codec.encode(label)[0, 0].numpy()
        gt = np.stack([idx == i + 1 for i in range(len(codec.names))])
    else:
        gt = codec.masks(label)[0].numpy()
    if masks.shape != gt.shape:
        from deconver.metrics.evaluate import EvaluationError

        raise EvaluationError(f"case {case}: {path} holds masks {masks.shape}, the prepared label gives {gt.shape}")
    return list(codec.names), masks, gt
