"""`deconver report`: the study's tables, statistics, figures and a self-contained HTML page.

Reads `<R>/aggregate/` (written by `deconver aggregate`) and writes `reports/<study>/`:

    tables/<dataset>.{md,tex,csv}         the paper's table per dataset (best value per column in bold)
    tables/reproduction.{md,tex,csv}      the paper's Deconver numbers (PAPER.md §3) beside ours
    tables/ranks.{md,tex,csv}             mean rank per model across datasets
    statistics/<dataset>_<metric>.{md,tex,csv}  Wilcoxon vs the reference (Holm), bootstrap CIs
    statistics/{wilcoxon,bootstrap,ranks}.csv   every comparison, every region, full precision
    ranking/<dataset>_<metric>_*.{md,tex,csv}  is the ranking real? bootstrap ranks, methods, pairwise tests, conventions
    figures/*.png, figures/*.svg          distributions, Dice vs FLOPs, region bars, training curves, ranking
    report.html                           everything above with captions; images embedded (base64)
    report.json                           what was written + the input digest (reruns are no-ops)
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import html
import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from deconver.io import write_json_atomic, write_text_atomic
from deconver.paths import StudyPaths
from deconver.report import learning
from deconver.report import stats as S
from deconver.report.convention_tables import (REPRODUCTION_COLUMNS, conventions_table, load_conventions,
                                               protocol_links, reproduction_columns)
from deconver.report.objects_section import object_table, settings_notes
from deconver.report.tables import Column, Table

#: The paper's reported Deconver numbers (PAPER.md §3), by preset name.
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "isles22": dict(dice=78.16, hd95=4.99, params_m=10.5, flops_k=607.0),
    "brats23": dict(dice=90.66, hd95=4.45, params_m=10.6, flops_k=167.5),
    "glas": dict(dice=92.12, hd95=60.49, params_m=20.8, flops_k=422.8),
    "fives": dict(dice=92.72, hd95=30.26, params_m=20.8, flops_k=422.8),
}
PAPER_HD95_UNIT = {"isles22": "voxels of the 2 mm grid", "brats23": "voxels of the 1 mm grid", "glas": "px", "fives": "px"}
FLOPS_SENTENCE = ("The paper's FLOPs per pixel follow the DeepSpeed profiler's convention (2 FLOPs per MAC plus "
                  "element-wise ops), which does not see the NDC layer's own convolutions and so undercounts "
                  "Deconver; our count includes them, and our paper-convention column reproduces the paper's figure.")
OURS_FLOPS = ("'ours' = torch.utils.flop_counter, 2 FLOPs per multiply-accumulate of every convolution (the NDC "
              "layer's included), linear layer, matrix product and attention, element-wise ops not counted")
PAPER_FLOPS = ("'paper conv.' = the paper's DeepSpeed-profiler convention (2 FLOPs per MAC plus element-wise ops, "
               "NDC convolutions not counted)")
OUTPUT_VERSION = 2  # 2: the ranking section
#: Definitions of the HD95 implementations `evaluation.csv` names (docs/metrics.md), for captions.
HD_DEFINITIONS = {
    "deconver-maxdir-p95-v1": "the larger of the two directed 95th percentiles of surface distances, as MONAI",
}


class ReportError(RuntimeError):
    """An input of the report is missing or malformed; the message names the file."""


# --------------------------------------------------------------------------- inputs
@dataclass
class Aggregate:
    """The aggregate folder in memory."""

    directory: Path
    meta: dict[str, Any]
    per_case: pd.DataFrame
    summary: pd.DataFrame
    complexity: pd.DataFrame | None
    training: pd.DataFrame | None
    files: list[Path] = field(default_factory=list)
    conventions: pd.DataFrame | None = None

    @property
    def reference(self) -> str:
        return self.meta.get("reference", "deconver")

    def ds(self, name: str) -> dict[str, Any]:
        return self.meta["datasets"][name]

    def primary_region(self, dataset: str) -> str:
        regions = sorted(set(self.per_case.loc[self.per_case["dataset"] == dataset, "region"]))
        if "mean" in regions:
            return "mean"
        declared = [r for r in self.ds(dataset).get("regions", []) if r in regions]
        return declared[0] if declared else (regions[0] if regions else "")


def load_aggregate(directory: Path) -> Aggregate:
    """Read `aggregate.json`, `per_case.csv`, `summary.csv` and, when present, complexity and training."""
    directory = Path(directory)
    need = [directory / "aggregate.json", directory / "per_case.csv", directory / "summary.csv"]
    for p in need:
        if not p.is_file():
            raise ReportError(f"missing aggregate file: {p} (run `deconver aggregate` first)")
    try:
        meta = json.loads(need[0].read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{need[0]}: not valid JSON: {err}") from None
    per_case = pd.read_csv(need[1], dtype={"case": str, "region": str, "metric": str, "model": str, "dataset": str})
    summary = pd.read_csv(need[2], dtype={"region": str, "metric": str, "model": str, "dataset": str})
    files = list(need) + [p for p in (directory / "conventions_summary.csv",) if p.is_file()]
    cx = tr = None
    if meta.get("complexity"):
        p = directory / "complexity.csv"
        if not p.is_file():
            raise ReportError(f"missing aggregate file: {p} (complexity is active in this study)")
        cx = pd.read_csv(p, dtype={"model": str, "dataset": str})
        files.append(p)
    if (directory / "training.csv").is_file():
        tr = pd.read_csv(directory / "training.csv", dtype={"model": str, "dataset": str})
        files.append(directory / "training.csv")
    from deconver.report.conventions import OUTPUTS as CONVENTION_OUTPUTS
    from deconver.report.ranking_section import read_conventions

    conventions = read_conventions(directory)  # every metric convention's per-case rows, when aggregate wrote them
    if conventions is not None:
        files.append(directory / CONVENTION_OUTPUTS[0])
    return Aggregate(directory, meta, per_case, summary, cx, tr, files, conventions)


# --------------------------------------------------------------------------- caption pieces
def rule_text(ds: dict[str, Any]) -> str:
    """The empty-mask rule in words, with its penalty and unit."""
    unit = ds.get("hd95_unit") or "?"
    if ds.get("rule") == "exclude":
        return ("empty-mask rule 'exclude' (the authors' MONAI behaviour, only for comparison with published numbers): "
                "Dice of two empty masks → 100 %, of exactly one empty → 0; HD95 of every case-region with an empty mask "
                "is left out of the mean (so a missed lesion does not count against HD95)")
    pen = ds.get("penalty")
    pen_t = f"the image diagonal ({unit})" if pen == "diagonal" else f"{_fmt_num(pen)} {unit}"
    return (f"empty-mask rule 'penalize' (BraTS 2023): both masks empty → Dice 100 %, HD95 0; exactly one empty → "
            f"Dice 0, HD95 = {pen_t}")


def hd_text(ds: dict[str, Any]) -> str:
    """The HD95 implementation id(s) of a dataset, with the definition when it is known."""
    impls = [i for i in str(ds.get("hd_impl") or "").split(",") if i]
    if not impls:
        return "implementation not recorded"
    return "; ".join(f"{i}: {HD_DEFINITIONS[i]}" if i in HD_DEFINITIONS else i for i in impls)


def _cap(text: str) -> str:
    """Upper-case the first letter only (str.capitalize would lower-case 'BraTS', 'HD95')."""
    return text[:1].upper() + text[1:]


def _fmt_num(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:g}"


def synthetic_text(ds: dict[str, Any]) -> str:
    return "SYNTHETIC stand-in data (pipeline check; numbers are not comparable with the paper). " if ds.get("synthetic") else ""


def _ds_title(name: str, ds: dict[str, Any]) -> str:
    return f"{name} (synthetic)" if ds.get("synthetic") else name


# --------------------------------------------------------------------------- tables
def _summary(agg: Aggregate, dataset: str, rule: str | None = None) -> pd.DataFrame:
    s = agg.summary[agg.summary["dataset"] == dataset]
    rule = rule or agg.ds(dataset).get("rule")
    if "rule" in s.columns:
        s = s[s["rule"] == rule]
    return s


def _models(agg: Aggregate, dataset: str) -> list[str]:
    models = sorted(set(agg.per_case.loc[agg.per_case["dataset"] == dataset, "model"]))
    if agg.reference in models:
        models.remove(agg.reference)
        models.insert(0, agg.reference)
    return models


def dataset_table(agg: Aggregate, dataset: str) -> Table:
    """The paper's table for one dataset: Dice (%), HD95, penalised count, complexity columns."""
    ds = agg.ds(dataset)
    s = _summary(agg, dataset)
    regions = [r for r in ds.get("regions", []) if r in set(s["region"])] or sorted(set(s["region"]) - {"mean"})
    multi = len(regions) > 1
    primary = "mean" if multi else regions[0]
    unit = ds.get("hd95_unit") or "?"
    is_excl = ds.get("rule") == "exclude"
    cols: list[Column] = []
    shown_regions = regions + (["mean"] if multi else [])
    for r in shown_regions:
        hdr = f"Dice % {r}" if multi else "Dice %"
        cols.append(Column(f"dice_{r}", hdr, None, better="max", decimals=2, std=True))
    cols.append(Column("dice_fold_mean", f"Dice % {primary} (fold means)" if multi else "Dice % (fold means)",
                       None, better="max", decimals=2, std=True))
    for r in shown_regions:
        hdr = f"HD95 {r} ({unit})" if multi else f"HD95 ({unit})"
        cols.append(Column(f"hd95_{r}", hdr, None, better="min", decimals=2, std=True))
    per_region = f" ({'/'.join(regions)})" if multi else ""
    cols.append(Column("n_penalized", f"Pen.{per_region}", None, text=True))
    if is_excl:
        cols.append(Column("n_excluded", f"Excl. HD95{per_region}", None, text=True))
    cx = None
    if agg.complexity is not None:
        cx = agg.complexity[agg.complexity["dataset"] == dataset].set_index("model")
        px = "px" if ds.get("spatial_dims") == 2 else "vox"
        cols += [
            Column("params_m", "Params (M)", None, better="min", decimals=2),
            Column("flops_k", f"FLOPs/{px} (K), ours", None, better="min", decimals=1),
            Column("paper_flops_k", f"FLOPs/{px} (K), paper conv.", None, better="min", decimals=1),
            Column("latency_ms", "Latency (ms)", None, better="min", decimals=1),
            Column("memory_mb", "Peak mem. (MB)", None, better="min", decimals=1),
        ]
    rows = []
    for model in _models(agg, dataset):
        m = s[s["model"] == model].set_index(["metric", "region"])
        row: dict[str, Any] = {}
        for r in shown_regions:
            row[f"dice_{r}"] = _pair(m, "dice", r, scale=100)
            row[f"hd95_{r}"] = _pair(m, "hd95", r)
        if ("dice", primary) in m.index:
            e = m.loc[("dice", primary)]
            row["dice_fold_mean"] = (float(e["fold_mean"]) * 100, _f(e["fold_std"]) * 100)
        for key, metric in (("n_penalized", "dice"), ("n_excluded", "hd95")):
            counts = [int(m.loc[(metric, r), key]) if (metric, r) in m.index else 0 for r in regions]
            row[key] = "/".join(str(c) for c in counts)
        if cx is not None and model in cx.index:
            c = cx.loc[model]
            row.update(params_m=_f(c["params_m"]), flops_k=_f(c["flops_per_voxel_k"]),
                       paper_flops_k=_f(c["paper_flops_per_voxel_k"]), latency_ms=_f(c["latency_ms"]),
                       memory_mb=_f(c["peak_memory_mb"]))
        rows.append((model, row))
    n_pen = ", ".join(f"{m} {r['n_penalized']}" for m, r in rows)
    n_exc = ", ".join(f"{m} {r['n_excluded']}" for m, r in rows)
    folds = ds.get("folds", [])
    cap = [f"{_ds_title(dataset, ds)}: {synthetic_text(ds)}Dice in % as mean ± sample std over all {ds.get('n_cases', '?')} "
           f"cases pooled across {len(folds)} fold(s) {folds}; 'fold means' = mean ± std of the per-fold means"
           + (f"; 'mean' = per-case mean over {', '.join(regions)}" if multi else "") + ".",
           f"HD95 in {unit} ({hd_text(ds)}), lower is better.",
           f"{_cap(rule_text(ds))}; case-regions with exactly one empty mask (Dice set to 0"
           + ("" if is_excl else ", HD95 to the penalty") + f") per model in column 'Pen.{per_region}': {n_pen}"
           + (f"; left out of HD95 in column 'Excl. HD95{per_region}': {n_exc}" if is_excl else "") + ".",
           "Best value per column in bold."]
    if cx is not None:
        cap.append(complexity_caption(cx, "pixel" if ds.get("spatial_dims") == 2 else "voxel"))
    if ds.get("skipped_models"):
        cap.append("Not run on this dataset: " + "; ".join(f"{m} ({w})" for m, w in ds["skipped_models"].items()) + ".")
    return Table(name=f"Table: {_ds_title(dataset, ds)}", caption=" ".join(cap), label=f"tab:{dataset}", columns=cols,
                 rows=rows)


