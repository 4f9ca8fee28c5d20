"""`deconver evaluate`: per-case, per-region metrics of a prediction folder against the ground truth.

Two ways in:

* pipeline: ``deconver evaluate --config STUDY --dataset D --model M --fold K`` reads the fold's
  validation cases from the split file, their predictions ``<run>/predictions/<case>.nii.gz|.png``
  (label maps in the preset's label space, native grid) and the ground truth through the prepared
  manifest (``deconver.data.load_native_label`` / ``load_native_instances``), and writes
  ``<run>/evaluation.csv`` + ``<run>/evaluation.json`` (provenance and settings);
* by hand: ``deconver evaluate --pred-dir DIR --gt-dir DIR --preset P --out CSV`` pairs files by name.

Every region of the preset (region = union of its label values; for multiclass, each class) gets Dice,
HD95 and NSD (``deconver.metrics.surface``) in the native grid with the true spacing (mm in 3D; pixels
in 2D unless a spacing is known), plus the challenge's own metrics when ``preset.metrics.challenge`` is
set. Values are raw (NaN/inf kept); empty-mask rules are applied later by
``deconver.metrics.empty_rules.apply_rule``. A rerun with unchanged inputs is a no-op.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from deconver import __version__
from deconver.config import DatasetPreset, load_preset, load_study
from deconver.data.instances import read_instance_file
from deconver.io import atomic_path, provenance, read_record, write_json_atomic
from deconver.metrics.challenge import brats23_lesionwise, glas_object_metrics, isles22_metrics, label_components
from deconver.metrics.conventions import authors_rows, challenge_rows, metric_settings, run_loaders
from deconver.metrics.geometry import aligned_prediction
from deconver.metrics.surface import HD_DEFINITION, HD_IMPL, compare_masks, diagonal
from deconver.steps import StepError

COLUMNS = ["study", "dataset", "model", "fold", "case", "region", "metric", "value", "gt_voxels", "pred_voxels",
           "gt_empty", "pred_empty", "spacing", "unit", "hd_impl", "diagonal", "convention"]
LABEL_SUFFIXES = (".nii.gz", ".nii", ".png", ".bmp", ".tif", ".tiff", ".mha", ".nrrd")
SITK_SUFFIXES = (".mha", ".nrrd")  # 3D label maps read with SimpleITK (nnU-Net datasets, predictions of them)
CHALLENGE_UNITS = {"isles22_volume_diff_ml": "ml", "brats23_lw_hd95": "mm", "glas_object_hausdorff": "px"}


class EvaluationError(StepError, ValueError):
    """Inputs of an evaluation are missing or inconsistent; the message names the case or file."""


@dataclass(frozen=True)
class CaseInput:
    """One case to evaluate: where its prediction lies and how to load its ground truth."""

    case: str
    pred_path: Path
    load_gt: Callable[[], tuple[np.ndarray, tuple[float, ...] | None]]
    load_instances: Callable[[], np.ndarray] | None = None
    gt_key: str = ""  # what identifies the ground truth, for the rerun fingerprint
    load_pred: Callable[[], tuple[np.ndarray, tuple[float, ...] | None]] | None = None  # default: read pred_path
    load_regions: Callable[[], dict] | None = None  # region -> native mask from its own channel (region_source)
    load_prepared: Callable[[], tuple] | None = None  # (names, pred, gt masks) on the prepared grid: convention authors


# --------------------------------------------------------------------------- files
def case_id_of(path: Path, suffix: str = "") -> str:
    """File name without its image extension (and without `suffix`, e.g. '_anno')."""
    name = path.name
    for ext in LABEL_SUFFIXES:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    if suffix and name.endswith(suffix):
        name = name[: -len(suffix)]
    return name


def read_label_file(path: str | Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """A label map as integers, with its spacing (NIfTI zooms; None for 2D image files)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"label file not found: {path}")
    name = path.name.lower()
    try:
        if name.endswith((".nii.gz", ".nii")):
            import nibabel as nib

            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
            while data.ndim > 3 and data.shape[-1] == 1:
                data = data[..., 0]
            if data.ndim not in (2, 3):
                raise EvaluationError(f"{path}: expected a 2D or 3D label map, got shape {data.shape}")
            spacing = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
        elif name.endswith(SITK_SUFFIXES):
            import SimpleITK as sitk

            img = sitk.ReadImage(str(path))
            data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # x, y, z as nibabel gives it
            spacing = tuple(float(s) for s in img.GetSpacing())
        else:
            from PIL import Image

            with Image.open(path) as im:
                data = np.asarray(im)
            if data.ndim == 3:  # RGB(A) label image: channel 0 carries the label
                data = data[..., 0]
            spacing = None
    except EvaluationError:
        raise
    except Exception as err:  # unreadable / truncated files
        raise EvaluationError(f"cannot read label file {path}: {err}") from err
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise EvaluationError(f"{path}: label map contains NaN or inf")
        data = np.rint(data)
    return data.astype(np.int64, copy=False), spacing


