"""`deconver preset --from ROOT`: a commented dataset preset planned from the data's fingerprint.

The rules (docs/data.md, "Presets from the data"), after nnU-Net's experiment planning (Isensee et al.,
Nat. Methods 18, 2021), on the fingerprint of `deconver.data.fingerprint`:

* target spacing: the median spacing per axis; for anisotropic data (coarsest axis > 3x the finest and
  < 1/3 of its voxels) the coarsest axis takes the 10th percentile of its spacings instead. ``null``
  (no resampling) when every fingerprinted case already lies on that spacing; 2D keeps the pixel grid.
* roi: the median cropped shape at the target spacing, each axis rounded down to a multiple of the
  divisor every model considered needs (their least common multiple, at least their minimum roi), then
  shrunk along the physically longest axis until it holds at most 128^3 voxels (3D) / 512^2 (2D).
* batch: 2^22 voxels per batch (2 x 128^3, 16 x 512^2, the BraTS and FIVES presets), at most 5 % of the
  dataset's voxels per batch (nnU-Net), at least 2 (and any model's minimum).
* normalisation: every channel named CT -> clip to the foreground's 0.5-99.5 percentiles, z-score with
  the foreground mean and std (``normalize: ct``); otherwise z-score per channel on non-zero voxels.
* task and labels from dataset.json (plain classes -> multiclass, region labels -> regions); flips off
  when two label entries lie in a fixed order along an axis (>= 90 % of cases, >= 2 voxels apart), since a
  flip would swap them (anterior/posterior, left/right); stratify by foreground volume; the official split
  when labelled test cases exist; NSD tolerance one voxel of the coarsest axis.

A study naming a dataset by `root` only gets this preset too (`study_preset`), written once to
``<results>/<study>/presets/<dataset>.yaml`` and reused while the data files and the models are unchanged.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deconver.data.fingerprint import DEFAULT_MAX_CASES, dataset_fingerprint
from deconver.data.records import DatasetError

PLANNER_VERSION = 1
BATCH_VOXELS = 2 ** 22
ROI_VOXELS = {3: 128 ** 3, 2: 512 ** 2}
DATASET_SHARE = 0.05
MIN_BATCH = 2
ANISOTROPY = 3.0
ORDER_SHARE, ORDER_VOXELS = 0.9, 2.0
_KEY_RE = re.compile(r"^# cache key: ([0-9a-f]+)$", re.MULTILINE)


# --------------------------------------------------------------------------- model constraints
def model_constraints(dims: int, models: list[tuple[str, dict]] | None, model_dirs=()) -> dict[str, Any]:
    """Divisor (per-axis least common multiple), minimum roi and batch over `models` ((name, kwargs);
    None: every registered model supporting `dims`)."""
    from deconver import registry

    registry.discover(model_dirs)
    if models is None:
        models = [(n, {}) for n in registry.list_models() if dims in registry.model_info(n).dims]
    div, min_roi, min_batch, used = [1] * dims, [1] * dims, 1, []
    for name, kwargs in models:
        info = registry.model_info(name)
        if dims not in info.dims:
            continue
        cons = info.constraints(dims, kwargs)
        div = [math.lcm(a, b) for a, b in zip(div, cons.divisor)]
        min_roi = [max(a, b) for a, b in zip(min_roi, cons.min_roi())]
        min_batch = max(min_batch, cons.min_batch)
        used.append(name)
    if not used:
        raise DatasetError(f"none of the models {[m for m, _ in models]} supports {dims}D data")
    return {"divisor": div, "min_roi": min_roi, "min_batch": min_batch, "models": used}


# --------------------------------------------------------------------------- rules
def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, bool]:
    """(target spacing, anisotropic) by nnU-Net's rule (see the module docstring)."""
    target = np.percentile(spacings, 50, axis=0)
    size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    aniso = target[worst] > ANISOTROPY * min(target[others]) and size[worst] * ANISOTROPY < min(size[others])
    if aniso:
        target[worst] = max(np.percentile(spacings[:, worst], 10), max(target[others]) + 1e-5)
    return target, bool(aniso)