def complexity_caption(cx: pd.DataFrame, unit: str) -> str:
    """What the complexity columns count and where they were measured, and which models were flagged."""
    def values(col):
        return sorted({str(v) for v in cx[col].dropna()}) if col in cx else []

    rois, reps, devs = values("runtime_roi"), values("repeats"), values("device")
    text = (f"FLOPs per {unit} in thousands at batch 1 and the preset's roi: {OURS_FLOPS}; {PAPER_FLOPS}. "
            f"Latency: median of {'/'.join(reps) or 'N'} forward passes after warm-up, batch 1"
            + (f", roi {'/'.join(rois)}" if rois else "") + "; peak memory of that forward pass"
            + f"; device: {', '.join(devs) or 'not recorded'}.")
    if "flags" in cx:
        flagged = {m: f for m, f in cx["flags"].items() if isinstance(f, str) and f.strip()}
        if flagged:
            text += " Flagged by the FLOP cross-check: " + "; ".join(f"{m} ({f})" for m, f in flagged.items()) + "."
    return text


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _pair(m: pd.DataFrame, metric: str, region: str, scale: float = 1.0):
    if (metric, region) not in m.index:
        return None
    e = m.loc[(metric, region)]
    return (_f(e["mean"]) * scale, _f(e["std"]) * scale)


