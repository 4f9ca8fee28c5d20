"""The report's "Is the ranking real?" section: tables, figures and captions of `deconver.report.ranking`.

Per dataset and metric (Dice, HD95) on the dataset's primary region, four tables (Markdown, LaTeX,
CSV) and four figures (PNG, SVG; Dice and HD95 side by side):

    ranking/<dataset>_<metric>_bootstrap.*      full-data rank, bootstrap rank median and 95 % interval, P(first)
    ranking/<dataset>_<metric>_methods.*        aggregate-then-rank, rank-then-aggregate, test-based
    ranking/<dataset>_<metric>_significance.*   Holm-adjusted one-sided p of every ordered pair
    ranking/<dataset>_<metric>_conventions.*    rank under each empty-mask rule / metric convention, changes marked
    ranking/{bootstrap,stability,methods,pairwise,conventions}.csv   every dataset, metric and region
    figures/ranking_{blob,methods,significance,conventions}_<dataset>.{png,svg}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from deconver.io import write_text_atomic
from deconver.report import ranking as R
from deconver.report.tables import Column, Table

METRICS = ("dice", "hd95")
TABLE_DIR = "ranking"


@dataclass
class Section:
    """One dataset's ranking section: (stem, Table) pairs, figures and the one-line stability summary."""

    dataset: str
    tables: list[tuple[str, Table]] = field(default_factory=list)
    figures: list = field(default_factory=list)
    summary: str = ""


def _label(metric: str, ds: dict[str, Any]) -> str:
    return "Dice" if metric == "dice" else f"HD95 ({ds.get('hd95_unit') or '?'})"


def _csv(frame: pd.DataFrame, path: Path) -> Path:
    write_text_atomic(path, frame.to_csv(index=False, float_format="%.10g", lineterminator="\n"))
    return path


def read_conventions(aggregate_dir: Path) -> pd.DataFrame | None:
    """aggregate's conventions_per_case.csv (every metric convention under its own rule), if written."""
    from deconver.report.conventions import OUTPUTS

    path = Path(aggregate_dir) / OUTPUTS[0]
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"case": str, "region": str, "metric": str, "model": str, "dataset": str,
                                    "convention": str})


def analyse(per_case: pd.DataFrame, datasets: dict[str, dict], n_boot: int = R.N_BOOTSTRAP, seed: int = 0,
            alpha: float = R.ALPHA, conventions: pd.DataFrame | None = None) -> dict[str, Any]:
    """Every ranking result of every dataset × metric × region, as objects and long frames."""
    boots = R.study_bootstrap(per_case, METRICS, n_boot=n_boot, seed=seed)
    try:
        variants, variant_error = R.convention_variants(per_case, datasets, conventions), None
    except (ValueError, KeyError) as err:  # e.g. an aggregate written before `diagonal` was kept
        variants, variant_error = {"as aggregated": per_case}, str(err)
    ranked, tests, conv_ranks = {}, {}, {}
    for key in boots:
        dataset, metric, region = key
        x = R.case_matrix(per_case, dataset, metric, region)
        tests[key] = R.pairwise_tests(x, metric, alpha)
        ranked[key] = R.ranking_methods(x, metric, tests[key])
        conv_ranks[key] = R.convention_ranks(variants, dataset, metric, region)

    def stack(frames: dict, reset: bool = True) -> pd.DataFrame:
        parts = [(f.reset_index() if reset else f).assign(dataset=d, metric=m, region=r) for (d, m, r), f in frames.items()]
        if not parts:
            return pd.DataFrame()
        out = pd.concat(parts, ignore_index=True)
        return out[["dataset", "metric", "region"] + [c for c in out.columns if c not in ("dataset", "metric", "region")]]

    stability = pd.DataFrame([dict(dataset=d, metric=m, region=r, **b.tau_stats()) for (d, m, r), b in boots.items()])
    rules = {}  # dataset → {other convention: its empty-mask rule(s)}, for the captions
    if conventions is not None and {"convention", "rule"} <= set(conventions.columns):
        for (d, c), g in conventions.groupby(["dataset", "convention"]):
            rules.setdefault(d, {})[c] = "/".join(sorted(g["rule"].dropna().astype(str).unique()))
    return dict(boots=boots, tests=tests, methods=ranked, conventions=conv_ranks, variants=list(variants),
                variant_rules=rules,
                variant_error=variant_error, n_boot=n_boot, seed=seed, alpha=alpha,
                frames=dict(bootstrap=stack({k: b.summary() for k, b in boots.items()}), stability=stability,
                            methods=stack(ranked), pairwise=stack(tests, reset=False), conventions=stack(conv_ranks)))