def fit_roi(median: np.ndarray, spacing: np.ndarray, cons: dict, dims: int) -> list[int]:
    div, low = np.asarray(cons["divisor"]), np.asarray(cons["min_roi"])
    roi = np.maximum(np.maximum(div, np.floor(median / div) * div), low).astype(int)
    while np.prod(roi) > ROI_VOXELS[dims]:
        shrinkable = [i for i in range(dims) if roi[i] - div[i] >= max(div[i], low[i])]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda i: roi[i] * spacing[i])
        roi[axis] -= div[axis]
    return roi.tolist()


def ordered_pairs(fp: dict, names: list[str]) -> list[str]:
    """Label entries that lie in a fixed order along an axis (a flip would swap them)."""
    found = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            both = [(c[a], c[b]) for c in fp["centroids"] if c[a] is not None and c[b] is not None]
            if len(both) < 5:
                continue
            d = np.asarray([np.subtract(x, y) for x, y in both])
            for axis in range(d.shape[1]):
                share = max((d[:, axis] > 0).mean(), (d[:, axis] < 0).mean())
                if share >= ORDER_SHARE and np.median(np.abs(d[:, axis])) >= ORDER_VOXELS:
                    found.append(f"{names[a]}/{names[b]} along axis {axis} in {share:.0%} of cases")
    return found


def _x(values) -> str:
    return " x ".join(f"{v:g}" for v in values)


def plan_preset(fp: dict, name: str, cons: dict) -> tuple[dict, dict[str, str], list[str]]:
    """(preset mapping, comment per dotted key, header lines) from a fingerprint and model constraints."""
    dims = fp["spatial_dims"]
    shapes, spacings = np.asarray(fp["shapes"], float), np.asarray(fp["spacings"], float)
    notes: dict[str, str] = {}
    pre: dict[str, Any]
    if dims == 3:
        target, aniso = target_spacing(spacings, shapes)
        same = bool(np.all(np.abs(spacings - target) <= 1e-3 * target))
        pre = {"orientation": "RAS", "spacing": None if same else [round(float(t), 4) for t in target],
               "crop_foreground": True, "crop_margin": 0}
        notes["preprocessing.spacing"] = (
            f"every case already has the median spacing {_x(target)} mm: no resampling" if same else
            f"median spacing{' (anisotropic: coarsest axis at its 10th percentile)' if aniso else ''}")
        notes["preprocessing.crop_foreground"] = "crop to the non-zero box of the channels (as nnU-Net)"
    else:
        target = np.ones(2)
        pre = {"orientation": None, "spacing": None, "crop_foreground": False, "crop_margin": 0}
        notes["preprocessing.spacing"] = "2D images keep their pixel grid"
    median = np.percentile(shapes * spacings / target, 50, axis=0)
    ct = all(c.strip().lower() == "ct" for c in fp["channels"])
    if ct:
        pre["normalize"] = "ct"
        pre["ct_stats"] = [[round(i["p00_5"], 4), round(i["p99_5"], 4), round(i["mean"], 4), round(max(i["std"], 1e-8), 4)]
                           for i in fp["intensity"]]
        notes["preprocessing.normalize"] = "CT: clip to ct_stats' [low, high], z-score with its mean and std"
        notes["preprocessing.ct_stats"] = "per channel: foreground 0.5 / 99.5 percentiles, mean, std"
    else:
        pre["normalize"] = "zscore_nonzero"
        notes["preprocessing.normalize"] = "not CT: z-score per channel on non-zero voxels"

    roi = fit_roi(median, target, cons, dims)
    notes["protocol.roi_size"] = (f"median shape {_x(np.round(median))} rounded down to multiples of "
                                  f"{_x(cons['divisor'])} (models: {', '.join(cons['models'])})")
    voxels = math.prod(roi)
    dataset_voxels = float(np.mean(np.prod(shapes * spacings / target, axis=1))) * fp["num_training"]
    by_budget, by_share = BATCH_VOXELS // voxels, int(DATASET_SHARE * dataset_voxels // voxels)
    batch = max(MIN_BATCH, cons["min_batch"], min(by_budget, by_share))
    notes["protocol.batch_size"] = (f"min({by_budget} for 2^22 voxels, {by_share} for 5 % of the dataset), "
                                    f"at least {max(MIN_BATCH, cons['min_batch'])}")
    protocol: dict[str, Any] = {"roi_size": roi, "batch_size": int(batch)}
    names = list(fp["labels"])
    pairs = ordered_pairs(fp, names)
    if pairs:
        protocol["augmentation"] = {"flip_prob": 0.0}
        notes["protocol.augmentation"] = f"no flips: they would swap {'; '.join(pairs[:2])}"
    fg = np.asarray(fp["foreground_voxels"])
    preset = {
        "name": name,
        "description": f"{fp['dataset']}: {', '.join(fp['channels'])} -> {', '.join(names)} ({fp['task']}), "
                       "planned from the data",
        "reader": fp["reader"], "spatial_dims": dims, "channels": list(fp["channels"]), "task": fp["task"],
        "labels": fp["labels"],
        "stratify": "foreground_volume" if fg.any() else "none",
        "official_split": fp["num_test"] > 0,
        "preprocessing": pre, "protocol": protocol,
        "metrics": {"empty_rule": "penalize", "hd95_penalty": "diagonal",
                    "nsd_tolerance": round(float(max(target)), 3)},
    }
    notes["channels"] = "dataset.json's channel names, in index order"
    notes["task"] = ("plain classes: softmax over background + classes" if fp["task"] == "multiclass" else
                     "region labels: one sigmoid channel per region")
    notes["stratify"] = "folds balanced by foreground volume" if fg.any() else "no foreground to stratify by"
    notes["official_split"] = (f"{fp['num_test']} labelled test cases (imagesTs + labelsTs)" if fp["num_test"]
                               else "no labelled test cases")
    notes["metrics"] = "NSD tolerance: one voxel of the coarsest axis" + (" (mm)" if dims == 3 else " (px)")
    ff = np.asarray(fp["foreground_fraction"])
    header = [
        f"fingerprint of {fp['num_fingerprinted']} of {fp['num_training']} training cases "
        f"({fp['num_test']} labelled test cases):",
        f"  median shape {_x(np.percentile(shapes, 50, 0))} voxels (10th-90th percentile "
        f"{_x(np.percentile(shapes, 10, 0))} - {_x(np.percentile(shapes, 90, 0))}), "
        f"median spacing {_x(np.percentile(spacings, 50, 0))}" + (" mm" if dims == 3 else " px"),
        f"  foreground {100 * np.median(ff):.2f} % of the cropped volume (median; min {100 * ff.min():.2f} %), "
        f"crop keeps {100 * np.median(fp['crop_kept']):.0f} % of the voxels",
        *[f"  {i['channel']}: foreground mean {i['mean']:.4g}, std {i['std']:.4g}, "
          f"0.5-99.5 % [{i['p00_5']:.4g}, {i['p99_5']:.4g}]" for i in fp["intensity"]],
    ]
    return preset, notes, header