def reproduction_table(agg: Aggregate) -> Table | None:
    """The paper's Deconver numbers beside ours, per dataset the study marks as the paper's (its preset's row)."""
    ref = agg.reference
    rows = []
    synth = []
    for name, ds in agg.meta["datasets"].items():
        paper = PAPER_RESULTS.get(ds.get("preset", name)) if ds.get("paper") else None  # marked by the study
        if paper is None or ref not in ds.get("models", []):
            continue
        s = agg.summary[(agg.summary["dataset"] == name) & (agg.summary["model"] == ref)]
        primary = agg.primary_region(name)

        def val(metric, rule, scale=1.0):
            e = s[(s["metric"] == metric) & (s["region"] == primary) & (s.get("rule", rule) == rule)]
            return _f(e["mean"].iloc[0]) * scale if len(e) else math.nan

        row = dict(data="synthetic" if ds.get("synthetic") else "real",
                   dice_paper=paper["dice"], dice_ours=val("dice", ds["rule"], 100),
                   dice_excl=val("dice", "exclude", 100),
                   hd_paper=paper["hd95"], hd_ours=val("hd95", ds["rule"]), hd_unit=ds.get("hd95_unit"),
                   params_paper=paper["params_m"], flops_paper=paper["flops_k"])
        if agg.complexity is not None:
            c = agg.complexity[(agg.complexity["dataset"] == name) & (agg.complexity["model"] == ref)]
            if len(c):
                row.update(params_ours=_f(c["params_m"].iloc[0]), flops_paper_conv=_f(c["paper_flops_per_voxel_k"].iloc[0]),
                           flops_ours=_f(c["flops_per_voxel_k"].iloc[0]))
        row.update(reproduction_columns(load_conventions(agg.directory), name, ref, primary))
        rows.append((name, row))
        if ds.get("synthetic"):
            synth.append(name)
    if not rows:
        return None
    cols = [Column("data", "Data", text=True),
            Column("dice_paper", "Dice % paper", decimals=2), Column("dice_ours", "Dice % ours", decimals=2),
            Column("dice_excl", "Dice % ours, exclude rule", decimals=2),
            Column("hd_paper", "HD95 paper", decimals=2), Column("hd_ours", "HD95 ours", decimals=2),
            Column("hd_unit", "HD95 unit (ours)", text=True),
            Column("params_paper", "Params (M) paper", decimals=1), *REPRODUCTION_COLUMNS]
    if agg.complexity is not None:
        cols += [Column("params_ours", "Params (M) ours", decimals=2),
                 Column("flops_paper", "FLOPs/px (K) paper", decimals=1),
                 Column("flops_paper_conv", "FLOPs/px (K) ours, paper conv.", decimals=1),
                 Column("flops_ours", "FLOPs/px (K) ours, all MACs incl. NDC", decimals=1)]
    else:
        cols += [Column("flops_paper", "FLOPs/px (K) paper", decimals=1)]
    cap = (f"Reproduction: the paper's reported {ref} results (arXiv:2504.00302, PAPER.md §3) beside ours. "
           "'ours' uses each dataset's empty-mask rule; 'exclude rule' drops one-side-empty cases as the authors' MONAI "
           "code did. The paper's HD95 is in voxels of the resampled grid for 3D (MONAI without spacing; "
           + ", ".join(f"{k}: {v}" for k, v in PAPER_HD95_UNIT.items()) + ") and pixels for 2D. "
           "BraTS Dice/HD95 are means over ET, TC, WT. 'authors conv.' scores the same predictions as the authors' "
           "evaluator did (prepared grid, HD95 in voxels, cases with an empty side dropped): the columns to set "
           "beside the paper; 'suite conv.' is the suite's own (docs/metrics.md, 'Conventions'). Only datasets the "
           "study marks as the paper's (`paper: true`) are listed. " + FLOPS_SENTENCE)
    if synth:
        cap += f" Datasets {', '.join(synth)} are synthetic stand-ins: their numbers are not comparable with the paper."
    return Table(name="Table: reproduction", caption=cap, label="tab:reproduction", columns=cols, rows=rows,
                 label_header="Dataset")


