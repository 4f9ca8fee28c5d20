"""Record what a training run consumes: wall time, device-hours, epochs per hour and peak memory, per attempt.

`CostRecorder` is a Lightning callback; rank 0 rewrites the run's ``cost.json`` (`StudyPaths.cost`)
atomically after every epoch, so an attempt cut by a time limit or a kill keeps what it did up to its
last epoch, and a resumed run appends a new attempt. `summarize(record)` totals the attempts:

    wall_s, device_hours (processes × wall), epochs, epochs_per_hour, peak_memory_mb (the largest of any
    attempt: CUDA max allocated on a GPU, the process's peak resident set on the CPU)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as L

from deconver.cost.measure import peak_rss_mb


def read_record(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {"attempts": []}


def summarize(record: dict) -> dict:
    """Totals over a run's attempts (see the module docstring)."""
    attempts = record.get("attempts", [])
    wall = sum(a["wall_s"] for a in attempts)
    epochs = sum(a["epochs"] for a in attempts)
    return {"attempts": len(attempts), "wall_s": wall,
            "device_hours": sum(a["wall_s"] * a["processes"] for a in attempts) / 3600,
            "epochs": epochs, "epochs_per_hour": epochs / (wall / 3600) if wall else None,
            "peak_memory_mb": max((a["peak_memory_mb"] for a in attempts), default=None),
            "device": attempts[-1]["device"] if attempts else None}


class CostRecorder(L.Callback):
    """Appends this attempt to ``cost.json`` and updates it after every training epoch (rank 0)."""

    def __init__(self, path: Path, prediction: dict | None = None):
        self.path = Path(path)
        self.prediction = prediction  # estimate.predicted_train_seconds: {"train_s", "fit_s"} or None
        self._start = time.perf_counter()
        self._index: int | None = None
        self._first_epoch = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._first_epoch = trainer.current_epoch

    def _peak(self, trainer: L.Trainer) -> float:
        import torch

        if trainer.strategy.root_device.type == "cuda":
            return torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**20
        return peak_rss_mb()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from deconver.io import write_json_atomic

        record = read_record(self.path)
        attempt = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "device": trainer.strategy.root_device.type, "processes": trainer.world_size,
                   "wall_s": time.perf_counter() - self._start,
                   "epochs": trainer.current_epoch + 1 - self._first_epoch,
                   "last_epoch": trainer.current_epoch, "peak_memory_mb": self._peak(trainer)}
        if self._index is None:
            record["attempts"].append(attempt)
            self._index = len(record["attempts"]) - 1
        else:
            attempt["started"] = record["attempts"][self._index]["started"]
            record["attempts"][self._index] = attempt
        if self.prediction is not None and "predicted_train_s" not in record:  # the first attempt's plan
            record["predicted_train_s"] = self.prediction["train_s"]  # the whole job (its SLURM request)
            record["predicted_fit_s"] = self.prediction["fit_s"]      # what wall_s measures (no start-up)
        record["total"] = summarize(record)
        write_json_atomic(self.path, record)


def cost_rows(runs) -> list[dict]:
    """One row per finished or started run: (dataset, model, fold, path of cost.json) → the totals and the
    prediction the run recorded when it started (`predicted_train_s` of the whole job and `predicted_fit_s`
    without its start-up, None without a calibration); the ratio compares like with like: the measured
    fit time (from Lightning's fit start) over `predicted_fit_s`."""
    rows = []
    for dataset, model, fold, path in runs:
        if not Path(path).is_file():
            continue
        record = read_record(path)
        total = summarize(record)
        fit = record.get("predicted_fit_s")
        rows.append({"dataset": dataset, "model": model, "fold": fold, **total,
                     "predicted_train_s": record.get("predicted_train_s"), "predicted_fit_s": fit,
                     "measured_over_predicted": total["wall_s"] / fit if fit else None})
    return rows
