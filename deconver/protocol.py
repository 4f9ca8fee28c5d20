"""`deconver protocol`: the fully resolved recipe of a (study, dataset[, model]) run, in one document.

Everything is read from the objects the steps themselves use (the study's merged preset, the prepare
steps of `deconver.data.preprocess.preprocessing_specs`, the training chain of
`deconver.engine.datamodule.train_transform_specs`, the metric conventions of
`deconver.metrics.conventions`), so the recipe cannot drift from what runs. `deconver train` writes it as
``protocol.json`` beside each run's checkpoints; docs/protocol.md compares it with the authors' bundles.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deconver.config import REPO_ROOT, Study, load_study

DEFAULT_STUDY = REPO_ROOT / "config" / "paper.yaml"


def _fold_sizes(study: Study, dataset: str, paths) -> dict[str, Any]:
    """Fold sizes from the fold file when it exists, else from the authors' file, else how they will be made."""
    method = study.split_method(dataset)
    out: dict[str, Any] = {"method": method, "num_folds": 1 if method == "official" else study.num_folds,
                           "folds_run": list(study.folds), "seed": study.seed}
    path = paths.split(dataset)
    if path.is_file():
        data = json.loads(path.read_text())
        out["fold_file"] = str(path)
        out["val_sizes"] = [len(f["val"]) for f in data.get("folds", [])]
        out["train_sizes"] = [len(f["train"]) for f in data.get("folds", [])]
    elif method == "authors":
        from deconver.data.author_split import load_author_folds

        data = load_author_folds(study.preset(dataset).reader)
        sizes = [sum(1 for f in data["folds"].values() if f == k) for k in range(data["num_folds"])]
        out.update(source=data["source"], val_sizes=sizes, train_sizes=[sum(sizes) - s for s in sizes])
    else:
        out["val_sizes"] = ("made by `deconver split` from the prepared cases: "
                            + ("official train vs test" if method == "official" else
                               "stratified on foreground voxels, sizes differ by at most one"))
    return out


def resolve_protocol(study: Study | str | Path | dict, dataset: str, model: str | None = None, *,
                     paths=None, preset=None) -> dict[str, Any]:
    """The recipe as a JSON-ready dict (sections in the order a run goes through them); `paths` (a
    `StudyPaths`, default the study's from the current directory) locates the fold file; `preset` replaces
    the study's (a run's, with `--max-epochs` applied)."""
    from deconver.data.preprocess import preprocessing_specs
    from deconver.engine.datamodule import train_transform_specs
    from deconver.engine.labels import LabelCodec
    from deconver.metrics.conventions import conventions_for
    from deconver.paths import StudyPaths

    study = study if isinstance(study, Study) else load_study(study)
    paths = paths or StudyPaths.of(study)
    preset = preset or study.preset(dataset)
    p, m = preset.protocol, preset.metrics
    codec = LabelCodec.from_preset(preset)
    sigmoid = preset.task != "multiclass"
    recipe: dict[str, Any] = {
        "study": study.study, "dataset": dataset, "preset": preset.name, "model": model,
        "model_kwargs": study.model_kwargs(dataset, model) if model else None,
        "data": {"reader": preset.reader, "channels": list(preset.channels), "task": preset.task,
                 "labels": {k: list(v) for k, v in preset.labels.items()},
                 "outputs": (f"{preset.out_channels} sigmoid channel(s), one per label entry" if sigmoid else
                             f"softmax over background + {len(preset.labels)} classes")},
        "preprocessing": preprocessing_specs(preset),
        "training_transforms": [{"transform": name, **kwargs}
                                for name, kwargs in train_transform_specs(p, preset.spatial_dims)],
        "crop_sampling": ({"mode": "uniform", "transform": "RandSpatialCropd",
                           "note": "one crop per sample, every position equally likely (the authors' bundles)"}
                          if p.crop == "uniform" else
                          {"mode": "posneg", "transform": "RandCropByPosNegLabeld", "pos": p.pos_neg_ratio, "neg": 1.0}),
        "loss": ({"name": p.loss, "terms": "soft Dice (sigmoid, squared denominators) + per-channel BCE on logits",
                  "implementation": "deconver.engine.losses.SigmoidDiceBCELoss"} if sigmoid else
                 {"name": p.loss, "implementation": "monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, "
                                                    "squared_pred=True)"}),
        "optimizer": {"name": "AdamW", "lr": p.lr, "weight_decay": p.weight_decay},
        "schedule": {"name": "monai.optimizers.WarmupCosineSchedule", "stepped": "per epoch",
                     "warmup_epochs": p.warmup_epochs, "warmup_multiplier": p.warmup_start_factor,
                     "t_total": p.epochs + 1},
        "training": {"epochs": p.epochs, "batch_size": p.batch_size,
                     "steps_per_epoch": p.steps_per_epoch or "one pass over the training cases",
                     "precision": p.precision, "accumulate_grad_batches": p.accumulate_grad_batches,
                     "seed": study.seed, "deterministic": study.trainer.deterministic},
        "validation": {"every_epochs": p.val_every, "also_after_last_epoch": True,
                       "cases": f"the first {p.val_cases} of the fold's validation cases" if p.val_cases else "all",
                       "metric": "MONAI Dice per output on the prepared grid (empty/empty = 1), mean = val/dice",
                       "inference": "as `inference` below"},
        "checkpoint": {"predictions_use": "final.ckpt (the last epoch)",
                       "also_kept": ["checkpoints/best.ckpt (best val/dice)", "checkpoints/last.ckpt"]},
        "inference": {"transform": "monai.inferers.sliding_window_inference", "roi_size": list(p.roi_size),
                      "overlap": p.sw_overlap, "mode": p.sw_mode, "sw_batch_size": p.sw_batch_size},
        "postprocessing": {"activation": "sigmoid" if sigmoid else "softmax",
                           "threshold": p.threshold if sigmoid else None,
                           "to_native_grid": "probabilities put back with deconver.data.to_native (linear), "
                                             "then discretized"},
        "label_decoding": _decoding(preset, codec),
        "metrics": {"conventions": conventions_for(preset), "empty_rule": m.empty_rule,
                    "hd95_penalty": m.hd95_penalty, "nsd_tolerance": m.nsd_tolerance, "challenge": m.challenge,
                    "region_source": m.region_source if preset.task == "regions" else None},
        "split": _fold_sizes(study, dataset, paths),
    }
    return recipe