def rank_tables(agg: Aggregate) -> tuple[Table | None, pd.DataFrame]:
    """Mean rank per model across datasets (by mean Dice of the primary region; HD95 as a second column)."""
    dice_scores, hd_scores = [], []
    for name in agg.meta["datasets"]:
        s = _summary(agg, name)
        primary = agg.primary_region(name)
        for metric, bucket in (("dice", dice_scores), ("hd95", hd_scores)):
            e = s[(s["metric"] == metric) & (s["region"] == primary)]
            bucket += [dict(dataset=name, model=m, score=v) for m, v in zip(e["model"], e["mean"])]
    if not dice_scores:
        return None, pd.DataFrame()
    rd = S.rank_table(pd.DataFrame(dice_scores), higher_better=True)
    rh = S.rank_table(pd.DataFrame(hd_scores), higher_better=False) if hd_scores else pd.DataFrame(columns=["model", "mean_rank"])
    merged = rd.merge(rh[["model", "mean_rank"]].rename(columns={"mean_rank": "mean_rank_hd95"}), on="model", how="left")
    datasets = list(agg.meta["datasets"])
    cols = [Column(f"rank_{d}", f"{d} (Dice rank)", decimals=1) for d in datasets]
    cols += [Column("mean_rank", "Mean rank (Dice)", better="min", decimals=2),
             Column("mean_rank_hd95", "Mean rank (HD95)", better="min", decimals=2),
             Column("n_datasets", "Datasets", decimals=0)]
    rows = []
    for _, r in merged.iterrows():
        row = {f"rank_{d}": r.get(d, math.nan) for d in datasets}
        row.update(mean_rank=r["mean_rank"], mean_rank_hd95=r.get("mean_rank_hd95", math.nan), n_datasets=r["n_datasets"])
        rows.append((r["model"], row))
    synth = [d for d, m in agg.meta["datasets"].items() if m.get("synthetic")]
    cap = ("Ranks across datasets: per dataset, models ranked by pooled mean Dice of the primary region (mean over "
           "regions where there are several; 1 = best, ties share the average rank); mean rank over the datasets a model "
           "was run on. The HD95 column ranks by mean HD95 (lower is better). Best mean rank in bold.")
    if synth:
        cap += f" Synthetic stand-ins included: {', '.join(synth)}."
    return Table(name="Table: ranks", caption=cap, label="tab:ranks", columns=cols, rows=rows), merged


