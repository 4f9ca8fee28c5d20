"""Benchmark: the bootstrap ranking of a whole BraTS-size study (synthetic numbers), vectorised vs a loop.

Goal (issue 22): 1,000 paired bootstrap resamples of a 5-model × 1,251-case × 3-region study (ET, TC,
WT; Dice and HD95) ranked in ≤ 10 s on this CPU, vectorised (`deconver.report.ranking.study_bootstrap`:
one matrix product of draw counts with each case matrix), not a Python loop per resample. The
reference measured in the same run is that loop (pandas: resample the cases, mean per model, rank),
timed on `--loop-samples` resamples and scaled to the same count; its ranks on those resamples must
equal ours (same draws). Results go to ``results/benchmarks/ranking.json``.

    python benchmarks/ranking.py [--resamples 1000] [--loop-samples 20] [--repeats 3] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from deconver.io import provenance, write_json_atomic
from deconver.report import ranking as R

REPO = Path(__file__).resolve().parents[1]
MODELS = ["deconver", "unet", "dynunet", "segresnet", "swin_unetr"]
REGIONS = ["ET", "TC", "WT"]
N_CASES = 1251
GOAL_S = 10.0


def synthetic_study(seed: int = 0) -> pd.DataFrame:
    """A per_case.csv-like table: Dice in [0, 1] and HD95 in mm per model, case and region, models a
    few Dice points apart with case effects shared across models (as real per-case results are)."""
    rng = np.random.default_rng(seed)
    parts = []
    for r, region in enumerate(REGIONS):
        case_effect = rng.beta(8, 2, N_CASES)
        for k, model in enumerate(MODELS):
            dice = np.clip(case_effect - 0.01 * k + rng.normal(0, 0.05, N_CASES), 0, 1)
            hd = np.maximum(0, 30 * (1 - case_effect) + 0.3 * k + rng.gamma(2, 1.5, N_CASES))
            for metric, v in (("dice", dice), ("hd95", hd)):
                parts.append(pd.DataFrame(dict(dataset="brats23", model=model, fold=np.arange(N_CASES) % 5,
                                               case=[f"BraTS-{i:05d}" for i in range(N_CASES)], region=region,
                                               metric=metric, value=v)))
    return pd.concat(parts, ignore_index=True)


def loop_reference(per_case: pd.DataFrame, draws: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """The same bootstrap as a Python loop over resamples: draw the cases, groupby-mean, rank."""
    cases = R.dataset_cases(per_case, "brats23")
    keyed = per_case.set_index(R.CASE_KEYS).sort_index()
    out = {}
    for (metric, region), g in keyed.groupby(["metric", "region"], sort=True):
        ranks = []
        for w in draws:
            picked = cases.repeat(w)
            sample = g.loc[picked]
            means = sample.groupby("model")["value"].mean().reindex(sorted(MODELS))  # the columns of ours
            ranks.append(R.rank_scores(means.to_numpy(), higher_better=metric != "hd95"))
        out[(metric, region)] = np.array(ranks)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=R.N_BOOTSTRAP, help="bootstrap resamples (default 1000)")
    parser.add_argument("--loop-samples", type=int, default=20, help="resamples the loop reference is timed on")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the vectorised bootstrap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "ranking.json")
    args = parser.parse_args(argv)

    per_case = synthetic_study(args.seed)
    t0 = time.perf_counter()
    R.study_bootstrap(per_case[per_case["case"] < "BraTS-00010"], n_boot=10, seed=args.seed)  # warm-up: imports
    cold_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        boots = R.study_bootstrap(per_case, n_boot=args.resamples, seed=args.seed)
        times.append(time.perf_counter() - t0)
    ours_s = statistics.median(times)

    draws = R.case_draws(N_CASES, args.resamples, args.seed)[: args.loop_samples]  # the same first draws
    t0 = time.perf_counter()
    loop = loop_reference(per_case, draws)
    loop_s = (time.perf_counter() - t0) * args.resamples / args.loop_samples
    agree = all(np.array_equal(boots[("brats23", m, r)].ranks[: args.loop_samples], v) for (m, r), v in loop.items())

    tau = {f"{m}/{r}": b.tau_stats() for (_, m, r), b in sorted(boots.items())}
    result = {
        "benchmark": "bootstrap ranking of a BraTS-size study (synthetic): 5 models x 1251 cases x 3 regions x "
                     "(Dice, HD95), paired case resamples, aggregate-then-rank, Kendall's tau per resample",
        "models": MODELS, "regions": REGIONS, "cases": N_CASES, "resamples": args.resamples, "seed": args.seed,
        "rows": len(per_case),
        "warmup_seconds": cold_s, "vectorised_seconds": times, "vectorised_median_s": ours_s,
        "loop_seconds_scaled": loop_s, "loop_samples_timed": args.loop_samples,
        "speedup_vs_loop": loop_s / ours_s,
        "loop_ranks_equal": bool(agree),
        "goal": {"max_s": GOAL_S, "met": bool(ours_s <= GOAL_S and agree)},
        "tau": tau,
        "load_average_1_5_15": list(os.getloadavg()),
        "note": "wall-clock on a shared machine: compare the ratio, not the seconds, across runs",
        "provenance": provenance("cpu"),
    }
    write_json_atomic(args.out, result)
    print(f"vectorised: median {ours_s:.2f} s for {args.resamples} resamples ({', '.join(f'{t:.2f}' for t in times)})")
    print(f"loop      : {loop_s:.1f} s scaled from {args.loop_samples} resamples; speedup {loop_s / ours_s:.0f}x; "
          f"ranks equal: {agree}")
    print(f"goal (<= {GOAL_S:g} s, ranks equal): {result['goal']['met']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
