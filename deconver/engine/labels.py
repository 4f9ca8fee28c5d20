"""How a preset's label space maps onto network outputs and back (docs/ARCHITECTURE.md, "Configuration", "Runs").

* ``binary``: one sigmoid channel; target = label value in the entry's list; decoded to 0 / the first value.
* ``regions``: one sigmoid channel per entry of ``labels`` (BraTS ET/TC/WT), targets may overlap; a voxel is
  decoded to the label value whose region membership best matches the predicted regions.
* ``multiclass``: softmax over background + one class per entry; decoded by argmax to the entry's first value.

Everything works on torch tensors with a leading batch axis or on single cases (numpy or torch) without it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deconver.config import DatasetPreset


@dataclass(frozen=True)
class LabelCodec:
    """Encodes label maps into training targets and decodes network outputs into label maps."""

    task: str
    names: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    threshold: float = 0.5
    decoding: str = "match"  # regions: "match" or "priority" (`protocol.region_decoding`)

    @classmethod
    def from_preset(cls, preset: DatasetPreset) -> "LabelCodec":
        return cls(task=preset.task, names=tuple(preset.labels),
                   values=tuple(tuple(int(v) for v in vals) for vals in preset.labels.values()),
                   threshold=float(preset.protocol.threshold), decoding=preset.protocol.region_decoding)

    def priority_values(self) -> list[tuple[str, int]]:
        """(region, label value) in priority order: each entry of ``labels`` writes the smallest of its values
        that no earlier entry covers (BraTS ET -> 3, TC -> 1, WT -> 2, the authors' recombination)."""
        out, taken = [], set()
        for name, vals in zip(self.names, self.values):
            free = sorted(set(vals) - taken)
            if not free:
                raise ValueError(f"region {name!r}: all its label values {list(vals)} belong to earlier regions; "
                                 "priority decoding needs one of its own")
            out.append((name, free[0]))
            taken |= set(vals)
        return out

    # ------------------------------------------------------------------ shapes
    @property
    def out_channels(self) -> int:
        return len(self.names) + (1 if self.task == "multiclass" else 0)

    @property
    def sigmoid(self) -> bool:
        return self.task != "multiclass"

    # ------------------------------------------------------------------ label map -> targets
    def _lut(self) -> torch.Tensor:
        """Label value -> class index (multiclass); 0 for background and unknown values."""
        lut = torch.zeros(256, dtype=torch.long)
        for i, vals in enumerate(self.values):
            for v in vals:
                lut[v] = i + 1
        return lut

    def masks(self, label: torch.Tensor) -> torch.Tensor:
        """Membership masks, one channel per entry of ``labels``: (B, 1, *S) label values -> (B, K, *S) bool."""
        label = label.long()
        return torch.cat([torch.isin(label, torch.tensor(vals, device=label.device)) for vals in self.values], dim=1)

    def encode(self, label: torch.Tensor) -> torch.Tensor:
        """Training target of a batch of label maps (B, 1, *S): class indices (B, 1, *S) for multiclass,
        float membership channels (B, K, *S) for binary/regions."""
        if self.task == "multiclass":
            return self._lut().to(label.device)[label.long().clamp(0, 255)]
        return self.masks(label).float()

    # ------------------------------------------------------------------ logits -> outputs
    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities from logits (B, C, *S): softmax over classes or a sigmoid per channel."""
        return torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=1)

    def discretize(self, probs: torch.Tensor) -> torch.Tensor:
        """Predicted membership masks (B, K, *S) bool, one per entry of ``labels`` (background excluded)."""
        if self.sigmoid:
            return probs > self.threshold
        idx = probs.argmax(dim=1, keepdim=True)
        return torch.cat([idx == i + 1 for i in range(len(self.names))], dim=1)

    def to_label_map(self, probs) -> np.ndarray:
        """One case's probabilities (C, *S) -> label map (*S) uint8 in the preset's label space."""
        p = torch.as_tensor(np.asarray(probs, dtype=np.float32))
        if self.task == "multiclass":
            out_values = torch.tensor([0] + [vals[0] for vals in self.values], dtype=torch.uint8)
            return out_values[p.argmax(dim=0)].numpy()
        if self.task == "binary":
            return torch.where(p[0] > self.threshold, self.values[0][0], 0).to(torch.uint8).numpy()
        if self.decoding == "priority":  # the first thresholded region in `labels` order wins
            out = torch.zeros(p.shape[1:], dtype=torch.uint8)
            for (_, value), channel in reversed(list(zip(self.priority_values(), p))):
                out = torch.where(channel > self.threshold, value, out)
            return out.numpy()
        # regions: pick the label value whose membership pattern agrees with the most predicted regions;
        # ties are broken by the likelihood of that pattern under the per-channel sigmoid probabilities.
        candidates = [0] + sorted({v for vals in self.values for v in vals})
        member = torch.tensor([[v in vals for vals in self.values] for v in candidates], dtype=torch.float32)
        hard = (p > self.threshold).float()
        eps = 1e-6
        logp, log1mp = torch.log(p.clamp(eps, 1.0)), torch.log((1 - p).clamp(eps, 1.0))
        best_score, best = None, None
        for ci in range(len(candidates)):
            m = member[ci].view(-1, *([1] * (p.ndim - 1)))
            agree = (m * hard + (1 - m) * (1 - hard)).sum(0)
            likelihood = torch.exp((m * logp + (1 - m) * log1mp).sum(0))
            score = agree + 0.5 * likelihood
            if best_score is None:
                best_score, best = score, torch.zeros_like(score, dtype=torch.long)
            else:
                better = score > best_score
                best_score = torch.where(better, score, best_score)
                best = torch.where(better, torch.full_like(best, ci), best)
        return torch.tensor(candidates, dtype=torch.uint8)[best].numpy()