def build(per_case: pd.DataFrame, datasets: dict[str, dict], primary: dict[str, str], out: Path,
          n_boot: int = R.N_BOOTSTRAP, seed: int = 0, describe: Callable[[dict], str] = lambda ds: "",
          alpha: float = R.ALPHA, conventions: pd.DataFrame | None = None) -> tuple[dict[str, Section], list[Path]]:
    """Compute, write and caption the section for every dataset; returns the sections and the files.

    `primary`: dataset → the region shown in tables and figures (the CSVs hold every region);
    `describe(ds)`: the caption prefix of a dataset (e.g. a synthetic-data warning and its rule);
    `conventions`: the other metric conventions' per-case rows (`read_conventions`), if any.
    """
    from deconver.report import figures as F

    out = Path(out)
    res = analyse(per_case, datasets, n_boot, seed, alpha, conventions)
    written = [_csv(f, out / TABLE_DIR / f"{name}.csv") for name, f in res["frames"].items() if len(f)]
    sections = {}
    for dataset, ds in datasets.items():
        region = primary.get(dataset, "")
        keys = [(dataset, m, region) for m in METRICS if (dataset, m, region) in res["boots"]]
        if not keys:
            continue
        sec = Section(dataset)
        pre = describe(ds)
        n_cases = len(R.dataset_cases(per_case, dataset))
        blob, lines, sig, conv, taus = [], [], [], [], []
        for key in keys:
            metric = key[1]
            label = _label(metric, ds)
            boot, methods, tests, ranks = res["boots"][key], res["methods"][key], res["tests"][key], res["conventions"][key]
            t = boot.tau_stats()
            tau_txt = f"Kendall's τ median {t['tau_median']:.3f} (IQR {t['tau_q1']:.3f}–{t['tau_q3']:.3f})"
            taus.append(f"{label}: {tau_txt}")
            summ = boot.summary()
            blob.append((label, boot.frequencies(), summ, tau_txt))
            lines.append((label, methods[["rank_mean", "rank_case", "rank_test"]].set_axis(list(R.METHODS), axis=1), None))
            sig.append((label, tests, methods.index.tolist()))
            variant_cols = [c for c in ranks.columns if c != "changed"]
            conv.append((label, ranks[variant_cols], ranks["changed"]))
            where = f"{dataset}, {label}, region '{region}'"
            sec.tables += [
                (f"{dataset}_{metric}_bootstrap", _bootstrap_table(where, metric, summ, methods, tau_txt, n_cases, res,
                                                                    pre)),
                (f"{dataset}_{metric}_methods", _methods_table(where, metric, methods, res, pre)),
                (f"{dataset}_{metric}_significance", _significance_table(where, metric, tests, methods.index.tolist(), res, pre)),
                (f"{dataset}_{metric}_conventions", _conventions_table(where, metric, ranks, variant_cols, res, pre,
                                                                        _variant_note(res, dataset))),
            ]
        sec.summary = f"Ranking stability over {n_boot} bootstrap resamples of the {n_cases} cases: " + "; ".join(taus) + "."
        fig_dir = out / "figures"
        sec.figures = [f for f in (
            F.blob_plot(blob, fig_dir, f"ranking_blob_{dataset}", f"{dataset}: bootstrap ranks", pre + (
                f"Blob plot (challengeR): the aggregate-then-rank (mean) ranking of each model in {n_boot} bootstrap "
                f"resamples of the {n_cases} cases of {dataset} (region '{region}'), drawn with replacement and paired "
                f"across models (seed {seed}); disc area ∝ the share of resamples giving that rank, × = median rank, "
                "line = 2.5–97.5 percentile of the ranks, red dot = the rank on all cases; models ordered by that rank. "
                "Above each panel: Kendall's τ-b between the full-data ranking and each resample's ranking.")),
            F.rank_lines(lines, fig_dir, f"ranking_methods_{dataset}", f"{dataset}: ranking methods", pre + (
                f"Each model's rank on {dataset} (region '{region}') under three ranking methods: aggregate-then-rank "
                "(rank of the mean over cases), rank-then-aggregate (rank of the mean per-case rank; a missing value ranks "
                "last in its case) and test-based (rank by the number of models beaten in one-sided Wilcoxon signed-rank "
                f"tests, Holm-adjusted, p < {alpha:g}); ties share the lowest rank. Models whose rank differs between "
                "methods are drawn solid.")),
            F.significance_map(sig, fig_dir, f"ranking_significance_{dataset}", f"{dataset}: significance map", pre + (
                f"Significance map: every ordered pair of models on {dataset} (region '{region}'); a filled cell means the "
                "row model is better than the column model in a one-sided Wilcoxon signed-rank test on the paired cases "
                f"(Holm-adjusted over all {len(methods) * (len(methods) - 1)} ordered pairs of the panel, p < {alpha:g}); "
                "the number is the adjusted p (empty: fewer than 6 paired cases, not tested). Rows and columns in "
                "aggregate-then-rank order.")),
            F.rank_lines(conv, fig_dir, f"ranking_conventions_{dataset}", f"{dataset}: convention sensitivity", pre + (
                f"Aggregate-then-rank (mean) rank of each model on {dataset} (region '{region}') under every variant "
                f"of the data: {', '.join(res['variants'])}. Models whose rank changes are solid and starred (*)."
                + _variant_note(res, dataset))),
        ) if f is not None]
        sections[dataset] = sec
        for stem, table in sec.tables:
            written += table.write(out / TABLE_DIR, stem).values()
        written += [p for f in sec.figures for p in (f.png, f.svg)]
    return sections, written