def statistics(agg: Aggregate, n_resamples: int = 10_000) -> dict[str, Any]:
    """Wilcoxon (Holm) against the reference and bootstrap CIs, as frames and per-dataset Tables."""
    seed = int(agg.meta.get("seed", 0) or 0)
    ref = agg.reference
    wil = S.paired_tests(agg.per_case, ref, metrics=("dice", "hd95"))
    boots = pd.concat([S.bootstrap_table(agg.per_case, m, n_resamples=n_resamples, seed=seed) for m in ("dice", "hd95")],
                      ignore_index=True)
    tables: dict[str, list[tuple[str, Table]]] = {}
    for name, ds in agg.meta["datasets"].items():
        primary = agg.primary_region(name)
        out = []
        for metric, scale, label in (("dice", 100.0, "Dice %"), ("hd95", 1.0, f"HD95 ({ds.get('hd95_unit') or '?'})")):
            b = boots[(boots["dataset"] == name) & (boots["metric"] == metric) & (boots["region"] == primary)].set_index("model")
            w = wil[(wil["dataset"] == name) & (wil["metric"] == metric) & (wil["region"] == primary)].set_index("model")
            if b.empty:
                continue
            rows = []
            for model in _models(agg, name):
                row: dict[str, Any] = {}
                if model in b.index:
                    e = b.loc[model]
                    row.update(n=e["n"], mean=_f(e["mean"]) * scale, lo=_f(e["ci_low"]) * scale, hi=_f(e["ci_high"]) * scale)
                if model in w.index:
                    e = w.loc[model]
                    row.update(n_pairs=e["n"], median_diff=_f(e["median_diff"]) * scale, p=_f(e["p_value"]),
                               p_holm=_f(e["p_holm"]), verdict=e["verdict"])
                elif model == ref:
                    row["verdict"] = "reference"
                rows.append((model, row))
            higher = S.higher_is_better(metric)
            cols = [Column("n", "Cases", decimals=0), Column("mean", f"Mean {label}", better="max" if higher else "min", decimals=2),
                    Column("lo", "95% CI low", decimals=2), Column("hi", "95% CI high", decimals=2),
                    Column("n_pairs", "Pairs", decimals=0), Column("median_diff", f"Median Δ vs {ref}", decimals=2),
                    Column("p", "p (Wilcoxon)", decimals=4), Column("p_holm", "p (Holm)", decimals=4),
                    Column("verdict", "Verdict", text=True)]
            few = w[~w["n"].ge(S.MIN_PAIRED_CASES)] if len(w) else w
            notes = []
            if len(few):
                notes.append(f"{_cap(S.TOO_FEW)}: with n = {int(few['n'].min())} paired cases the exact two-sided "
                             f"Wilcoxon signed-rank test cannot reach p < 0.05 (it needs n ≥ {S.MIN_PAIRED_CASES}); no "
                             "p-value verdict is given.")
            if ds.get("synthetic"):
                notes.append("Synthetic stand-in data: these statistics check the pipeline, not the models.")
            cap = (f"{_ds_title(name, ds)}, {label}, region '{primary}': {synthetic_text(ds)}Mean with a 95% percentile "
                   f"bootstrap CI over pooled cases ({n_resamples} resamples, seed {seed}); two-sided Wilcoxon signed-rank "
                   f"test of each model against {ref} on per-case values paired by (fold, case), Holm-corrected over the "
                   f"models of this dataset and metric; Δ = model − {ref} ({'higher' if higher else 'lower'} is better). "
                   f"{_cap(rule_text(ds))}.")
            out.append((metric, Table(name=f"Statistics: {_ds_title(name, ds)}, {label}", caption=cap,
                                      label=f"tab:stats-{name}-{metric}", columns=cols, rows=rows, notes=notes)))
        tables[name] = out
    return dict(wilcoxon=wil, bootstrap=boots, tables=tables)


