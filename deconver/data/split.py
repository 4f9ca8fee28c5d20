"""`deconver split`: the fold file every model of a study reads (nothing re-splits).

kfold: deterministic stratified k-fold. Cases are ranked by their stratification value (foreground
voxels from the prepared manifest: lesion volume, vessel area …; ties broken by a seeded shuffle), cut
into quantile bins of equal size, shuffled within each bin with the seed and dealt to the folds in turn,
continuing across bins, so every fold gets a share of each bin and fold sizes differ by at most one.
official: the dataset's own train/test split (GlaS train vs testA+testB, FIVES train vs test) as a
single fold whose "val" is the official test set.
authors: the Deconver authors' published folds (ISLES'22, BraTS'23, FIVES; `deconver.data.author_split`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from deconver.config import SPLIT_METHODS
from deconver.data.records import DatasetError


def make_folds(ids: list[str], strata: list[float] | None, num_folds: int, seed: int,
               num_bins: int | None = None) -> list[dict]:
    """[{"fold": k, "train": [ids], "val": [ids]}] for k in 0..num_folds-1 (ids sorted inside each list).

    num_bins: quantile bins of the stratification value (default min(5, len(ids) // num_folds)).
    """
    n = len(ids)
    if len(set(ids)) != n:
        raise DatasetError("duplicate case ids given to make_folds")
    if num_folds < 2:
        raise ValueError(f"num_folds must be at least 2, got {num_folds}")
    if n < num_folds:
        raise DatasetError(f"{n} cases cannot be split into {num_folds} folds")
    values = np.zeros(n) if strata is None else np.asarray(strata, dtype=np.float64)
    if values.shape != (n,):
        raise ValueError(f"strata has {values.shape} entries for {n} ids")
    order = sorted(range(n), key=lambda i: ids[i])  # independent of the order the caller gives
    ids, values = [ids[i] for i in order], values[order]
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(n)
    ranked = sorted(range(n), key=lambda i: (values[i], tiebreak[i]))
    bins = num_bins or max(1, min(5, n // num_folds))
    assignment: dict[int, list[str]] = {k: [] for k in range(num_folds)}
    position = 0
    for chunk in np.array_split(np.asarray(ranked), bins):
        for i in rng.permutation(chunk):
            assignment[position % num_folds].append(ids[int(i)])
            position += 1
    folds = []
    for k in range(num_folds):
        val = sorted(assignment[k])
        train = sorted(x for j in range(num_folds) if j != k for x in assignment[j])
        folds.append({"fold": k, "train": train, "val": val})
    return folds


def official_folds(ids: list[str], subsets: list[str | None]) -> list[dict]:
    """One fold: the official training subset vs the official test subset(s)."""
    train = sorted(i for i, s in zip(ids, subsets) if s == "train")
    val = sorted(i for i, s in zip(ids, subsets) if s and s != "train")
    unknown = [i for i, s in zip(ids, subsets) if not s]
    if unknown or not train or not val:
        raise DatasetError("the official split needs every case to carry its subset (train / test…); "
                           f"{len(unknown)} have none, {len(train)} train, {len(val)} test")
    return [{"fold": 0, "train": train, "val": val}]


def split_prepared(prepared, *, dataset: str, num_folds: int, seed: int, method: str = "kfold") -> dict:
    """The fold-file content for a PreparedDataset (without provenance)."""
    from deconver.data.cache import PreparedDataset

    ds = prepared if isinstance(prepared, PreparedDataset) else PreparedDataset(prepared)
    ids = ds.case_ids
    if method == "official":
        if not ds.preset.official_split:
            raise DatasetError(f"dataset {dataset!r} (preset {ds.preset_name!r}) has no official split; use kfold")
        folds = official_folds(ids, [ds.subset(i) for i in ids])
        num_folds = 1
    elif method == "authors":
        from deconver.data.author_split import author_folds

        folds = author_folds(ds.preset.reader, ids, num_folds)
    elif method == "kfold":
        stratify = ds.preset.stratify != "none"
        folds = make_folds(ids, [ds.strata(i) for i in ids] if stratify else None, num_folds, seed)
    else:
        raise ValueError(f"method must be 'kfold', 'official' or 'authors', got {method!r}")
    return {"dataset": dataset, "seed": seed, "num_folds": num_folds, "method": method, "folds": folds}


def write_split(content: dict, path: Path) -> bool:
    """Write the fold file atomically unless an identical one is there; True when written."""
    from deconver.io import provenance, read_record, write_json_atomic

    old = read_record(path)
    if old is not None and {k: old.get(k) for k in content} == content:
        return False
    write_json_atomic(path, {**content, "provenance": provenance("cpu")})
    return True


def load_split(path: str | Path) -> dict:
    """A fold file, checked (every fold's train and val disjoint)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read fold file ({err})") from None
    for fold in data.get("folds", []):
        if set(fold["train"]) & set(fold["val"]):
            raise DatasetError(f"{path}: fold {fold['fold']} has cases in both train and val")
    return data


def fold_cases(path: str | Path, fold: int) -> tuple[list[str], list[str]]:
    """(train ids, val ids) of fold `fold` of a fold file (checked by `load_split`); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} not found: run `deconver split` for this dataset first")
    folds = {f.get("fold"): f for f in load_split(path).get("folds", [])}
    if fold not in folds:
        raise DatasetError(f"{path}: has no fold {fold} (folds {sorted(folds)}); rerun `deconver split` "
                           "with the study's num_folds")
    return [str(c) for c in folds[fold]["train"]], [str(c) for c in folds[fold]["val"]]


# --------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="study config (YAML); uses study.seed, study.num_folds and the dataset's "
                        "split (datasets.<d>.split, else study.split)")
    parser.add_argument("--dataset", help="dataset name in the study")
    parser.add_argument("--prepared", help="hand use: prepared cache folder (instead of --config)")
    parser.add_argument("--out", help="hand use: fold file to write")
    parser.add_argument("--num-folds", type=int, help="number of folds (default: the study's, else 5)")
    parser.add_argument("--seed", type=int, help="seed (default: the study's, else 123)")
    parser.add_argument("--method", choices=SPLIT_METHODS, help="default: the study's split, else kfold")


def run(args: argparse.Namespace) -> int:
    from deconver.config import load_study
    from deconver.data.cache import PreparedDataset
    from deconver.paths import StudyPaths
    from deconver.steps import named_input, pipeline_mode

    if pipeline_mode(args, pipeline=["dataset"], by_hand=["prepared", "out"]):
        study = load_study(args.config)
        study.preset(args.dataset)
        paths = StudyPaths.of(study)
        prepared = named_input(args.prepared, "--prepared") or paths.prepared(args.dataset)
        out = Path(args.out) if args.out else paths.split(args.dataset)
        num_folds, seed, method = study.num_folds, study.seed, study.split_method(args.dataset)
    else:
        prepared, out = named_input(args.prepared, "--prepared"), Path(args.out)
        num_folds, seed, method = 5, 123, "kfold"
    num_folds = args.num_folds or num_folds
    seed = seed if args.seed is None else args.seed
    method = args.method or method
    ds = PreparedDataset(prepared)
    content = split_prepared(ds, dataset=args.dataset or ds.dataset, num_folds=num_folds, seed=seed, method=method)
    written = write_split(content, out)
    sizes = [len(f["val"]) for f in content["folds"]]
    print(f"{out}: {'written' if written else 'up to date'} ({method}, {content['num_folds']} fold(s), val sizes {sizes})")
    return 0