def _tag(kind: str, where: str, metric: str) -> str:
    """LaTeX label of a table: tab:rank-<kind>-<dataset>-<metric>."""
    return f"tab:rank-{kind}-{where.split(',')[0]}-{metric}"


def _variant_note(res: dict, dataset: str) -> str:
    if res["variant_error"]:
        return f" Other empty-mask rules could not be applied: {res['variant_error']}."
    text = (" 'suite, penalize' / 'suite, exclude': the suite's metric convention under each empty-mask rule "
            "(penalize: a case-region with exactly one empty mask gets Dice 0 and HD95 = the penalty; exclude: its "
            "HD95 is left out; Dice is the same under both).")
    others = {c: r for c, r in res["variant_rules"].get(dataset, {}).items() if c != R.SUITE}
    if others:
        text += (" Other metric conventions (docs/metrics.md), each under its own rule: "
                 + ", ".join(f"'{c}' ({r})" for c, r in sorted(others.items())) + ".")
    return text


def _bootstrap_table(where, metric, summ, methods, tau_txt, n_cases, res, pre) -> Table:
    scale = 100.0 if metric == "dice" else 1.0
    rows = [(m, dict(mean=methods.loc[m, "mean"] * scale, rank_full=r["rank_full"], rank_median=r["rank_median"],
                     rank_lo=r["rank_lo"], rank_hi=r["rank_hi"], p_first=r["p_first"] * 100)) for m, r in summ.iterrows()]
    rows.sort(key=lambda mr: (mr[1]["rank_full"], mr[0]))
    cols = [Column("mean", "Mean %" if metric == "dice" else "Mean", better="max" if metric == "dice" else "min"),
            Column("rank_full", "Rank (all cases)", decimals=0), Column("rank_median", "Median bootstrap rank", decimals=1),
            Column("rank_lo", "Rank 2.5%", decimals=0), Column("rank_hi", "Rank 97.5%", decimals=0),
            Column("p_first", "Ranked first (% of resamples)", decimals=1)]
    cap = (f"{pre}Bootstrap ranking, {where}: aggregate-then-rank (mean) on all {n_cases} cases and on each of "
           f"{res['n_boot']} resamples of the cases with replacement, paired across models (seed {res['seed']}); median "
           f"and 2.5–97.5 percentile of each model's rank over the resamples. Stability: {tau_txt} between the "
           "full-data ranking and the resamples' rankings (1 = the same order every time). Ties share the lowest rank.")
    return Table(name=f"Bootstrap ranking: {where}", caption=cap, label=_tag("boot", where, metric),
                 columns=cols, rows=rows)


