"""Training losses of the protocol (docs/paper.md §4): Dice + cross-entropy.

Sigmoid tasks (binary, regions) get a soft Dice with squared denominators plus a binary cross-entropy
computed **per channel** (`BCEWithLogitsLoss`). MONAI's `DiceCELoss(sigmoid=True)` is not used for them:
with more than one channel it applies a softmax cross-entropy across the channels, which is wrong for
overlapping regions such as BraTS' ET ⊂ TC ⊂ WT (the defect of the authors' BraTS config).
Multiclass tasks get MONAI's `DiceCELoss` with softmax and one-hot targets.
"""
from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from deconver.config import ConfigError

LOSSES = ("dicece",)


class SigmoidDiceBCELoss(nn.Module):
    """Soft Dice (sigmoid, squared denominators) + mean per-channel binary cross-entropy on logits."""

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, squared_pred=True)
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice, self.lambda_bce = lambda_dice, lambda_bce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target.shape)} must have the same shape")
        target = target.to(logits.dtype)
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * self.bce(logits, target)


def build_loss(name: str, task: str, where: str = "protocol.loss") -> nn.Module:
    """The loss `name` for a preset's task; an unknown name is a ConfigError naming the key."""
    if name not in LOSSES:
        raise ConfigError(f"{where}: unknown loss {name!r}; available: {list(LOSSES)}")
    if task == "multiclass":
        return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True)
    return SigmoidDiceBCELoss()
