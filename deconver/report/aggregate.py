"""`deconver aggregate`: pool every run's per-case metrics, complexity and training logs of a study.

Reads (docs/ARCHITECTURE.md) per run `<R>/runs/<dataset>/<model>/fold<k>/evaluation.csv` and
`train_log.csv`, and `<R>/complexity/<dataset>/<model>.json`; applies each dataset's empty-mask rule
with `deconver.metrics.empty_rules.apply_rule` (raw values stay raw in the inputs) and writes
`<R>/aggregate/`:

- `per_case.csv`   one row per (dataset, model, fold, case, region, metric) after the rule, with the raw
                   value and a status (measured, both_empty, penalized, excluded); multi-region datasets get a
                   per-case `mean` region (mean over the regions of that case).
- `summary.csv`    per (dataset, model, region, metric, rule): n, mean, std over pooled cases, mean and
                   std of the fold means, counts of penalised / excluded / both-empty cases.
- `complexity.csv` per (dataset, model): parameters, FLOPs per voxel (ours and the paper's convention),
                   latency, peak memory, device (absent when `complexity.activate: false`).
- `training.csv`   every train_log.csv stacked with dataset, model, fold columns.
- `cost.csv`       per run with a cost.json: wall time, device-hours, epochs per hour, peak memory and
                   the predicted training time the run recorded (`deconver.cost.record.cost_rows`).
- `conventions_*.csv` every metric convention (suite, authors, challenge): `deconver.report.conventions`.
- `aggregate.json` what the report needs to caption the tables (rules, units, HD95 implementation,
                   synthetic flags, regions, reference model) + the input digest and provenance.

A rerun whose inputs and options are unchanged is a no-op.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from deconver.io import already_done, atomic_path, inputs_digest, provenance, read_record, write_json_atomic
from deconver.paths import StudyPaths
from deconver.report.conventions import OUTPUTS as CONVENTION_OUTPUTS
from deconver.report.conventions import pool_conventions, with_convention
from deconver.report.learning import learning_check, native_voxels
from deconver.report.readers import AggregateError, read_complexity, read_evaluation, read_train_log
from deconver.report.settings import compare_settings

#: Metrics whose per-case values are averaged over regions into a `mean` region.
REGION_MEAN_METRICS = ("dice", "hd95", "nsd")
MEAN_REGION = "mean"
OUTPUTS = ("per_case.csv", "summary.csv", "aggregate.json", *CONVENTION_OUTPUTS)


# --------------------------------------------------------------------------- what to aggregate
@dataclass
class DatasetSpec:
    """One dataset of the study as the aggregation sees it."""

    name: str
    preset: str
    spatial_dims: int | None
    regions: list[str]
    rule: str
    penalty: float | str
    synthetic: bool
    models: list[str]
    folds: list[int]
    skipped_models: dict[str, str] = field(default_factory=dict)
    paper: bool = False  # the paper's dataset (study `paper: true`): the report prints the paper's row


@dataclass
class Plan:
    """Everything `aggregate` reads: the study results folder, datasets, and whether complexity is on."""

    study: str
    results: Path
    datasets: list[DatasetSpec]
    complexity: bool
    reference: str = "deconver"
    seed: int = 123

    @property
    def paths(self) -> StudyPaths:
        return StudyPaths.at(self.results)


def plan_from_study(config: str | Path, results: Path | None = None, reference: str = "deconver") -> Plan:
    """The aggregation plan of a study config: the datasets × models × folds of its study plan
    (`deconver.plan`, the workflow's), with the skipped pairs and their reasons."""
    from deconver.config import load_study
    from deconver.plan import plan_study

    study = load_study(config)
    planned = plan_study(study)
    paths = StudyPaths.at(results) if results else StudyPaths.of(study)
    specs = []
    for name, entry in study.datasets.items():
        preset = study.preset(name)
        # the prepared manifest knows whether the cases were synthetic (a `synthetic: true` entry only
        # writes stand-ins when its root is absent); without a manifest the entry decides
        synthetic = _manifest_synthetic(paths.manifest(name))
        specs.append(DatasetSpec(
            name=name, preset=preset.name, spatial_dims=preset.spatial_dims, regions=list(preset.labels),
            rule=preset.metrics.empty_rule, penalty=preset.metrics.hd95_penalty,
            synthetic=entry.synthetic if synthetic is None else synthetic,
            models=list(planned.models[name]), folds=list(study.folds), skipped_models=planned.skipped_models(name),
            paper=entry.paper))
    return Plan(study=study.study, results=paths.results, datasets=specs, complexity=study.complexity.activate,
                reference=reference, seed=study.seed)


def plan_from_tree(results: Path, rule: str | None = None, penalty: float | str | None = None,
                   synthetic: list[str] | None = None, reference: str = "deconver",
                   paper: list[str] | None = None) -> Plan:
    """Hand use: discover datasets, models and folds from `<results>/runs/` (no study config).

    A dataset named like a preset takes that preset's rule, penalty and regions; `rule`/`penalty`
    override. Complexity is included when `<results>/complexity/` exists.
    """
    from deconver.config import ConfigError, MetricRules, load_preset

    paths = StudyPaths.at(results)
    if not paths.runs().is_dir():
        raise AggregateError(f"no runs folder: {paths.runs()}")
    try:
        evals = paths.evaluations()
    except ValueError as err:  # e.g. a run folder not named fold<k>
        raise AggregateError(str(err)) from None
    if not evals:
        raise AggregateError(f"no evaluation.csv under {paths.runs()}/<dataset>/<model>/fold<k>/")
    synthetic = set(synthetic or [])
    by_ds: dict[str, dict[str, set[int]]] = {}
    for key, _ in evals:
        by_ds.setdefault(key.dataset, {}).setdefault(key.model, set()).add(key.fold)
    specs = []
    for name, models in sorted(by_ds.items()):
        try:
            preset = load_preset(name)
            rules, preset_name, dims, regions = preset.metrics, preset.name, preset.spatial_dims, list(preset.labels)
        except ConfigError:
            rules, preset_name, dims, regions = MetricRules(), name, None, []
        is_synth = name in synthetic or bool(_manifest_synthetic(paths.manifest(name)))
        folds = sorted(set().union(*models.values()))
        specs.append(DatasetSpec(
            name=name, preset=preset_name, spatial_dims=dims, regions=regions,
            rule=rule or rules.empty_rule, penalty=penalty if penalty is not None else rules.hd95_penalty,
            synthetic=is_synth, models=sorted(models), folds=folds, paper=name in set(paper or [])))
    return Plan(study=paths.results.name, results=paths.results, datasets=specs, complexity=paths.complexity_dir().is_dir(),
                reference=reference)


def _manifest_synthetic(manifest: Path) -> bool | None:
    """The prepared manifest's `synthetic` flag, or None when there is no readable manifest."""
    data = read_record(manifest)
    return None if data is None else bool(data.get("synthetic", False))


# --------------------------------------------------------------------------- the empty-mask rule
def default_apply_rule() -> Callable:
    """The metrics colleague's rule function (the single implementation of the convention)."""
    from deconver.metrics.empty_rules import apply_rule

    return apply_rule


def with_rule(df: pd.DataFrame, rule: str, penalty, apply_rule: Callable | None = None) -> pd.DataFrame:
    """Per-case values after the empty-mask rule, with `raw_value` and `status`.

    `status` is the rule function's: measured, both_empty, penalized (one side empty, set to the
    rule's value) or excluded. The rule function drops excluded rows; they come back here with a NaN
    value so that every count stays visible and the means skip them.
    """
    fn = apply_rule or default_apply_rule()
    df = df.reset_index(drop=True)
    out = fn(df, rule, penalty)
    ruled = out[0] if isinstance(out, tuple) else out
    if not isinstance(ruled, pd.DataFrame) or not {"value", "status"} <= set(ruled.columns):
        raise AggregateError("apply_rule must return a DataFrame (or a tuple starting with one) with "
                             "'value' and 'status' columns")
    ruled = ruled.copy()
    if "raw_value" not in ruled.columns:
        keys = ["fold", "case", "region", "metric"]
        raw = df[keys + ["value"]].rename(columns={"value": "raw_value"})
        ruled = ruled.merge(raw, on=keys, how="left", validate="one_to_one")
    ruled["status"] = ruled["status"].astype(str)
    keys = [k for k in ("dataset", "model", "fold", "case", "region", "metric") if k in df.columns]
    kept = df[keys].merge(ruled[keys].drop_duplicates().assign(_kept=True), on=keys, how="left")["_kept"].notna()
    dropped = df.loc[~kept.to_numpy()].copy()
    if len(dropped):
        dropped["raw_value"] = pd.to_numeric(dropped["value"], errors="coerce")
        dropped["value"] = math.nan
        dropped["status"] = "excluded"
        ruled = pd.concat([ruled, dropped[[c for c in ruled.columns if c in dropped.columns]]], ignore_index=True)
    return ruled


def add_region_mean(per_case: pd.DataFrame) -> pd.DataFrame:
    """Append a `mean` region per case for Dice/HD95/NSD of datasets with several regions
    (NaN regions — excluded by the rule — are left out of that case's mean)."""
    base = per_case[per_case["metric"].isin(REGION_MEAN_METRICS) & (per_case["region"] != MEAN_REGION)]
    n_regions = base.groupby(["dataset", "metric"])["region"].nunique()
    multi = n_regions[n_regions > 1].reset_index()[["dataset", "metric"]]
    if multi.empty:
        return per_case
    base = base.merge(multi, on=["dataset", "metric"])
    keys = [c for c in ("study", "dataset", "model", "fold", "case", "metric", "unit", "hd_impl") if c in base.columns]
    base = base.assign(_pen=base["status"].eq("penalized"), _exc=base["status"].eq("excluded"))
    grouped = base.groupby(keys, dropna=False, sort=False)
    mean = grouped.agg(value=("value", "mean"), raw_value=("raw_value", "mean"),  # pandas' mean skips NaN
                       _pen=("_pen", "any"), _exc=("_exc", "all")).reset_index()
    mean["status"] = np.where(mean["_pen"], "penalized", np.where(mean["_exc"], "excluded", "measured"))
    mean = mean.drop(columns=["_pen", "_exc"])
    mean["region"] = MEAN_REGION
    return pd.concat([per_case, mean], ignore_index=True)


# --------------------------------------------------------------------------- pooling
def summarize(per_case: pd.DataFrame) -> pd.DataFrame:
    """Pooled statistics per (dataset, model, region, metric): over all cases of all folds
    (mean, sample std, median) and over folds (mean and std of the per-fold means)."""
    rows = []
    for (dataset, model, region, metric), g in per_case.groupby(["dataset", "model", "region", "metric"], sort=True):
        v = g["value"].to_numpy(dtype=float)
        finite = v[~np.isnan(v)]
        fold_means = g.groupby("fold")["value"].mean()
        fold_means = fold_means[fold_means.notna()]
        rows.append(dict(
            dataset=dataset, model=model, region=region, metric=metric,
            n=int(finite.size), mean=float(finite.mean()) if finite.size else math.nan,
            std=float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
            median=float(np.median(finite)) if finite.size else math.nan,
            n_folds=int(fold_means.size),
            fold_mean=float(fold_means.mean()) if fold_means.size else math.nan,
            fold_std=float(fold_means.std(ddof=1)) if fold_means.size > 1 else math.nan,
            n_penalized=int((g["status"] == "penalized").sum()),
            n_excluded=int((g["status"] == "excluded").sum()),
            n_both_empty=int((g["status"] == "both_empty").sum()),
            unit=_single(g["unit"]) if "unit" in g else None,
        ))
    return pd.DataFrame(rows)


def _single(s: pd.Series):
    vals = sorted({str(v) for v in s.dropna()})
    return vals[0] if len(vals) == 1 else (",".join(vals) if vals else None)


# --------------------------------------------------------------------------- the step
def aggregate(plan: Plan, out: Path, apply_rule: Callable | None = None, force: bool = False,
              alt_rules: tuple[str, ...] = ("exclude",)) -> dict[str, Any]:
    """Pool a study's results into `out` (see the module docstring). Returns the aggregate.json content.

    Besides each dataset's own rule, the summary is also computed under every rule in `alt_rules`
    (the authors' `exclude` by default) so the reproduction table can show the comparable number.
    """
    out = Path(out)
    paths = plan.paths
    eval_files, log_files, cx_files = [], [], []
    for ds in plan.datasets:
        for model in ds.models:
            for fold in ds.folds:
                eval_files.append((ds, model, fold, paths.evaluation(ds.name, model, fold)))
                log_files.append((ds, model, fold, paths.train_log(ds.name, model, fold)))
            if plan.complexity:
                cx_files.append((ds, model, paths.complexity(ds.name, model)))
    missing = [str(p) for *_, p in eval_files + cx_files if not p.is_file()]
    if missing:
        raise AggregateError("missing input file(s): " + ", ".join(missing[:20]) + (" …" if len(missing) > 20 else ""))
    logs_present = [(ds, m, f, p) for ds, m, f, p in log_files if p.is_file()]
    logs_missing = [str(p) for *_, p in log_files if not p.is_file()]

    options = dict(datasets=[vars(d) for d in plan.datasets], complexity=plan.complexity, reference=plan.reference,
                   alt_rules=list(alt_rules), version=_version())
    sidecars = [p.with_suffix(".json") for *_, p in eval_files if p.with_suffix(".json").is_file()]  # settings
    inputs = [p for *_, p in eval_files] + sidecars + [p for *_, p in cx_files] + [p for *_, p in logs_present]
    inputs += [m for m in (plan.paths.manifest(ds.name) for ds in plan.datasets) if m.is_file()]
    inputs += [p.parent / "cost.json" for *_, p in eval_files if (p.parent / "cost.json").is_file()]
    digest = inputs_digest(inputs, options)
    meta_path = out / "aggregate.json"
    done = None if force else already_done(meta_path, digest, [out / o for o in OUTPUTS])
    if done is not None:
        return done

    from tqdm.auto import tqdm

    per_case_parts, summary_parts, ds_meta, conv_parts, conv_summary_parts = [], [], {}, [], []
    for ds in plan.datasets:
        frames = []
        mine = [e for e in eval_files if e[0] is ds]
        for _, model, fold, path in tqdm(mine, desc=f"aggregate {ds.name}", unit="run", leave=False,
                                         disable=not sys.stderr.isatty()):
            df = read_evaluation(path)
            df["model"], df["fold"], df["dataset"] = model, fold, ds.name  # the folder is authoritative
            frames.append(df)
        raw_all = pd.concat(frames, ignore_index=True)
        conv_case, conv_summ = pool_conventions(raw_all, ds.rule, ds.penalty, apply_rule)
        conv_parts.append(conv_case)
        conv_summary_parts.append(conv_summ)
        raw = with_convention(raw_all)
        raw = raw[raw["convention"] == "suite"].drop(columns="convention")  # every other table: the suite's
        units = sorted({str(u) for u in raw["unit"].dropna()})
        impls = sorted({str(u) for u in raw["hd_impl"].dropna()})
        regions = ds.regions or sorted(raw["region"].dropna().unique())
        rules = [ds.rule] + [r for r in alt_rules if r != ds.rule]
        for rule in rules:
            ruled_parts = [with_rule(g, rule, ds.penalty, apply_rule) for _, g in raw.groupby("model", sort=True)]
            ruled = add_region_mean(pd.concat(ruled_parts, ignore_index=True))
            summ = summarize(ruled)
            summ.insert(4, "rule", rule)
            summary_parts.append(summ)
            if rule == ds.rule:
                per_case_parts.append(ruled)
                learning = learning_check(ruled, raw, native_voxels(plan.paths.manifest(ds.name)))
        hd = raw[raw["metric"] == "hd95"]
        ds_meta[ds.name] = dict(
            preset=ds.preset, spatial_dims=ds.spatial_dims, synthetic=ds.synthetic, rule=ds.rule,
            penalty=ds.penalty, regions=[r for r in regions if r in set(raw["region"])] or regions,
            hd95_unit=_single(hd["unit"]) if len(hd) else (units[0] if len(units) == 1 else ",".join(units)),
            hd_impl=",".join(impls), models=ds.models, folds=ds.folds, skipped_models=ds.skipped_models,
            metrics=sorted(raw["metric"].dropna().unique()), learning=learning, paper=ds.paper,
            metric_settings=compare_settings((f"{m}/fold{f}", p) for _, m, f, p in mine),
        )
        # cases per model (they differ only if a run evaluated fewer cases); the largest is reported
        per_model = raw.drop_duplicates(["model", "fold", "case"]).groupby("model").size()
        ds_meta[ds.name]["n_cases"] = int(per_model.max()) if len(per_model) else 0

    per_case = pd.concat(per_case_parts, ignore_index=True)
    keep = [c for c in ("study", "dataset", "model", "fold", "case", "region", "metric", "value", "raw_value",
                        "status", "gt_empty", "pred_empty", "diagonal", "unit", "hd_impl") if c in per_case.columns]
    per_case = per_case[keep].sort_values(["dataset", "model", "fold", "case", "metric", "region"], kind="stable")
    summary = pd.concat(summary_parts, ignore_index=True)

    out.mkdir(parents=True, exist_ok=True)
    _write_csv(per_case, out / "per_case.csv")
    _write_csv(summary, out / "summary.csv")
    _write_csv(pd.concat(conv_parts, ignore_index=True), out / CONVENTION_OUTPUTS[0])
    _write_csv(pd.concat(conv_summary_parts, ignore_index=True), out / CONVENTION_OUTPUTS[1])

    if plan.complexity:
        rows = []
        for ds, model, path in cx_files:
            rows.append(dict(dataset=ds.name, model=model, **read_complexity(path)))
        _write_csv(pd.DataFrame(rows), out / "complexity.csv")
    else:
        (out / "complexity.csv").unlink(missing_ok=True)

    if logs_present:
        parts = []
        for ds, model, fold, path in logs_present:
            log = read_train_log(path)
            log.insert(0, "fold", fold)
            log.insert(0, "model", model)
            log.insert(0, "dataset", ds.name)
            parts.append(log)
        _write_csv(pd.concat(parts, ignore_index=True), out / "training.csv")
    else:
        (out / "training.csv").unlink(missing_ok=True)

    from deconver.cost.record import cost_rows

    cost = cost_rows([(ds.name, m, f, p.parent / "cost.json") for ds, m, f, p in eval_files])
    if cost:
        _write_csv(pd.DataFrame(cost), out / "cost.csv")
    else:
        (out / "cost.csv").unlink(missing_ok=True)

    meta = dict(study=plan.study, results=str(plan.results), reference=plan.reference, seed=plan.seed,
                complexity=plan.complexity, datasets=ds_meta, alt_rules=list(alt_rules),
                did_not_learn=[f"{d}/{m}" for d, dm in ds_meta.items() for m, c in dm["learning"].items() if not c["learned"]],
                train_logs_missing=logs_missing, inputs_digest=digest, provenance=provenance("cpu"))
    write_json_atomic(meta_path, meta)
    return meta


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")


def _version() -> str:
    from deconver import __version__

    return __version__


# --------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="study config (YAML); its datasets × models × folds are expected")
    parser.add_argument("--results", type=Path, help="the study's results folder <results_dir>/<study> "
                        "(default: from the config; required without --config)")
    parser.add_argument("--out", type=Path, help="output folder (default: <results>/aggregate)")
    parser.add_argument("--reference", default="deconver", help="the model every other is compared with")
    parser.add_argument("--rule", choices=["penalize", "exclude"], help="hand use: empty-mask rule for every dataset")
    parser.add_argument("--penalty", help="hand use: HD95 penalty (a number or 'diagonal')")
    parser.add_argument("--synthetic", action="append", default=[], metavar="DATASET",
                        help="hand use: label this dataset synthetic (repeatable)")
    parser.add_argument("--paper", action="append", default=[], metavar="DATASET",
                        help="hand use: this dataset is the paper's (the report prints the paper's row; repeatable)")
    parser.add_argument("--force", action="store_true", help="recompute even if the inputs are unchanged")


def run(args: argparse.Namespace) -> int:
    from deconver.steps import UsageError, named_input, pipeline_mode

    if pipeline_mode(args, by_hand=["results"]):
        plan = plan_from_study(args.config, named_input(args.results, "--results"), reference=args.reference)
    else:
        penalty = args.penalty
        if penalty is not None and penalty != "diagonal":
            try:
                penalty = float(penalty)
            except ValueError:
                raise UsageError(f"--penalty: a number or 'diagonal', got {penalty!r}") from None
        plan = plan_from_tree(named_input(args.results, "--results"), args.rule, penalty, args.synthetic,
                              reference=args.reference, paper=args.paper)
    out = args.out or plan.paths.aggregate()
    meta = aggregate(plan, out, force=args.force)
    if meta.get("_up_to_date"):
        print(f"deconver aggregate: {out} is up to date")
    else:
        n = sum(len(d["models"]) for d in meta["datasets"].values())
        print(f"deconver aggregate: {len(meta['datasets'])} dataset(s), {n} model runs pooled → {out}")
    return 0