def find_label_file(directory: Path, case: str) -> Path | None:
    for ext in LABEL_SUFFIXES:
        candidate = directory / f"{case}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _file_key(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


# --------------------------------------------------------------------------- metrics of one case
def _spacing_and_unit(ndim: int, spacing: Sequence[float] | None) -> tuple[tuple[float, ...], str]:
    """3D: mm with the true spacing. 2D: pixels unless a real (non-unit) spacing is known."""
    if spacing is None:
        if ndim == 3:
            raise EvaluationError("3D ground truth without voxel spacing")
        return (1.0,) * ndim, "px"
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim:
        raise EvaluationError(f"spacing {sp} does not match a {ndim}D label map")
    if ndim == 2 and all(abs(s - 1.0) < 1e-9 for s in sp):
        return sp, "px"
    return sp, "mm"


def _check_labels(labels: np.ndarray, allowed: set[int], what: str) -> None:
    values = set(int(v) for v in np.unique(labels))
    extra = sorted(values - allowed - {0})
    if extra:
        raise EvaluationError(f"{what}: unexpected label values {extra}; the preset's labels are {sorted(allowed)}")


def evaluate_case(case: str, pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None,
                  preset: DatasetPreset, *, gt_instances: np.ndarray | None = None,
                  ids: dict | None = None, pred_regions: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Rows of one case: every region × (dice, hd95, nsd) + challenge metrics (convention ``suite``) and the
    ``challenge`` convention's rows; `pred_regions`: region masks from their own channels, not the label map."""
    if pred.shape != gt.shape:
        raise EvaluationError(f"case {case}: prediction shape {pred.shape} differs from ground truth {gt.shape}")
    sp, unit = _spacing_and_unit(gt.ndim, spacing)
    ids = ids or {}
    base = {"study": ids.get("study", ""), "dataset": ids.get("dataset", preset.name), "model": ids.get("model", ""),
            "fold": ids.get("fold", ""), "case": case, "spacing": "x".join(f"{s:g}" for s in sp),
            "hd_impl": HD_IMPL, "diagonal": diagonal(gt.shape, sp), "convention": "suite"}
    rows: list[dict] = []
    challenge = preset.metrics.challenge
    for region, values in preset.labels.items():
        p = np.isin(pred, values) if pred_regions is None else np.asarray(pred_regions[region], bool)
        g = np.isin(gt, values)
        r = compare_masks(p, g, sp, nsd_tolerance=preset.metrics.nsd_tolerance)
        common = {**base, "region": region, "gt_voxels": r.gt_voxels, "pred_voxels": r.pred_voxels,
                  "gt_empty": r.gt_empty, "pred_empty": r.pred_empty}
        rows.append({**common, "metric": "dice", "value": r.dice, "unit": "ratio"})
        rows.append({**common, "metric": "hd95", "value": r.hd95, "unit": unit})
        rows.append({**common, "metric": "nsd", "value": r.nsd, "unit": "ratio"})
        extra: dict[str, float] = {}
        if challenge == "isles22":
            extra = isles22_metrics(p, g, sp)
        elif challenge == "brats23":
            extra = brats23_lesionwise(p, g, sp)
        elif challenge == "glas":
            inst = gt_instances if gt_instances is not None else label_components(g)[0]
            if inst.shape != g.shape:
                raise EvaluationError(f"case {case}: instance map shape {inst.shape} differs from ground truth {g.shape}")
            inst = np.where(g, inst, 0)
            extra = glas_object_metrics(label_components(p)[0], inst)
        if challenge:
            rows.extend(challenge_rows(base, region, p, g, sp, unit, challenge,
                                       gt_instances if challenge == "glas" else None))
        for name, value in extra.items():
            metric_unit = CHALLENGE_UNITS.get(name, "count" if name.endswith(("_tp", "_fp", "_fn", "count_diff")) else "ratio")
            if name == "brats23_lw_hd95" and unit == "px":
                metric_unit = "px"
            rows.append({**common, "metric": name, "value": float(value), "unit": metric_unit})
    return rows


def evaluate_cases(cases: Sequence[CaseInput], preset: DatasetPreset, *, ids: dict | None = None,
                   progress: str | None = None, workers: int | None = None) -> pd.DataFrame:
    """The long table of all cases (checks first that every prediction exists, naming the missing ones).

    Cases run in parallel on `workers` processes (default: the cores this process may use), with a
    progress bar and one log line per case (``deconver.metrics.parallel``)."""
    from deconver.metrics.parallel import map_cases

    missing = [c.case for c in cases if not c.pred_path.is_file()]
    if missing:
        shown = ", ".join(missing[:10]) + (f" … ({len(missing)} in all)" if len(missing) > 10 else "")
        raise EvaluationError(f"missing prediction for case(s) {shown} (looked for <case>.nii.gz/.png in "
                              f"{cases[0].pred_path.parent if cases else '?'})")
    allowed = {v for values in preset.labels.values() for v in values}
    per_case = map_cases(lambda c: _evaluate_input(c, preset, allowed, ids), cases, names=[c.case for c in cases],
                         workers=workers, desc=progress or f"evaluate {preset.name}")
    table = pd.DataFrame([row for rows in per_case for row in rows], columns=COLUMNS)
    return table


def _evaluate_input(c: CaseInput, preset: DatasetPreset, allowed: set[int], ids: dict | None) -> list[dict]:
    """Load one case's ground truth and prediction, check them, and compute its rows."""
    gt, spacing = c.load_gt()
    gt = np.asarray(gt)
    pred, pred_spacing = c.load_pred() if c.load_pred is not None else read_label_file(c.pred_path)
    _check_labels(pred, allowed, f"prediction {c.pred_path}")
    if pred.shape != gt.shape:
        raise EvaluationError(f"case {c.case}: prediction {c.pred_path} has shape {pred.shape}, "
                              f"the ground truth {gt.shape}")
    if pred_spacing is not None and spacing is not None and gt.ndim == 3 and \
            not np.allclose(pred_spacing, spacing, rtol=1e-3, atol=1e-4):
        raise EvaluationError(f"case {c.case}: prediction {c.pred_path} has spacing {pred_spacing}, "
                              f"the ground truth {tuple(spacing)}")
    instances = c.load_instances() if c.load_instances is not None else None
    regions = c.load_regions() if c.load_regions is not None else None
    rows = evaluate_case(c.case, pred, gt, spacing, preset, gt_instances=instances, ids=ids, pred_regions=regions)
    if c.load_prepared is not None:  # the authors' convention, on the prepared grid
        rows.extend(authors_rows({k: rows[0][k] for k in ("study", "dataset", "model", "fold", "case")},
                                 *c.load_prepared()))
    return rows


# --------------------------------------------------------------------------- writing
def _fingerprint(cases: Sequence[CaseInput], preset: DatasetPreset, ids: dict, extra: dict | None = None) -> str:
    payload = {
        "version": __version__, "hd_impl": HD_IMPL, "columns": COLUMNS, "ids": ids, "extra": extra or {},
        "labels": preset.labels, "metrics": preset.metrics.model_dump(mode="json"),
        "cases": [[c.case, _file_key(c.pred_path) if c.pred_path.is_file() else None, c.gt_key] for c in cases],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def sidecar_path(csv_path: Path) -> Path:
    """The provenance JSON beside an evaluation CSV (``evaluation.csv`` → ``evaluation.json``)."""
    return csv_path.with_suffix(".json")


def is_up_to_date(csv_path: Path, fingerprint: str) -> bool:
    return csv_path.is_file() and (read_record(sidecar_path(csv_path)) or {}).get("fingerprint") == fingerprint


def write_evaluation(cases: Sequence[CaseInput], preset: DatasetPreset, out: Path, *, ids: dict,
                     force: bool = False, extra_info: dict | None = None, workers: int | None = None) -> Path:
    """Evaluate `cases` into `out` (CSV) + its JSON sidecar, atomically; a no-op when up to date."""
    out = Path(out)
    fingerprint = _fingerprint(cases, preset, ids, extra_info)
    if not force and is_up_to_date(out, fingerprint):
        print(f"deconver evaluate: {out} is up to date", file=sys.stderr)
        return out
    label = "/".join(str(ids[k]) for k in ("dataset", "model") if ids.get(k)) or preset.name
    fold = ids.get("fold")
    table = evaluate_cases(cases, preset, ids=ids, workers=workers,
                           progress=f"evaluate {label}" + (f"/fold{fold}" if fold not in (None, "") else ""))
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False, na_rep="nan")
    units = sorted(set(table.loc[table["metric"] == "hd95", "unit"]))
    info = {
        "what": "per-case, per-region metrics (deconver evaluate); raw values, NaN/inf kept",
        "csv": out.name,
        **ids,
        "preset": preset.name,
        "labels": preset.labels,
        "hd_impl": HD_IMPL,
        "hd_definition": HD_DEFINITION,
        "distance_unit": units[0] if len(units) == 1 else units,
        "nsd_tolerance": preset.metrics.nsd_tolerance,
        "challenge": preset.metrics.challenge,
        "aggregation_defaults": {"empty_rule": preset.metrics.empty_rule, "hd95_penalty": preset.metrics.hd95_penalty},
        "metric_settings": metric_settings(preset),
        "raw_conventions": "both masks empty: dice/hd95/nsd NaN; one empty: dice 0, hd95 inf, nsd 0",
        "columns": COLUMNS,
        "cases": [c.case for c in cases],
        "n_rows": int(len(table)),
        "fingerprint": fingerprint,
        **(extra_info or {}),
        "provenance": provenance("cpu"),
    }
    write_json_atomic(sidecar_path(out), info)
    print(f"deconver evaluate: wrote {out} ({len(cases)} cases, {len(table)} rows)", file=sys.stderr)
    return out


def evaluate_folder(pred_dir: str | Path, gt_dir: str | Path, preset: DatasetPreset | str, out: str | Path, *,
                    gt_suffix: str = "", spacing: Sequence[float] | None = None, study: str = "",
                    dataset: str | None = None, model: str = "", fold: int | str = "", force: bool = False,
                    resample: bool = False, workers: int | None = None) -> Path:
    """Hand-use mode: pair ``gt_dir/<case>[gt_suffix].<ext>`` with ``pred_dir/<case>.<ext>`` and evaluate.

    A NIfTI prediction must lie on its ground truth's grid (`deconver.metrics.geometry`): otherwise an
    error names both files, or with `resample` the prediction is resampled onto it (nearest neighbour).

    The ground-truth files are label maps in the preset's label space (for a GlaS preset the official
    instance maps are accepted: every value > 0 is a gland and the map gives the objects). `spacing`
    overrides the files' spacing (useful for 2D images, which carry none).
    """
    preset = load_preset(preset) if isinstance(preset, str) else preset
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not d.is_dir():
            raise EvaluationError(f"{what} folder not found: {d}")
    gt_files = sorted(p for p in gt_dir.iterdir() if p.is_file() and p.name.lower().endswith(LABEL_SUFFIXES)
                      and (not gt_suffix or case_id_of(p).endswith(gt_suffix)))
    if not gt_files:
        raise EvaluationError(f"no ground-truth label files ({', '.join(LABEL_SUFFIXES)}) in {gt_dir}")
    allowed = {v for values in preset.labels.values() for v in values}
    is_instance_gt = preset.metrics.challenge == "glas"
    label_value = next(iter(preset.labels.values()))[0]
    cases: list[CaseInput] = []
    seen: dict[str, Path] = {}
    for path in gt_files:
        case = case_id_of(path, gt_suffix)
        if case in seen:
            raise EvaluationError(f"duplicate case id {case!r}: {seen[case]} and {path}")
        seen[case] = path
        pred_path = find_label_file(pred_dir, case) or pred_dir / f"{case}{'.nii.gz' if path.name.lower().endswith(('.nii', '.nii.gz')) else '.png'}"

        def load_gt(path=path):
            labels, sp = read_label_file(path)
            if is_instance_gt:
                labels = np.where(read_instance_file(path, warn=False) > 0, label_value, 0)
            else:
                _check_labels(labels, allowed, f"ground truth {path}")
            return labels, tuple(spacing) if spacing is not None else sp

        load_inst = (lambda path=path: read_instance_file(path)) if is_instance_gt else None
        load_pred = (lambda pred_path=pred_path, path=path: aligned_prediction(pred_path, path, resample))
        cases.append(CaseInput(case, pred_path, load_gt, load_inst, gt_key=json.dumps(_file_key(path)),
                               load_pred=load_pred))
    ids = {"study": study, "dataset": dataset or preset.name, "model": model, "fold": fold}
    return write_evaluation(cases, preset, Path(out), ids=ids, force=force, workers=workers,
                            extra_info={"pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "resample": resample,
                                        "spacing_override": list(spacing) if spacing is not None else None})


def evaluate_run(config: str | Path, dataset: str, model: str, fold: int, *, base: str | Path = ".",
                 force: bool = False, workers: int | None = None) -> Path:
    """Pipeline mode: the fold's validation cases of one run, against the prepared ground truth."""
    import deconver.data as data
    from deconver.data.split import fold_cases
    from deconver.paths import StudyPaths

    study = load_study(config)
    preset = study.preset(dataset)
    paths = StudyPaths.of(study, base)
    split_file = paths.split(dataset)
    try:
        _, case_ids = fold_cases(split_file, fold)
    except data.DatasetError as err:
        raise EvaluationError(str(err)) from None
    prepared = data.PreparedDataset(paths.prepared(dataset))
    pred_dir = paths.predictions(dataset, model, fold)
    manifest = paths.manifest(dataset)
    unknown = [c for c in case_ids if c not in prepared]
    if unknown:
        raise EvaluationError(f"{split_file}: fold {fold} lists case(s) {unknown[:5]} that are not in {manifest} "
                              f"(the split is older than the prepared data): rerun `deconver split`, then train, "
                              f"predict and evaluate this run again")
    cases: list[CaseInput] = []
    for case in case_ids:
        entry = prepared.case(case)
        pred_path = find_label_file(pred_dir, case) or pred_dir / f"{case}{'.png' if preset.spatial_dims == 2 else '.nii.gz'}"
        load_inst = (lambda entry=entry: np.asarray(data.load_native_instances(entry))) \
            if preset.metrics.challenge == "glas" else None
        cases.append(CaseInput(case, pred_path, lambda entry=entry: data.load_native_label(entry), load_inst,
                               gt_key=hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest(),
                               **run_loaders(prepared, preset, pred_dir, case)))
    ids = {"study": study.study, "dataset": dataset, "model": model, "fold": fold}
    return write_evaluation(cases, preset, paths.evaluation(dataset, model, fold), ids=ids, force=force, workers=workers,
                            extra_info={"split_file": str(split_file), "manifest": str(manifest),
                                        "predictions": str(pred_dir)})


# --------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("pipeline: --config STUDY --dataset D --model M --fold K; "
                     "by hand: --pred-dir DIR --gt-dir DIR --preset P --out CSV")
    parser.add_argument("--config", help="study config (YAML); pipeline mode")
    parser.add_argument("--dataset", help="dataset name in the study (pipeline) or the dataset column (by hand)")
    parser.add_argument("--model", default="", help="model name")
    parser.add_argument("--fold", type=int, default=None, help="fold index")
    parser.add_argument("--pred-dir", type=Path, help="folder of predicted label maps (by hand)")
    parser.add_argument("--gt-dir", type=Path, help="folder of ground-truth label maps (by hand)")
    parser.add_argument("--gt-suffix", default="", help="suffix of ground-truth file names to strip, e.g. _anno")
    parser.add_argument("--preset", help="dataset preset name or YAML path (by hand)")
    parser.add_argument("--out", type=Path, help="output CSV (by hand); a .json sidecar is written beside it")
    parser.add_argument("--spacing", type=float, nargs="+", help="override the voxel spacing (by hand), e.g. 0.5 0.5")
    parser.add_argument("--study", default="", help="study column (by hand)")
    parser.add_argument("--force", action="store_true", help="recompute even when the output is up to date")
    parser.add_argument("--resample", action="store_true",
                        help="by hand: resample a NIfTI prediction that is not on its ground truth's grid (nearest "
                             "neighbour) instead of refusing it")
    parser.add_argument("--workers", type=int, default=None,
                        help="cases evaluated in parallel (processes); default: the cores this job may use")


def run(args: argparse.Namespace) -> int:
    from deconver.steps import named_input, pipeline_mode

    if pipeline_mode(args, pipeline=["dataset", "model", "fold"], by_hand=["pred_dir", "gt_dir", "preset", "out"],
                     not_with_config=["pred_dir", "gt_dir"]):
        evaluate_run(args.config, args.dataset, args.model, args.fold, force=args.force, workers=args.workers)
    else:
        evaluate_folder(named_input(args.pred_dir, "--pred-dir"), named_input(args.gt_dir, "--gt-dir"), args.preset,
                        args.out, gt_suffix=args.gt_suffix, spacing=args.spacing, study=args.study,
                        dataset=args.dataset, model=args.model, fold="" if args.fold is None else args.fold,
                        force=args.force, resample=args.resample, workers=args.workers)
    return 0