def _decoding(preset, codec) -> dict[str, Any]:
    if preset.task == "binary":
        return {"rule": f"channel > threshold -> {codec.values[0][0]}, else 0"}
    if preset.task == "multiclass":
        return {"rule": "argmax over background + classes -> the class's first label value"}
    if preset.protocol.region_decoding == "priority":
        return {"rule": "priority (the authors' inference.yaml)",
                "order": [{"region": n, "value": v} for n, v in codec.priority_values()]}
    return {"rule": "match: the label value whose region membership agrees with most thresholded channels "
                    "(ties by likelihood)"}


def format_protocol(recipe: dict[str, Any]) -> str:
    """A readable listing of the recipe (the JSON holds the same)."""
    lines = [f"protocol of {recipe['dataset']} (preset {recipe['preset']}) in study {recipe['study']}"
             + (f", model {recipe['model']}" if recipe["model"] else "")]

    def show(value) -> str:
        return json.dumps(value) if not isinstance(value, str) else value

    for section, value in recipe.items():
        if section in ("study", "dataset", "preset", "model") or value is None:
            continue
        lines.append(f"\n{section}:")
        if isinstance(value, list):
            for i, item in enumerate(value, 1):
                if isinstance(item, dict):
                    head = item.get("transform") or item.get("name") or item.get("step")
                    rest = ", ".join(f"{k}={show(v)}" for k, v in item.items() if k not in ("transform",))
                    lines.append(f"  {i}. {head}: {rest}")
                else:
                    lines.append(f"  {i}. {show(item)}")
        elif isinstance(value, dict):
            for k, v in value.items():
                lines.append(f"  {k}: {show(v)}")
        else:
            lines.append(f"  {show(value)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Print the fully resolved training and evaluation recipe of a dataset in a study: "
                          "preprocessing steps in order, the training transforms with every parameter, crop "
                          "sampling, loss, optimizer, schedule, epochs and steps, validation and checkpoint, "
                          "inference, post-processing, label decoding, metric conventions, split and fold sizes.")
    parser.add_argument("--config", default=str(DEFAULT_STUDY),
                        help="study config (YAML); default: the paper's study, config/paper.yaml")
    parser.add_argument("--dataset", required=True, help="dataset name in the study")
    parser.add_argument("--model", help="also resolve this model's keyword arguments")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the listing")


def run(args: argparse.Namespace) -> int:
    recipe = resolve_protocol(args.config, args.dataset, args.model)
    print(json.dumps(recipe, indent=2) if args.json else format_protocol(recipe))
    return 0
