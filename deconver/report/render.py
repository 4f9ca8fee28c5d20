"""`deconver report`: the study's tables, statistics, figures and a self-contained HTML page.

Reads `<R>/aggregate/` (written by `deconver aggregate`) and writes `reports/<study>/`:

    tables/<dataset>.{md,tex,csv}         the paper's table per dataset (best value per column in bold)
    tables/reproduction.{md,tex,csv}      the paper's Deconver numbers (deconver.published) beside ours
    tables/ranks.{md,tex,csv}             mean rank per model across datasets
    statistics/<dataset>_<metric>.{md,tex,csv}  Wilcoxon vs the reference (Holm), bootstrap CIs
    statistics/{wilcoxon,bootstrap,ranks}.csv   every comparison, every region, full precision
    ranking/<dataset>_<metric>_*.{md,tex,csv}  is the ranking real? bootstrap ranks, methods, pairwise tests, conventions
    figures/*.png, figures/*.svg          distributions, Dice vs FLOPs, region bars, training curves, ranking
    report.html                           everything above with captions; images embedded (base64)
    report.json                           what was written + the input digest (reruns are no-ops)

What the tables and figures hold is in contents.py, their shared words in captions.py, the page in
html.py (templates/report.html.j2); this module writes them and is the CLI step.
"""
from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path
from typing import Any

from deconver.io import already_done, inputs_digest, write_json_atomic, write_text_atomic
from deconver.paths import StudyPaths
from deconver.report import stats as S
from deconver.report.captions import ds_title, synthetic_text
from deconver.report.convention_tables import conventions_table, load_conventions, protocol_links
from deconver.report.contents import (dataset_table, make_figures, models_of, rank_tables, reproduction_table,
                                      statistics)
from deconver.report.cost_section import cost_tables, read_cost
from deconver.report.html import render_html
from deconver.report.inputs import load_aggregate
from deconver.report.objects_section import object_table, settings_notes

OUTPUT_VERSION = 2  # 2: the ranking section


def report(aggregate_dir: Path, out: Path, force: bool = False, n_resamples: int = 10_000,
           rank_resamples: int = 1000) -> dict[str, Any]:
    """Render the report of one aggregate folder into `out`; returns report.json's content."""
    from deconver import __version__

    agg = load_aggregate(aggregate_dir)
    out = Path(out)
    cost_file = agg.directory / "cost.csv"
    digest = inputs_digest(agg.files + ([cost_file] if cost_file.is_file() else []), dict(version=__version__, output=OUTPUT_VERSION, n_resamples=n_resamples,
                                          rank_resamples=rank_resamples), label=lambda p: p.name)
    manifest_path = out / "report.json"
    if not force:
        done = already_done(manifest_path, digest, [out / "report.html"], touch=out / "report.html")
        if done is not None and all((out / f).is_file() for f in done.get("files", [])):
            return done

    written: list[Path] = []
    ds_tables, obj_tables = {}, {}
    warnings = settings_notes(agg.meta["datasets"])
    for name, ds in agg.meta["datasets"].items():
        t = dataset_table(agg, name)
        t.notes += [warnings[name]] if name in warnings else []
        ds_tables[name] = t
        written += t.write(out / "tables", name).values()
        obj = object_table(agg.summary, name, ds, models_of(agg, name), ds_title(name, ds))
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

    cost_df = read_cost(agg.directory)
    cost = cost_tables(cost_df) if cost_df is not None and len(cost_df) else []
    for name, t in cost:
        written += t.write(out / "tables", name).values()

    rel = sorted(str(p.relative_to(out)) for p in written)
    page = render_html(agg, ds_tables, repro, ranks, st["tables"], figs, rel, ranking, conventions, protocols,
                       obj_tables=obj_tables, warnings=warnings, cost=cost)
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
    from deconver.steps import UsageError, named_input, pipeline_mode

    agg_dir, out = named_input(args.aggregate, "--aggregate"), args.out
    results = named_input(args.results, "--results")
    if pipeline_mode(args):
        from deconver.config import load_study

        paths = StudyPaths.of(load_study(args.config))
        agg_dir = agg_dir or StudyPaths.at(results or paths.results).aggregate()
        out = out or paths.reports
    else:
        if agg_dir is None and results is None:
            raise UsageError("give --config STUDY.yaml, or --results DIR (or --aggregate DIR) and --out DIR")
        agg_dir = agg_dir or StudyPaths.at(results).aggregate()
        if out is None:
            raise UsageError("--out DIR is needed without --config")
    manifest = report(agg_dir, out, force=args.force, n_resamples=args.resamples, rank_resamples=args.rank_resamples)
    if manifest.get("_up_to_date"):
        print(f"deconver report: {out} is up to date")
    else:
        print(f"deconver report: {len(manifest['files'])} files → {out} (open {out / 'report.html'})")
    return 0