# --------------------------------------------------------------------------- YAML with comments
def _value(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render(preset: dict, notes: dict[str, str], header: list[str]) -> str:
    lines = [f"# {h}" for h in header] + [""]

    def line(indent: str, key: str, value, note: str | None) -> None:
        text = f"{indent}{key}: {_value(value)}"
        lines.append(f"{text:<44} # {note}" if note else text)

    for key, value in preset.items():
        if key in ("preprocessing", "protocol"):
            lines.append(f"{key}:")
            for sub, v in value.items():
                line("  ", sub, v, notes.get(f"{key}.{sub}"))
        else:
            line("", key, value, notes.get(key))
    return "\n".join(lines) + "\n"


def preset_text(root: str | Path, name: str, *, models: list[tuple[str, dict]] | None = None, model_dirs=(),
                max_cases: int = DEFAULT_MAX_CASES, command: str = "", progress: bool = False,
                key: str | None = None) -> str:
    """The commented YAML preset of the dataset at `root`, validated by the preset schema."""
    from deconver.config import DatasetPreset, _validate

    fp = dataset_fingerprint(root, max_cases=max_cases, progress=progress)
    cons = model_constraints(fp["spatial_dims"], models, model_dirs)
    preset, notes, header = plan_preset(fp, name, cons)
    header = [f"Dataset preset planned from the data{f' by `{command}`' if command else ''} "
              f"(planner v{PLANNER_VERSION}; rules: docs/data.md, \"Presets from the data\").",
              "Every value may be changed; the schema is deconver/config.py (DatasetPreset).",
              *([f"cache key: {key}"] if key else []), *header]
    text = render(preset, notes, header)
    parsed = yaml.safe_load(text)
    _validate(DatasetPreset, parsed, where=f"preset planned from {root}")
    if parsed != json.loads(json.dumps(preset)):
        raise RuntimeError("the rendered preset does not read back as planned")
    return text


def default_name(root: str | Path) -> str:
    """A preset name from the folder: Dataset042_Prostate / Task05_Prostate -> prostate."""
    stem = Path(root).resolve().name
    stem = re.sub(r"^(Dataset\d+|Task\d+)_", "", stem)
    return re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_") or "dataset"


# --------------------------------------------------------------------------- studies
def _cache_key(root: Path, models: list[tuple[str, dict]] | None, max_cases: int) -> str:
    from deconver.data.readers._common import walk_files

    files = [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in walk_files(root)]
    blob = json.dumps({"v": PLANNER_VERSION, "root": str(root), "files": files, "models": models,
                       "max_cases": max_cases}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def study_preset(study, dataset: str) -> dict:
    """The preset of a study's dataset named by root only: planned once, cached in the results folder."""
    from deconver.config import ConfigError
    from deconver.io import write_text_atomic
    from deconver.paths import StudyPaths

    entry = study.datasets[dataset]
    root = Path(entry.root).expanduser().resolve()
    names = entry.models if entry.models is not None else None if study.models == "all" else study.models
    models = None if names is None else [(m, study.model_kwargs(dataset, m)) for m in names]
    path = StudyPaths.of(study).preset(dataset)
    try:
        if not root.is_dir():
            raise DatasetError(f"dataset root {root} does not exist")
        key = _cache_key(root, models, DEFAULT_MAX_CASES)
        if path.is_file():
            text = path.read_text()
            m = _KEY_RE.search(text)
            if m and m.group(1) == key:
                return yaml.safe_load(text)
        print(f"deconver: planning a preset for {dataset} from the data in {root} (once)", file=sys.stderr)
        text = preset_text(root, dataset, models=models, model_dirs=study.model_dirs, key=key,
                           command=f"a study naming {dataset} by root only")
    except (DatasetError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"datasets.{dataset}.root: cannot plan a preset from {entry.root}: {err}") from None
    write_text_atomic(path, text)
    return yaml.safe_load(text)


# --------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Print a commented dataset preset planned from the data of an nnU-Net v2 (or MSD) "
                          "dataset: deconver preset --from ROOT --name N > config/datasets/N.yaml")
    parser.add_argument("--from", dest="root", required=True, metavar="ROOT", help="the dataset folder")
    parser.add_argument("--name", help="preset name (default: from the folder, Dataset042_Prostate -> prostate)")
    parser.add_argument("--models", help="comma-separated models whose divisors the roi must fit "
                        "(default: every registered model supporting the data's dims)")
    parser.add_argument("--model-dirs", nargs="*", default=[], help="extra folders of model files")
    parser.add_argument("--max-cases", type=int, default=DEFAULT_MAX_CASES,
                        help=f"training cases read for the fingerprint, evenly spread (default {DEFAULT_MAX_CASES})")
    parser.add_argument("--out", help="write the preset to this file (atomically) instead of printing it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from deconver.io import write_text_atomic
    from deconver.steps import UsageError, named_input

    named_input(args.root, "--from")
    if args.max_cases < 1:
        raise UsageError(f"--max-cases must be at least 1, got {args.max_cases}")
    name = args.name or default_name(args.root)
    models = [(m.strip(), {}) for m in args.models.split(",") if m.strip()] if args.models else None
    command = f"deconver preset --from {args.root} --name {name}" + (f" --models {args.models}" if args.models else "")
    text = preset_text(args.root, name, models=models, model_dirs=args.model_dirs, max_cases=args.max_cases,
                       command=command, progress=not args.no_progress)
    if args.out:
        write_text_atomic(args.out, text)
        print(f"{args.out}: preset {name!r} written", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