# --------------------------------------------------------------------------- figures
def make_figures(agg: Aggregate, directory: Path) -> dict[str, list]:
    """Every figure of the study, grouped by dataset."""
    from deconver.report import figures as F

    seed = int(agg.meta.get("seed", 0) or 0)
    out: dict[str, list] = {}
    for name, ds in agg.meta["datasets"].items():
        figs = []
        primary = agg.primary_region(name)
        syn = synthetic_text(ds)
        title_name = _ds_title(name, ds)
        figs.append(F.dice_distribution(
            agg.per_case, name, directory, reference=agg.reference, title=f"{title_name}: per-case Dice",
            caption=f"{syn}Per-case Dice (%) of every model on {name}, {ds.get('n_cases', '?')} cases pooled over folds "
                    f"{ds.get('folds')}{' and coloured by region' if primary == 'mean' else ''}; boxes: quartiles, whiskers: "
                    f"1.5 IQR, points: cases (a fixed random {F.MAX_POINTS} per box where there are more). {_cap(rule_text(ds))}."))
        figs.append(F.region_bars(
            agg.per_case, name, directory, reference=agg.reference, seed=seed, title=f"{title_name}: Dice per region",
            caption=f"{syn}Mean Dice (%) per region and model on {name}, error bars: 95% bootstrap interval (seaborn, 1000 "
                    f"resamples, seed {seed}). {_cap(rule_text(ds))}."))
        if agg.complexity is not None:
            figs.append(F.dice_vs_flops(
                agg.summary, agg.complexity, name, primary, directory, reference=agg.reference, rule=ds.get("rule"),
                dims=ds.get("spatial_dims"), title=f"{title_name}: accuracy vs cost",
                caption=f"{syn}Mean Dice (%, {primary}) against FLOPs per {'pixel' if ds.get('spatial_dims') == 2 else 'voxel'} "
                        f"(K, 2 per multiply-add of every convolution incl. NDC, linear layer and attention) on {name}; marker area ∝ parameters (M). The hollow marker is "
                        f"{agg.reference} at the paper's FLOPs convention (NDC convolutions not counted)."))
        if agg.training is not None:
            figs.append(F.training_curves(
                agg.training, name, directory, reference=agg.reference, title=f"{title_name}: training curves",
                caption=f"{syn}Training loss and validation Dice per epoch on {name} from each run's train_log.csv; "
                        "line: mean over folds, band: sd over folds."))
        out[name] = [f for f in figs if f is not None]
    return out


