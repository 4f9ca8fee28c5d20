"""Run bookkeeping: atomic checkpoint files, `last`/`best` checkpoints and the per-epoch CSV log."""
from __future__ import annotations

import csv
import io
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from deconver.io import atomic_path, write_text_atomic
from deconver.paths import RunFolder


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary file beside the target, then one rename: a checkpoint file is
    either the previous complete one or the new complete one, even under ``kill -9``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA's max allocated bytes on a GPU (reset each epoch), the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class RunRecorder(L.Callback):
    """At the end of every training epoch (after its validation, if any): append a row to
    ``train_log.csv`` (rewritten atomically), save ``best.ckpt`` when the validation Dice improved, then
    ``last.ckpt``. Its rows and best score live in the checkpoint, so a resumed run continues the log
    exactly where the checkpoint left it."""

    def __init__(self, run_dir: Path, label_names: list[str]):
        self.run_dir = Path(run_dir)
        self.label_names = list(label_names)
        self.rows: list[dict[str, Any]] = []
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._t0 = self._val_seconds = 0.0
        self._batches = 0

    @property
    def columns(self) -> list[str]:
        return (["epoch", "step", "train_loss", "val_dice"] + [f"val_dice_{n}" for n in self.label_names]
                + ["lr", "seconds_per_step", "epoch_seconds", "val_seconds", "peak_memory_mb"])

    @property
    def last_path(self) -> Path:
        return RunFolder(self.run_dir).last

    @property
    def best_path(self) -> Path:
        return RunFolder(self.run_dir).best

    @property
    def log_path(self) -> Path:
        return RunFolder(self.run_dir).train_log

    # ------------------------------------------------------------------ state in checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
        self.best_score = state_dict.get("best_score")
        self.best_epoch = state_dict.get("best_epoch")

    # ------------------------------------------------------------------ timing
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._val_seconds, self._batches = time.perf_counter(), 0.0, 0
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    on_train_start = on_train_epoch_start  # a run resumed mid-epoch gets no on_train_epoch_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._v0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._val_seconds += time.perf_counter() - self._v0

    # ------------------------------------------------------------------ the epoch's record
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        elapsed = time.perf_counter() - self._t0
        metrics = trainer.callback_metrics
        validation = getattr(pl_module, "last_validation", None)
        validated = validation is not None and validation.get("epoch") == epoch
        loss = metrics.get("train/loss")
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": trainer.global_step,
            "train_loss": float(loss) if loss is not None else math.nan,
            "val_dice": validation["dice"] if validated else "",
            **{f"val_dice_{n}": (validation["per_label"][n] if validated else "") for n in self.label_names},
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "seconds_per_step": (elapsed - self._val_seconds) / max(self._batches, 1),
            "epoch_seconds": elapsed,
            "val_seconds": self._val_seconds if validated else "",
            "peak_memory_mb": peak_memory_mb(pl_module.device),
        }
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [row]
        if trainer.is_global_zero:
            self.write_log()
        if validated and (self.best_score is None or validation["dice"] > self.best_score):
            self.best_score, self.best_epoch = validation["dice"], epoch
            trainer.save_checkpoint(self.best_path, weights_only=False)
        trainer.save_checkpoint(self.last_path, weights_only=False)

    def write_log(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        write_text_atomic(self.log_path, buffer.getvalue())


class ValidationSchedule(L.Callback):
    """Validate every `every` epochs and after the last epoch (Lightning alone only does the former)."""

    def __init__(self, every: int):
        self.every = every

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        trainer.check_val_every_n_epoch = 1 if last else self.every

    on_train_start = on_train_epoch_start  # a run resumed mid-epoch gets no on_train_epoch_start
