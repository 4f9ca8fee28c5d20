"""`deconver plan`: a study's runs with their predicted time, device-hours and memory, before anything runs.

Prints one row per (dataset, model, fold) run — steps per epoch and epochs, validation passes and
sliding-window batches, predicted training wall time, predicted peak device memory and whether it fits
— then device-hours per dataset, per model and for the whole study (training, predict and complexity
jobs). Without a calibration (`deconver calibrate`) the rows still show the schedule, and the time and
memory columns say what is missing instead of guessing.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from deconver.config import load_study
from deconver.cost.estimate import as_dict, load_calibration, study_costs


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def _num(value, fmt: str = "{}") -> str:
    return "?" if value is None else fmt.format(value)


def totals(costs) -> dict:
    """Device-hours (train + predict + complexity) per dataset, per model and in all, over the runs that have
    a prediction; `unknown` counts the runs of each group without one (their hours are not in the sum)."""
    pairs = defaultdict(int)
    for c in costs:
        pairs[(c.dataset, c.model)] += 1
    out: dict = {"dataset": {}, "model": {}, "study": {"hours": 0.0, "unknown": 0}}
    for c in costs:
        hours = None if c.device_hours is None else c.device_hours + (c.complexity_s or 0) / 3600 / pairs[(c.dataset, c.model)]
        for kind, name in (("dataset", c.dataset), ("model", c.model)):
            group = out[kind].setdefault(name, {"hours": 0.0, "unknown": 0})
            groups = (group, out["study"]) if kind == "dataset" else (group,)
            for g in groups:
                if hours is None:
                    g["unknown"] += 1
                else:
                    g["hours"] += hours
    return out


def _total(group: dict) -> str:
    text = f"{group['hours']:.1f}"
    return text + (f" (+{group['unknown']} runs unknown)" if group["unknown"] else "")


def render(costs, calibration_path, sums: dict) -> str:
    head = ("dataset", "model", "fold", "steps/ep", "epochs", "val passes", "sw batches/pass", "train",
            "device-h", "peak MB", "fits")
    rows = [head]
    for c in costs:
        rows.append((c.dataset, c.model, str(c.fold), _num(c.steps_per_epoch), str(c.epochs), str(c.val_passes),
                     _num(c.windows_per_pass), _hms(c.train_s), _num(c.device_hours, "{:.2f}"),
                     _num(c.peak_memory_mb, "{:.0f}"), {True: "yes", False: "NO", None: "?"}[c.fits]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"calibration: {calibration_path or 'none (run `deconver calibrate --config S` on the target device)'}")
    for kind in ("dataset", "model"):
        lines.append(f"device-hours per {kind}: " + ", ".join(f"{n} {_total(g)}" for n, g in sums[kind].items()))
    lines.append(f"device-hours, whole study (train + predict + complexity): {_total(sums['study'])}")
    missing = sorted({m for c in costs for m in c.missing})
    if missing:
        lines.append("missing: " + "; ".join(missing))
    unfit = [f"{c.dataset}:{c.model}" for c in costs if c.fits is False]
    if unfit:
        lines.append("DOES NOT FIT the device memory: " + ", ".join(dict.fromkeys(unfit)))
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="study config (YAML)")
    parser.add_argument("--calibration", default=None,
                        help="calibration file (default: the study's only <results>/<study>/calibration/*.json)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="device memory a run may use (default: the calibrated device's)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from deconver.steps import named_input

    study = load_study(args.config)
    calibration, path = load_calibration(study, named_input(args.calibration, "--calibration"))
    costs = study_costs(study, calibration, gpu_memory_mb=args.gpu_memory_gb * 1024 if args.gpu_memory_gb else None)
    sums = totals(costs)
    if args.json:
        print(json.dumps({"study": study.study, "calibration": str(path) if path else None,
                          "device": (calibration or {}).get("device"), "runs": [as_dict(c) for c in costs],
                          "device_hours": sums}, indent=1))
    else:
        print(render(costs, path, sums))
    return 1 if any(c.fits is False for c in costs) else 0