def _methods_table(where, metric, methods, res, pre) -> Table:
    scale = 100.0 if metric == "dice" else 1.0
    rows = [(m, dict(r, mean=r["mean"] * scale)) for m, r in methods.iterrows()]
    cols = [Column("mean", "Mean %" if metric == "dice" else "Mean", better="max" if metric == "dice" else "min"),
            Column("rank_mean", "Rank: aggregate-then-rank", decimals=0),
            Column("mean_case_rank", "Mean per-case rank", better="min", decimals=2),
            Column("rank_case", "Rank: rank-then-aggregate", decimals=0),
            Column("wins", "Significant wins", better="max", decimals=0),
            Column("rank_test", "Rank: test-based", decimals=0)]
    cap = (f"{pre}Ranking methods, {where}: aggregate-then-rank ranks the mean over cases; rank-then-aggregate ranks "
           "the models within each case (a missing value ranks last) and then their mean per-case rank; test-based "
           "counts the models each model beats in a one-sided Wilcoxon signed-rank test on paired cases (Holm-adjusted "
           f"over all ordered pairs, p < {res['alpha']:g}). Ties share the lowest rank.")
    return Table(name=f"Ranking methods: {where}", caption=cap, label=_tag("methods", where, metric),
                 columns=cols, rows=rows)


def _significance_table(where, metric, tests, order, res, pre) -> Table:
    p = tests.pivot(index="model", columns="other", values="p_holm").reindex(index=order, columns=order)
    cols = [Column(f"vs_{m}", f"better than {m}?", decimals=4) for m in order]
    rows = [(m, {f"vs_{o}": p.loc[m, o] for o in order}) for m in order]
    cap = (f"{pre}Significance map as a table, {where}: Holm-adjusted p of the one-sided Wilcoxon signed-rank test "
           "that the row model is better than the column model on their paired cases (all ordered pairs form one "
           f"family); p < {res['alpha']:g} is significant; – = the same model, or fewer than 6 paired cases.")
    return Table(name=f"Pairwise tests: {where}", caption=cap, label=_tag("sig", where, metric), columns=cols, rows=rows)


def _conventions_table(where, metric, ranks, variant_cols, res, pre, note) -> Table:
    cols = [Column(f"v{i}", c, decimals=0) for i, c in enumerate(variant_cols)] + [Column("changed", "Rank changes", text=True)]
    rows = [(m, {**{f"v{i}": r[c] for i, c in enumerate(variant_cols)}, "changed": "yes *" if r["changed"] else "no"})
            for m, r in ranks.iterrows()]
    moved = [m for m, r in ranks.iterrows() if r["changed"]]
    cap = (f"{pre}Convention sensitivity, {where}: aggregate-then-rank (mean) rank under every variant of the data "
           f"({', '.join(variant_cols)}). " + (f"Rank changes: {', '.join(moved)}." if moved else "No rank changes.")
           + note)
    return Table(name=f"Convention sensitivity: {where}", caption=cap,
                 label=_tag("conv", where, metric), columns=cols, rows=rows)
