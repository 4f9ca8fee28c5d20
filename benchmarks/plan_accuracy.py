"""Benchmark: how close `deconver plan`'s predicted training times come to a study's measured ones.

Goal (issue 18): the predicted training time within ±30 % of the measured one for ≥ 80 % of the runs of
the embedded-default study. Run it after the study has trained (each run's ``cost.json`` holds the
measured wall time of its fit) and after `deconver calibrate --config STUDY --threads T` on the same
machine with T = the study's `trainer.threads` (the threads each job runs with). The prediction is the
plan's (`deconver.cost.estimate.run_cost`) from that calibration: steps × (step + loading) + validation
passes × window batches, without the start-up (imports, model build), which happens before Lightning's
fit and is not in the measured fit time. The reference of each row is the run's own measurement.
Results go to ``results/benchmarks/plan_accuracy.json`` (or ``--out``).

    python benchmarks/plan_accuracy.py --config config/config.yaml [--calibration FILE] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deconver.config import load_study
from deconver.cost.estimate import TOLERANCE, load_calibration, study_costs, within_tolerance
from deconver.cost.record import read_record, summarize
from deconver.io import provenance, write_json_atomic
from deconver.paths import StudyPaths

REPO = Path(__file__).resolve().parents[1]
GOAL_SHARE = 0.80


def compare(config: str, calibration: str | None = None) -> dict:
    """Per run: measured fit seconds, predicted fit seconds, their ratio; and the share within tolerance."""
    study = load_study(config)
    calib, path = load_calibration(study, calibration)
    if calib is None:
        raise SystemExit(f"no calibration for study {study.study!r}: run `deconver calibrate --config {config}` first")
    paths = StudyPaths.of(study)
    rows = []
    for c in study_costs(study, calib, paths=paths):
        record = read_record(paths.cost(c.dataset, c.model, c.fold))
        measured = summarize(record)["wall_s"] if record.get("attempts") else None
        predicted = c.fit_s
        ratio = measured / predicted if measured and predicted else None
        rows.append({"dataset": c.dataset, "model": c.model, "fold": c.fold, "measured_fit_s": measured,
                     "predicted_fit_s": predicted, "measured_over_predicted": ratio,
                     "within": None if ratio is None else within_tolerance(measured, predicted)})
    judged = [r for r in rows if r["within"] is not None]
    share = sum(r["within"] for r in judged) / len(judged) if judged else None
    return {"study": study.study, "calibration": str(path), "calibration_device": calib.get("device"),
            "calibration_threads": calib.get("threads"), "calibration_load": calib.get("load_average"),
            "tolerance": TOLERANCE, "goal_share": GOAL_SHARE, "runs": rows, "runs_compared": len(judged),
            "share_within": share, "goal_met": share is not None and share >= GOAL_SHARE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the study config whose runs have trained")
    parser.add_argument("--calibration", default=None, help="calibration file (default: the study's only one)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "plan_accuracy.json")
    args = parser.parse_args(argv)
    result = compare(args.config, args.calibration)
    print(f"{'dataset':10} {'model':12} {'measured s':>10} {'predicted s':>11} {'ratio':>6}  within ±30 %")
    for r in result["runs"]:
        m, p, q = r["measured_fit_s"], r["predicted_fit_s"], r["measured_over_predicted"]
        print(f"{r['dataset']:10} {r['model']:12} {m if m is None else f'{m:.0f}':>10} "
              f"{p if p is None else f'{p:.0f}':>11} {q if q is None else f'{q:.2f}':>6}  {r['within']}")
    share = result["share_within"]
    print(f"within ±{TOLERANCE:.0%}: {'?' if share is None else f'{share:.0%}'} of {result['runs_compared']} runs "
          f"(goal ≥ {GOAL_SHARE:.0%}): {'met' if result['goal_met'] else 'NOT met'}")
    result.update(load_average_1_5_15=list(os.getloadavg()), provenance=provenance())
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0 if result["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
