"""What the report holds: the per-dataset, reproduction, rank and statistics tables and the figures.

Each builder takes the aggregate (deconver.report.inputs) and returns `deconver.report.tables.Table`s
(or written figures) with their captions (words from deconver.report.captions); render.py writes them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from deconver import published
from deconver.report import stats as S
from deconver.report.captions import (FLOPS_SENTENCE, complexity_caption, ds_title, hd_text, rule_text, synthetic_text,
                                      upper_first)
from deconver.report.convention_tables import REPRODUCTION_COLUMNS, load_conventions, reproduction_columns
from deconver.report.inputs import Aggregate, to_float
from deconver.report.tables import Column, Table


def _summary(agg: Aggregate, dataset: str, rule: str | None = None) -> pd.DataFrame:
    s = agg.summary[agg.summary["dataset"] == dataset]
    rule = rule or agg.ds(dataset).get("rule")
    if "rule" in s.columns:
        s = s[s["rule"] == rule]
    return s


def models_of(agg: Aggregate, dataset: str) -> list[str]:
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
    for model in models_of(agg, dataset):
        m = s[s["model"] == model].set_index(["metric", "region"])
        row: dict[str, Any] = {}
        for r in shown_regions:
            row[f"dice_{r}"] = _pair(m, "dice", r, scale=100)
            row[f"hd95_{r}"] = _pair(m, "hd95", r)
        if ("dice", primary) in m.index:
            e = m.loc[("dice", primary)]
            row["dice_fold_mean"] = (float(e["fold_mean"]) * 100, to_float(e["fold_std"]) * 100)
        for key, metric in (("n_penalized", "dice"), ("n_excluded", "hd95")):
            counts = [int(m.loc[(metric, r), key]) if (metric, r) in m.index else 0 for r in regions]
            row[key] = "/".join(str(c) for c in counts)
        if cx is not None and model in cx.index:
            c = cx.loc[model]
            row.update(params_m=to_float(c["params_m"]), flops_k=to_float(c["flops_per_voxel_k"]),
                       paper_flops_k=to_float(c["paper_flops_per_voxel_k"]), latency_ms=to_float(c["latency_ms"]),
                       memory_mb=to_float(c["peak_memory_mb"]))
        rows.append((model, row))
    n_pen = ", ".join(f"{m} {r['n_penalized']}" for m, r in rows)
    n_exc = ", ".join(f"{m} {r['n_excluded']}" for m, r in rows)
    folds = ds.get("folds", [])
    cap = [f"{ds_title(dataset, ds)}: {synthetic_text(ds)}Dice in % as mean ± sample std over all {ds.get('n_cases', '?')} "
           f"cases pooled across {len(folds)} fold(s) {folds}; 'fold means' = mean ± std of the per-fold means"
           + (f"; 'mean' = per-case mean over {', '.join(regions)}" if multi else "") + ".",
           f"HD95 in {unit} ({hd_text(ds)}), lower is better.",
           f"{upper_first(rule_text(ds))}; case-regions with exactly one empty mask (Dice set to 0"
           + ("" if is_excl else ", HD95 to the penalty") + f") per model in column 'Pen.{per_region}': {n_pen}"
           + (f"; left out of HD95 in column 'Excl. HD95{per_region}': {n_exc}" if is_excl else "") + ".",
           "Best value per column in bold."]
    if cx is not None:
        cap.append(complexity_caption(cx, "pixel" if ds.get("spatial_dims") == 2 else "voxel"))
    if ds.get("skipped_models"):
        cap.append("Not run on this dataset: " + "; ".join(f"{m} ({w})" for m, w in ds["skipped_models"].items()) + ".")
    return Table(name=f"Table: {ds_title(dataset, ds)}", caption=" ".join(cap), label=f"tab:{dataset}", columns=cols,
                 rows=rows)


def _pair(m: pd.DataFrame, metric: str, region: str, scale: float = 1.0):
    if (metric, region) not in m.index:
        return None
    e = m.loc[(metric, region)]
    return (to_float(e["mean"]) * scale, to_float(e["std"]) * scale)


def reproduction_table(agg: Aggregate) -> Table | None:
    """The paper's Deconver numbers beside ours, per dataset the study marks as the paper's (its preset's row)."""
    ref = agg.reference
    rows = []
    synth = []
    for name, ds in agg.meta["datasets"].items():
        paper = published.RESULTS.get(ds.get("preset", name)) if ds.get("paper") else None  # marked by the study
        if paper is None or ref not in ds.get("models", []):
            continue
        s = agg.summary[(agg.summary["dataset"] == name) & (agg.summary["model"] == ref)]
        primary = agg.primary_region(name)

        def val(metric, rule, scale=1.0):
            e = s[(s["metric"] == metric) & (s["region"] == primary) & (s.get("rule", rule) == rule)]
            return to_float(e["mean"].iloc[0]) * scale if len(e) else math.nan

        row = dict(data="synthetic" if ds.get("synthetic") else "real",
                   dice_paper=paper["dice"], dice_ours=val("dice", ds["rule"], 100),
                   dice_excl=val("dice", "exclude", 100),
                   hd_paper=paper["hd95"], hd_ours=val("hd95", ds["rule"]), hd_unit=ds.get("hd95_unit"),
                   params_paper=paper["params_m"], flops_paper=paper["flops_k"])
        if agg.complexity is not None:
            c = agg.complexity[(agg.complexity["dataset"] == name) & (agg.complexity["model"] == ref)]
            if len(c):
                row.update(params_ours=to_float(c["params_m"].iloc[0]), flops_paper_conv=to_float(c["paper_flops_per_voxel_k"].iloc[0]),
                           flops_ours=to_float(c["flops_per_voxel_k"].iloc[0]))
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
    cap = (f"Reproduction: the paper's reported {ref} results (arXiv:2504.00302, docs/paper.md §3) beside ours. "
           "'ours' uses each dataset's empty-mask rule; 'exclude rule' drops one-side-empty cases as the authors' MONAI "
           "code did. The paper's HD95 is in voxels of the resampled grid for 3D (MONAI without spacing; "
           + ", ".join(f"{k}: {v}" for k, v in published.HD95_UNIT.items()) + ") and pixels for 2D. "
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
            for model in models_of(agg, name):
                row: dict[str, Any] = {}
                if model in b.index:
                    e = b.loc[model]
                    row.update(n=e["n"], mean=to_float(e["mean"]) * scale, lo=to_float(e["ci_low"]) * scale, hi=to_float(e["ci_high"]) * scale)
                if model in w.index:
                    e = w.loc[model]
                    row.update(n_pairs=e["n"], median_diff=to_float(e["median_diff"]) * scale, p=to_float(e["p_value"]),
                               p_holm=to_float(e["p_holm"]), verdict=e["verdict"])
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
                notes.append(f"{upper_first(S.TOO_FEW)}: with n = {int(few['n'].min())} paired cases the exact two-sided "
                             f"Wilcoxon signed-rank test cannot reach p < 0.05 (it needs n ≥ {S.MIN_PAIRED_CASES}); no "
                             "p-value verdict is given.")
            if ds.get("synthetic"):
                notes.append("Synthetic stand-in data: these statistics check the pipeline, not the models.")
            cap = (f"{ds_title(name, ds)}, {label}, region '{primary}': {synthetic_text(ds)}Mean with a 95% percentile "
                   f"bootstrap CI over pooled cases ({n_resamples} resamples, seed {seed}); two-sided Wilcoxon signed-rank "
                   f"test of each model against {ref} on per-case values paired by (fold, case), Holm-corrected over the "
                   f"models of this dataset and metric; Δ = model − {ref} ({'higher' if higher else 'lower'} is better). "
                   f"{upper_first(rule_text(ds))}.")
            out.append((metric, Table(name=f"Statistics: {ds_title(name, ds)}, {label}", caption=cap,
                                      label=f"tab:stats-{name}-{metric}", columns=cols, rows=rows, notes=notes)))
        tables[name] = out
    return dict(wilcoxon=wil, bootstrap=boots, tables=tables)


def make_figures(agg: Aggregate, directory: Path) -> dict[str, list]:
    """Every figure of the study, grouped by dataset."""
    from deconver.report import figures as F

    seed = int(agg.meta.get("seed", 0) or 0)
    out: dict[str, list] = {}
    for name, ds in agg.meta["datasets"].items():
        figs = []
        primary = agg.primary_region(name)
        syn = synthetic_text(ds)
        title_name = ds_title(name, ds)
        figs.append(F.dice_distribution(
            agg.per_case, name, directory, reference=agg.reference, title=f"{title_name}: per-case Dice",
            caption=f"{syn}Per-case Dice (%) of every model on {name}, {ds.get('n_cases', '?')} cases pooled over folds "
                    f"{ds.get('folds')}{' and coloured by region' if primary == 'mean' else ''}; boxes: quartiles, whiskers: "
                    f"1.5 IQR, points: cases (a fixed random {F.MAX_POINTS} per box where there are more). {upper_first(rule_text(ds))}."))
        figs.append(F.region_bars(
            agg.per_case, name, directory, reference=agg.reference, seed=seed, title=f"{title_name}: Dice per region",
            caption=f"{syn}Mean Dice (%) per region and model on {name}, error bars: 95% bootstrap interval (seaborn, 1000 "
                    f"resamples, seed {seed}). {upper_first(rule_text(ds))}."))
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