# --------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:2em auto;max-width:1200px;
color:#1b1b1b;line-height:1.45;padding:0 1em;background:#fff}
h1{border-bottom:3px solid #2a6f97;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0;display:block;overflow-x:auto}
th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
thead th{white-space:normal;min-width:4.5em;vertical-align:bottom}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:0 1.5em;align-items:start}
.figs .wide{grid-column:1/-1}
th[scope=row],thead th:first-child{text-align:left}thead th{border-bottom:2px solid #333;background:#f3f6f9}
td.best{background:#e8f4ea}figure{margin:1em 0 2em 0}figcaption{font-size:.85em;color:#333;margin:.3em 0;max-width:1100px}
img{max-width:100%;height:auto;border:1px solid #eee}.banner{background:#fff4d6;border:1px solid #e0b44c;padding:.6em 1em}
.note{font-size:.85em;color:#7a3b00}nav ul{columns:2}code{background:#f3f3f3;padding:0 .2em}
"""


def _img_tag(fig) -> str:
    raw = Path(fig.png).read_bytes()
    data = base64.b64encode(raw).decode("ascii")
    width, height = struct.unpack(">II", raw[16:24])  # PNG IHDR: a wide figure spans the whole row
    cls = "plot wide" if width > 1.8 * height else "plot"
    return (f"<figure class='{cls}' id='fig-{html.escape(fig.stem)}'><img alt='{html.escape(fig.title)}' "
            f"src='data:image/png;base64,{data}'><figcaption><b>{html.escape(fig.title)}.</b> {html.escape(fig.caption)} "
            f"<a href='figures/{html.escape(Path(fig.svg).name)}'>SVG</a></figcaption></figure>")


def render_html(agg: Aggregate, ds_tables: dict[str, Table], repro: Table | None, ranks: Table | None,
                stats_tables: dict[str, list[tuple[str, Table]]], figs: dict[str, list], files: list[str],
                ranking: dict | None = None, conventions: Table | None = None,
                protocols: list[tuple[str, str]] = (), obj_tables: dict[str, Table] | None = None,
                warnings: dict[str, str] | None = None) -> str:
    """The whole report as one HTML page (PNG figures embedded as base64, so the file stands alone)."""
    meta = agg.meta
    study = meta.get("study", "study")
    prov = meta.get("provenance", {})
    synth = [d for d, m in meta["datasets"].items() if m.get("synthetic")]
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>Deconver suite report: {html.escape(study)}</title>", f"<style>{CSS}{learning.CSS}</style></head><body>",
             f"<h1>Study <code>{html.escape(study)}</code></h1>",
             f"<p>Reference model: <b>{html.escape(agg.reference)}</b>. Datasets: "
             + ", ".join(html.escape(_ds_title(d, m)) for d, m in meta["datasets"].items())
             + f". Produced by deconver {html.escape(str(prov.get('deconver_version', '?')))} "
             f"(git {html.escape(str(prov.get('git_commit') or 'unknown'))[:12]}, torch {html.escape(str(prov.get('torch_version', '?')))}).</p>"]
    if synth:
        parts.append(f"<p class='banner'><b>Synthetic data.</b> {html.escape(', '.join(synth))} "
                     f"{'is a synthetic stand-in' if len(synth) == 1 else 'are synthetic stand-ins'}: the numbers check "
                     "the pipeline and are not comparable with the paper's.</p>")
    check = learning.section_html(meta)
    if learning.failures(meta):  # a red line at the top, the section says which and why
        parts.append(f"<p class='alarm'><b>{learning.DID_NOT_LEARN.capitalize()}:</b> "
                     f"{html.escape(', '.join(learning.failures(meta)))} (see <a href='#self-check'>Self-check</a>).</p>")
    if warnings:
        parts.append(f"<p class='banner'><b>Different metric settings.</b> The runs of {html.escape(', '.join(warnings))} "
                     "were not all evaluated with the same metric settings; see each dataset's section.</p>")
    nav = ["<nav><b>Contents</b><ul>"]
    if check:
        nav.append("<li><a href='#self-check'>Self-check: did every model learn?</a></li>")
    if repro is not None:
        nav.append("<li><a href='#reproduction'>Reproduction of the paper</a></li>")
    for d, m in meta["datasets"].items():
        nav.append(f"<li><a href='#ds-{html.escape(d)}'>{html.escape(_ds_title(d, m))}</a>"
                   + (f" (<a href='#ranking-{html.escape(d)}'>is the ranking real?</a>)" if ranking and d in ranking else "")
                   + "</li>")
    if conventions is not None:
        nav.append("<li><a href='#conventions'>Metric conventions</a></li>")
    if ranks is not None:
        nav.append("<li><a href='#ranks'>Ranks across datasets</a></li>")
    nav.append("<li><a href='#files'>Files</a></li></ul></nav>")
    parts += nav
    if check:
        parts.append(check)
    if repro is not None:
        parts += ["<section id='reproduction'><h2>Reproduction of the paper</h2>", repro.to_html(), "</section>"]
    for d, m in meta["datasets"].items():
        parts.append(f"<section id='ds-{html.escape(d)}'><h2>{html.escape(_ds_title(d, m))}</h2>")
        if m.get("synthetic"):
            parts.append("<p class='banner'>Synthetic stand-in dataset.</p>")
        if d in (warnings or {}):
            parts.append(f"<p class='banner'><b>Different metric settings.</b> {html.escape(warnings[d])}</p>")
        parts.append(ds_tables[d].to_html())
        if d in (obj_tables or {}):
            parts += [f"<h3 id='objects-{html.escape(d)}'>Object-level metrics</h3>", obj_tables[d].to_html()]
        parts.append("<div class='figs'>")
        for fig in figs.get(d, []):
            parts.append(_img_tag(fig))
        parts.append("</div>")
        parts.append("<h3>Statistics</h3>")
        for _, t in stats_tables.get(d, []):
            parts.append(t.to_html())
        if ranking and d in ranking:
            parts.append(_ranking_html(ranking[d]))
        parts.append("</section>")
    if conventions is not None:
        parts += ["<section id='conventions'><h2>Metric conventions</h2>", conventions.to_html(), "</section>"]
    if protocols:
        parts.append("<section id='protocols'><h2>Protocols</h2><p>The resolved recipe of each dataset "
                     "(<code>deconver protocol</code>; docs/protocol.md compares it with the authors' bundles):</p><ul>")
        parts += [f"<li>{html.escape(d)}: <a href='{html.escape(link)}'>{html.escape(link)}</a></li>" for d, link in protocols]
        parts.append("</ul></section>")
    if ranks is not None:
        parts += ["<section id='ranks'><h2>Ranks across datasets</h2>", ranks.to_html(), "</section>"]
    parts.append("<section id='files'><h2>Files</h2><p>Tables as Markdown, LaTeX (booktabs) and CSV; figures as PNG "
                 "and SVG; statistics at full precision:</p><ul>")
    parts += [f"<li><a href='{html.escape(f)}'>{html.escape(f)}</a></li>" for f in files]
    parts.append("</ul></section></body></html>")
    return "\n".join(parts) + "\n"


def _ranking_html(sec) -> str:
    """One dataset's "Is the ranking real?" subsection (deconver.report.ranking_section.Section)."""
    parts = [f"<h3 id='ranking-{html.escape(sec.dataset)}'>Is the ranking real?</h3>", f"<p>{html.escape(sec.summary)}</p>",
             "<div class='figs'>"] + [_img_tag(f) for f in sec.figures] + ["</div>"]
    return "\n".join(parts + [t.to_html() for _, t in sec.tables])


# --------------------------------------------------------------------------- the step
def _digest(files: list[Path], options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for f in files:
        h.update(f.name.encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def report(aggregate_dir: Path, out: Path, force: bool = False, n_resamples: int = 10_000,
           rank_resamples: int = 1000) -> dict[str, Any]:
    """Render the report of one aggregate folder into `out`; returns report.json's content."""
    from deconver import __version__

    agg = load_aggregate(aggregate_dir)
    out = Path(out)
    digest = _digest(agg.files, dict(version=__version__, output=OUTPUT_VERSION, n_resamples=n_resamples,
                                     rank_resamples=rank_resamples))
    manifest_path = out / "report.json"
    if not force and manifest_path.is_file() and (out / "report.html").is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("inputs_digest") == digest and all((out / f).is_file() for f in old.get("files", [])):
            os.utime(out / "report.html")  # newer than the aggregate again, so make-like tools see it done
            old["_up_to_date"] = True
            return old

    written: list[Path] = []
    ds_tables, obj_tables = {}, {}
    warnings = settings_notes(agg.meta["datasets"])
    for name, ds in agg.meta["datasets"].items():
        t = dataset_table(agg, name)
        t.notes += [warnings[name]] if name in warnings else []
        ds_tables[name] = t
        written += t.write(out / "tables", name).values()
        obj = object_table(agg.summary, name, ds, _models(agg, name), _ds_title(name, ds))
        if obj is not None:
            obj_tables[name] = obj
            written += obj.write(out / "tables", f"{name}_objects").values()
    repro = reproduction_table(agg)
    if repro is not None:
        written += repro.write(out / "tables", "reproduction").values()
    conv_summary = load_conventions(agg.directory)
    conventions = None if conv_summary is None else conventions_table(
        conv_summary, agg.meta["datasets"], {d: agg.primary_region(d) for d in agg.meta["datasets"]})
    if conventions is not None:
        written += conventions.write(out / "tables", "conventions").values()
    protocols = protocol_links(agg.meta.get("results", ""), agg.meta["datasets"], agg.reference, out)
    ranks, ranks_df = rank_tables(agg)
    if ranks is not None:
        written += ranks.write(out / "tables", "ranks").values()

    st = statistics(agg, n_resamples=n_resamples)
    sdir = out / "statistics"
    for key in ("wilcoxon", "bootstrap"):
        write_text_atomic(sdir / f"{key}.csv", st[key].to_csv(index=False, lineterminator="\n"))
        written.append(sdir / f"{key}.csv")
    if len(ranks_df):
        write_text_atomic(sdir / "ranks.csv", ranks_df.to_csv(index=False, lineterminator="\n"))
        written.append(sdir / "ranks.csv")
    for name, tables in st["tables"].items():
        for metric, t in tables:
            written += t.write(sdir, f"{name}_{metric}").values()

    from deconver.report import ranking_section

    ranking, ranking_files = ranking_section.build(
        agg.per_case, agg.meta["datasets"], {d: agg.primary_region(d) for d in agg.meta["datasets"]}, out,
        n_boot=rank_resamples, seed=int(agg.meta.get("seed", 0) or 0), conventions=agg.conventions,
        describe=lambda ds: f"{synthetic_text(ds)}Per-case values after the empty-mask rule '{ds.get('rule')}'. ")
    written += ranking_files

    figs = make_figures(agg, out / "figures")
    for fl in figs.values():
        for f in fl:
            written += [f.png, f.svg]

    rel = sorted(str(p.relative_to(out)) for p in written)
    page = render_html(agg, ds_tables, repro, ranks, st["tables"], figs, rel, ranking, conventions, protocols,
                       obj_tables=obj_tables, warnings=warnings)
    manifest = dict(study=agg.meta.get("study"), aggregate=str(agg.directory), inputs_digest=digest,
                    files=rel + ["report.html"], generated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    n_too_few=int((~st["wilcoxon"]["n"].ge(S.MIN_PAIRED_CASES)).sum()) if len(st["wilcoxon"]) else 0)
    write_json_atomic(manifest_path, manifest)
    write_text_atomic(out / "report.html", page)  # last: its presence means the report is complete
    return manifest


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="study config (YAML): reads <results>/<study>/aggregate, writes reports/<study>")
    parser.add_argument("--results", type=Path, help="the study's results folder <results_dir>/<study> (reads its aggregate/)")
    parser.add_argument("--aggregate", type=Path, help="the aggregate folder itself (default: <results>/aggregate)")
    parser.add_argument("--out", type=Path, help="report folder (default: <reports_dir>/<study>)")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples of the CIs (default 10000)")
    parser.add_argument("--rank-resamples", type=int, default=1000,
                        help="bootstrap resamples of the ranking analysis (default 1000; docs/report.md)")
    parser.add_argument("--force", action="store_true", help="re-render even if the aggregate is unchanged")


def run(args: argparse.Namespace) -> int:
    from deconver.config import ConfigError

    try:
        agg_dir, out = args.aggregate, args.out
        if args.config:
            from deconver.config import load_study

            study = load_study(args.config)
            paths = StudyPaths.of(study)
            results = args.results or paths.results
            agg_dir = agg_dir or StudyPaths.at(results).aggregate()
            out = out or paths.reports
        else:
            if agg_dir is None and args.results is None:
                print("deconver report: give --config STUDY.yaml, or --results DIR (or --aggregate DIR) and --out DIR", file=sys.stderr)
                return 2
            agg_dir = agg_dir or StudyPaths.at(args.results).aggregate()
            if out is None:
                print("deconver report: --out DIR is needed without --config", file=sys.stderr)
                return 2
        manifest = report(agg_dir, out, force=args.force, n_resamples=args.resamples,
                          rank_resamples=args.rank_resamples)
    except (ReportError, ConfigError) as err:
        print(f"deconver report: {err}", file=sys.stderr)
        return 1
    if manifest.get("_up_to_date"):
        print(f"deconver report: {out} is up to date")
    else:
        print(f"deconver report: {len(manifest['files'])} files → {out} (open {out / 'report.html'})")
    return 0
