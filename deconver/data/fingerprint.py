"""Dataset fingerprint: what the data say about themselves (shapes, spacings, intensities, foreground).

The fingerprint is taken on the grid `deconver prepare` trains on, with prepare's own code: each case is
loaded and checked (`loading.load_case`), reoriented to RAS and cropped to its non-zero box
(`deconver.data.preprocess` without resampling or normalisation), so shapes and spacings are in the axis order
of the roi. Per case: cropped shape and spacing, the share of voxels the crop keeps, foreground voxels
and fraction, up to 10,000 foreground intensities per channel (seeded), and the centroid of each label
entry. Summaries follow nnU-Net's dataset fingerprint (Isensee et al., Nat. Methods 18, 2021): medians
and percentiles over cases, intensity statistics over the pooled foreground samples.

`source_skeleton(root)` turns a dataset folder (nnU-Net v2 or MSD) into the parts of a preset its
dataset.json fixes (reader, spatial dims, channels, task, labels); the rules that make a preset from the
fingerprint are in `deconver.data.autopreset`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from deconver.data.records import DatasetError

SAMPLES_PER_CASE = 10_000  # foreground intensities kept per case and channel (as nnU-Net)
DEFAULT_MAX_CASES = 100    # cases read for the fingerprint (evenly spread); headers of all cases are read


def _identifier(name: str, taken: set[str]) -> str:
    """A label name usable as a metric and column name: lower case, [a-z0-9_]."""
    base = re.sub(r"[^a-z0-9_]+", "_", name.strip().lower()).strip("_") or "label"
    out, i = base, 2
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def source_skeleton(root: str | Path) -> dict[str, Any]:
    """The preset keys a dataset folder fixes: reader, spatial_dims, channels, task, labels (+ its folder).

    nnU-Net v2 datasets (dataset.json with ``file_ending``/``channel_names``) read with `nnunet`, MSD tasks
    (``modality`` + ``training``) with `msd`. Label names become identifiers (``whole tumor`` -> ``whole_tumor``).
    """
    from deconver.data.readers._common import check_root
    from deconver.data.readers.msd import _task_dir
    from deconver.data.readers.nnunet import FORMATS, channel_names, dataset_dir, load_spec, parse_labels

    root = check_root(Path(root))
    if _has_dataset(root, "Dataset"):
        folder = dataset_dir(root)
    elif (root / "dataset.json").is_file() or any(root.glob("Task*/dataset.json")):
        folder = _task_dir(root)
    else:
        raise DatasetError(f"no dataset.json in {root} (nor in one Dataset*/ or Task*/ folder inside it): "
                           "not an nnU-Net v2 dataset or MSD task folder")
    spec_path = folder / "dataset.json"
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{spec_path}: cannot read dataset.json: {err}") from None
    if "file_ending" in spec or "channel_names" in spec:
        folder, spec = load_spec(folder)
        task, labels = parse_labels(spec, spec_path)
        reader, dims = "nnunet", 2 if FORMATS[spec["file_ending"]] == "image2d" else 3
        channels = channel_names(spec, spec_path)
    elif "modality" in spec and "training" in spec:
        reader, dims, task = "msd", 3, "multiclass"
        channels = [str(spec["modality"][k]) for k in sorted(spec["modality"], key=int)]
        declared = {int(k): str(v) for k, v in spec.get("labels", {}).items()}
        labels = {v: [k] for k, v in sorted(declared.items()) if k != 0}
        if not labels:
            raise DatasetError(f"{spec_path}: labels declares no foreground label")
    else:
        raise DatasetError(f"{spec_path}: neither an nnU-Net v2 dataset.json (channel_names, labels, file_ending) "
                           "nor an MSD one (modality, labels, training)")
    taken: set[str] = set()
    labels = {_identifier(k, taken): v for k, v in labels.items()}
    return {"folder": folder, "reader": reader, "spatial_dims": dims, "channels": channels, "task": task,
            "labels": labels, "spec": spec}


def _has_dataset(root: Path, prefix: str) -> bool:
    """Whether `root` is (or holds) a dataset whose dataset.json looks like nnU-Net v2's."""
    candidates = [root] if (root / "dataset.json").is_file() else sorted(root.glob(f"{prefix}*"))
    for folder in candidates:
        try:
            spec = json.loads((folder / "dataset.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(spec, dict) and ("file_ending" in spec or "channel_names" in spec):
            return True
    return False


def skeleton_preset(skeleton: dict[str, Any], name: str = "fingerprint"):
    """A valid preset that reads the data onto the training grid without resampling or normalising."""
    from deconver.config import DatasetPreset

    dims = skeleton["spatial_dims"]
    pre = ({"orientation": "RAS", "spacing": None, "crop_foreground": True, "crop_margin": 0, "normalize": "none"}
           if dims == 3 else {"orientation": None, "spacing": None, "crop_foreground": False, "normalize": "none"})
    return DatasetPreset.model_validate({
        "name": name, "reader": skeleton["reader"], "spatial_dims": dims, "channels": skeleton["channels"],
        "task": skeleton["task"], "labels": skeleton["labels"], "preprocessing": pre,
        "protocol": {"roi_size": [1] * dims, "batch_size": 1}})


def case_fingerprint(case, preset, rng: np.random.Generator) -> dict[str, Any]:
    """One case's numbers on the training grid (see the module docstring)."""
    from deconver.data.loading import load_case
    from deconver.data.preprocess import preprocess

    loaded = load_case(case, preset)
    image, label, geometry = preprocess(loaded, preset)
    label = label[0]
    fg = label > 0
    samples = []
    for channel in image:
        values = channel[fg] if fg.any() else channel.ravel()
        if values.size > SAMPLES_PER_CASE:
            values = rng.choice(values, SAMPLES_PER_CASE, replace=False)
        samples.append(values.astype(np.float64))
    centroids = []
    for values in preset.labels.values():
        member = np.isin(label, values)
        centroids.append(np.argwhere(member).mean(0).tolist() if member.any() else None)
    oriented = math.prod(geometry["oriented_shape"])
    return {"id": case.id, "shape": geometry["cropped_shape"], "spacing": geometry["cropped_spacing"],
            "crop_kept": math.prod(geometry["cropped_shape"]) / oriented, "foreground_voxels": int(fg.sum()),
            "foreground_fraction": float(fg.mean()), "centroids": centroids, "samples": samples}


def dataset_fingerprint(root: str | Path, *, max_cases: int = DEFAULT_MAX_CASES, seed: int = 0,
                        progress: bool = False) -> dict[str, Any]:
    """The fingerprint of the labelled training cases of `root` (JSON-ready; per-case samples pooled)."""
    import torch
    from tqdm import tqdm

    from deconver.data.readers import read_dataset

    skeleton = source_skeleton(root)
    preset = skeleton_preset(skeleton)
    cases = read_dataset(preset, skeleton["folder"])
    train = [c for c in cases if c.subset in (None, "train")]
    test = [c for c in cases if c.subset == "test"]
    if not train:
        raise DatasetError(f"{skeleton['folder']}: no labelled training cases to take a fingerprint of")
    picked = [train[i] for i in sorted({round(x) for x in np.linspace(0, len(train) - 1, min(max_cases, len(train)))})]
    rng = np.random.default_rng(seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_case = [case_fingerprint(c, preset, rng) for c in tqdm(picked, desc="fingerprint", unit="case",
                                                                      disable=not progress)]
    finally:
        torch.set_num_threads(previous)
    intensity = []
    for ch, name in enumerate(skeleton["channels"]):
        pooled = np.concatenate([p["samples"][ch] for p in per_case])
        lo, p50, hi = np.percentile(pooled, [0.5, 50, 99.5])
        intensity.append({"channel": name, "mean": float(pooled.mean()), "std": float(pooled.std()),
                          "median": float(p50), "p00_5": float(lo), "p99_5": float(hi),
                          "min": float(pooled.min()), "max": float(pooled.max())})
    return {
        "root": str(Path(skeleton["folder"]).resolve()),
        "dataset": Path(skeleton["folder"]).name,
        "reader": skeleton["reader"], "spatial_dims": skeleton["spatial_dims"], "channels": skeleton["channels"],
        "task": skeleton["task"], "labels": skeleton["labels"],
        "num_training": len(train), "num_test": len(test), "num_fingerprinted": len(per_case),
        "shapes": [p["shape"] for p in per_case], "spacings": [p["spacing"] for p in per_case],
        "crop_kept": [p["crop_kept"] for p in per_case],
        "foreground_voxels": [p["foreground_voxels"] for p in per_case],
        "foreground_fraction": [p["foreground_fraction"] for p in per_case],
        "centroids": [p["centroids"] for p in per_case],
        "intensity": intensity,
    }
