"""Benchmark: does each dataset's best model hold when the same study is run with another seed?

Goal (issue 16): with a second seed (``snakemake --cores all --config study=default-seed7 seed=7``) the
best model of each dataset stays the same or is within the bootstrap CI (verdicts below).
Both studies must have been aggregated (``<results>/<study>/aggregate/per_case.csv``). Per dataset and
seed: each model's mean Dice over the validation cases (a multi-region dataset's Dice averaged over
its regions per case first) with its 95 % percentile bootstrap CI (`deconver.report.stats.bootstrap_ci`,
the report's own), the best model, and the verdict:

- ``same``: both seeds pick the same best model;
- ``within CI``: they differ, but in the second seed's results the first seed's winner has a mean inside
  the CI of the second seed's winner (the cases do not tell the two apart);
- ``changed``: otherwise.

``symmetric`` also says whether the converse holds in the first seed's results (the second seed's winner
inside the CI of the first seed's winner), the stricter reading.

It also records every model's Dice in both seeds and the lowest one (the study's "every model ≥ 0.5"
goal). Results go to ``results/benchmarks/seed_stability.json`` (or ``--out``).

    python benchmarks/seed_stability.py results/default results/default-seed7 [--out PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from deconver.io import provenance, write_json_atomic
from deconver.paths import StudyPaths
from deconver.report.stats import bootstrap_ci

REPO = Path(__file__).resolve().parents[1]
METRIC = "dice"


def case_means(results: Path) -> pd.DataFrame:
    """Per dataset, model and (fold, case): the Dice averaged over the dataset's regions."""
    path = StudyPaths.at(results).aggregate() / "per_case.csv"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run the study, or `deconver aggregate`, first)")
    df = pd.read_csv(path)
    df = df[df["metric"] == METRIC]
    return df.groupby(["dataset", "model", "fold", "case"], sort=True)["value"].mean().reset_index()


def scores(cases: pd.DataFrame) -> dict[str, dict[str, dict]]:
    """dataset -> model -> {mean, ci_low, ci_high, n}."""
    out: dict[str, dict[str, dict]] = {}
    for (dataset, model), grp in cases.groupby(["dataset", "model"], sort=True):
        v = grp["value"].to_numpy(dtype=float)
        low, high = bootstrap_ci(v)
        out.setdefault(dataset, {})[model] = {"mean": float(v.mean()), "ci_low": low, "ci_high": high, "n": int(v.size)}
    return out


def best(models: dict[str, dict]) -> str:
    return max(sorted(models), key=lambda m: models[m]["mean"])


def compare(first: Path, second: Path) -> dict:
    a, b = scores(case_means(first)), scores(case_means(second))
    rows = []
    for dataset in sorted(set(a) & set(b)):
        sa, sb = a[dataset], b[dataset]
        wa, wb = best(sa), best(sb)
        # the first winner inside the second winner's CI in the second seed's results, and the converse
        holds = wa in sb and sb[wa]["mean"] >= sb[wb]["ci_low"]
        converse = wb in sa and sa[wb]["mean"] >= sa[wa]["ci_low"]
        verdict = "same" if wa == wb else "within CI" if holds else "changed"
        lowest = min(((s[m]["mean"], m, which) for which, s in (("first", sa), ("second", sb)) for m in s))
        rows.append({"dataset": dataset, "best_first": wa, "best_second": wb, "verdict": verdict,
                     "stable": verdict != "changed", "symmetric": wa == wb or (holds and converse),
                     "lowest_dice": {"dice": lowest[0], "model": lowest[1], "seed_run": lowest[2]},
                     "first": sa, "second": sb})
    return {"first": str(first), "second": str(second), "metric": METRIC, "datasets": rows,
            "all_stable": all(r["stable"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="results folder of the first study, e.g. results/default")
    parser.add_argument("second", type=Path, help="results folder of the same study with another seed")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "seed_stability.json")
    args = parser.parse_args(argv)
    res = compare(args.first, args.second)
    res["provenance"] = provenance()
    for r in res["datasets"]:
        print(f"{r['dataset']:8s} best {r['best_first']:>10s} / {r['best_second']:<10s} {r['verdict']:9s} (symmetric: {r['symmetric']})  "
              f"lowest Dice {r['lowest_dice']['dice']:.3f} ({r['lowest_dice']['model']}, {r['lowest_dice']['seed_run']})")
        for m in sorted(set(r["first"]) | set(r["second"])):
            cells = []
            for which in ("first", "second"):
                s = r[which].get(m)
                cells.append(f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if s else "-")
            print(f"    {m:12s} {cells[0]:24s} {cells[1]}")
    write_json_atomic(args.out, res)
    print(f"all stable: {res['all_stable']}; written {args.out}")
    return 0 if res["all_stable"] else 1


if __name__ == "__main__":
    sys.exit(main())
