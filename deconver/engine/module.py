"""The LightningModule every model is trained with: the protocol of docs/paper.md §4, model injected.

* loss: DiceCE (`deconver.engine.losses.build_loss`): per-channel sigmoid BCE for binary/regions,
  softmax + one-hot for multiclass;
* optimizer: AdamW(lr, weight_decay) from the preset;
* schedule: MONAI's `WarmupCosineSchedule` (``warmup_epochs`` linear from ``warmup_start_factor`` × lr,
  cosine to 0 at epoch ``epochs + 1``), applied per epoch as a pure function of the epoch index, so a
  resumed run gets exactly the learning rate of an uninterrupted one;
* validation: sliding-window inference over whole cases (roi, overlap, gaussian/constant weighting),
  Dice per output (MONAI, empty/empty = 1), reduced over all ranks without counting a case twice.

The global torch RNG is reseeded from ``(seed, epoch, batch, rank)`` before every training batch, so
dropout-like randomness inside a model does not depend on history either.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning.pytorch as L
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice
from monai.optimizers import WarmupCosineSchedule
from torch import nn

from deconver.config import Protocol
from deconver.engine.datamodule import derive_seed
from deconver.engine.labels import LabelCodec
from deconver.engine.losses import build_loss


def lr_factor(epoch: int, protocol: Protocol, epochs: int | None = None) -> float:
    """The learning-rate multiplier of an epoch (MONAI WarmupCosineSchedule with t_total = epochs + 1)."""
    epochs = epochs or protocol.epochs
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = WarmupCosineSchedule(probe, warmup_steps=protocol.warmup_epochs, t_total=epochs + 1,
                                    warmup_multiplier=protocol.warmup_start_factor)
    return float(schedule.lr_lambda(epoch))


def sliding_window_logits(net: nn.Module, image: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """Logits of whole images (B, C_in, *S) -> (B, C_out, *S): MONAI sliding-window inference at the roi
    (images smaller than the roi are padded), with the preset's overlap, weighting and window batch."""
    p = protocol
    return sliding_window_inference(image, roi_size=list(p.roi_size), sw_batch_size=p.sw_batch_size,
                                    predictor=net, overlap=p.sw_overlap, mode=p.sw_mode)


class SegmentationModule(L.LightningModule):
    """Trains `net` (logits ``(B, out_channels, *roi)``) with the protocol of one dataset preset."""

    def __init__(self, net: nn.Module, codec: LabelCodec, protocol: Protocol, seed: int = 123,
                 epochs: int | None = None):
        super().__init__()
        self.net, self.codec, self.protocol = net, codec, protocol
        self.seed, self.epochs = int(seed), int(epochs or protocol.epochs)
        self.loss_fn = build_loss(protocol.loss, codec.task)
        # plain types only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"codec": asdict(codec), "protocol": protocol.model_dump(mode="json"),
                                   "seed": self.seed, "epochs": self.epochs})
        self.last_validation: dict[str, Any] | None = None
        self._val_sum: torch.Tensor | None = None
        self._val_count: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.protocol.lr, weight_decay=self.protocol.weight_decay)

    def current_lr_factor(self) -> float:
        return lr_factor(self.current_epoch, self.protocol, self.epochs)

    def on_train_epoch_start(self) -> None:
        factor = self.current_lr_factor()
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.protocol.lr * factor

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(derive_seed(self.seed, self.current_epoch, batch_idx, self.global_rank, 0xD20))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        image = batch["image"]
        target = self.codec.encode(batch["label"])
        loss = self.loss_fn(self.net(image), target)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=image.shape[0],
                 sync_dist=True)
        return loss

    # ------------------------------------------------------------------ validation
    def infer(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits of whole images (B, C_in, *S) -> (B, C_out, *S)."""
        return sliding_window_logits(self.net, image, self.protocol)

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(len(self.codec.names), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros(1, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.infer(batch["image"])
        pred = self.codec.discretize(self.codec.activate(logits.float()))
        truth = self.codec.masks(batch["label"])
        dice = compute_dice(pred.float(), truth.float(), include_background=True, ignore_empty=False)
        self._val_sum += dice.sum(0).double()
        self._val_count += dice.shape[0]

    def on_validation_epoch_end(self) -> None:
        if self._val_sum is None or self.trainer.sanity_checking:
            return
        total = self.trainer.strategy.reduce(torch.cat([self._val_sum, self._val_count]), reduce_op="sum")
        count = float(total[-1])
        if count == 0:
            return
        per_label = (total[:-1] / count).float()
        mean = per_label.mean()
        self.log("val/dice", mean, prog_bar=True, sync_dist=True)
        for name, value in zip(self.codec.names, per_label):
            self.log(f"val/dice_{name}", value, sync_dist=True)
        self.last_validation = {"epoch": int(self.current_epoch), "dice": float(mean), "cases": int(count),
                                "per_label": {n: float(v) for n, v in zip(self.codec.names, per_label)}}
