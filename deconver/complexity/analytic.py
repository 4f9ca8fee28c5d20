"""Closed-form parameters, MACs and paper-convention FLOPs of a Deconver network (docs/paper.md sections 1-3).

Independent of the network's code: it is what the counters must reproduce on
``deconver.nn.Deconver`` (tests), and the reference for docs/complexity.md. Structure (docs/paper.md
section 1): stem conv 3^d (no bias) -> encoder stages (stage 0 without downsampling, then a k2 s2
conv with bias) each followed by ``depth`` blocks -> decoder stages (k2 s2 transposed conv with
bias, concatenation with the skip, 1x1 adapter 2w -> w without bias, blocks) -> 1x1 head with bias.

Block(C): InstanceNorm (no affine) -> [1x1 C->C no bias, ReLU, NDC, 1x1 G*sc->C with bias] + x ->
InstanceNorm -> [1x1 C->4C, GELU, 1x1 4C->C, both with bias] + y. NDC(C): 1x1 projection C->G*sc
with bias, filter h0 (C, sc, k^d), one update = K(s), A(x), A(K(s)) of C*sc*k^d MACs per voxel each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from deconver import published


@dataclass
class DeconverCosts:
    """Per forward pass at ``roi`` (batch ``batch``): parameters, MACs (every contraction, NDC included)
    and paper-convention FLOPs, with per-part breakdowns."""

    params: int
    macs: int
    paper_flops: int
    voxels: int
    macs_by_part: dict[str, int] = field(default_factory=dict)
    paper_by_part: dict[str, int] = field(default_factory=dict)

    @property
    def flops_per_voxel_k(self) -> float:
        """2 FLOPs per MAC, per input voxel, in thousands (the suite's headline convention)."""
        return 2 * self.macs / self.voxels / 1e3

    @property
    def paper_flops_per_voxel_k(self) -> float:
        return self.paper_flops / self.voxels / 1e3


def deconver_costs(*, in_channels: int, out_channels: int, spatial_dims: int, widths: Sequence[int], kernel_size: int,
                   roi: Sequence[int], depths: Sequence[int] | None = None, decoder_depths: Sequence[int] | None = None,
                   ratio: float = 4, groups: int = -1, mlp_ratio: float = 4, num_iters: int = 1,
                   batch: int = 1) -> DeconverCosts:
    """Closed-form costs of a Deconver network (one block per stage unless ``depths`` says otherwise)."""
    d = spatial_dims
    kd = kernel_size ** d
    stages = len(widths)
    depths = list(depths) if depths is not None else [1] * stages
    decoder_depths = list(decoder_depths) if decoder_depths is not None else [1] * (stages - 1)
    voxels = math.prod(roi)
    for r in roi:
        if r % 2 ** (stages - 1):
            raise ValueError(f"roi {tuple(roi)} is not divisible by 2^{stages - 1} (needed by {stages} stages)")
    n_at = [batch * voxels // (2 ** d) ** i for i in range(stages)]
    macs: dict[str, int] = {}
    paper: dict[str, int] = {}
    params = 0

    def add(table, key, value):
        table[key] = table.get(key, 0) + int(value)

    def block(c: int, n: int) -> int:
        g = c if groups == -1 else groups
        sc = round(c * ratio / g)
        gsc = g * sc
        hidden = int(mlp_ratio * c)
        add(macs, "block.linear", c * c * n + gsc * c * n + 2 * c * hidden * n)
        add(macs, "block.ndc.proj", c * gsc * n)
        add(macs, "block.ndc.update", num_iters * 3 * c * sc * kd * n)
        add(paper, "block.norm", 2 * 4 * c * n)
        add(paper, "block.mixer.in_proj", 2 * c * c * n)
        add(paper, "block.mixer.relu", c * n)
        add(paper, "block.ndc.proj", 2 * c * gsc * n + gsc * n)
        add(paper, "block.ndc.relu", gsc * n + batch * c * sc * kd)
        add(paper, "block.mixer.out_proj", 2 * gsc * c * n + c * n)
        add(paper, "block.mlp", 2 * c * hidden * n + hidden * n + hidden * n + 2 * hidden * c * n + c * n)
        return c * c + (c * gsc + gsc) + c * sc * kd + (gsc * c + c) + (c * hidden + hidden) + (hidden * c + c)

    # stem: a 3^d convolution whatever the NDC kernel
    stem = 3 ** d * in_channels * widths[0]
    add(macs, "stem", stem * n_at[0])
    add(paper, "stem", 2 * stem * n_at[0])
    params += stem
    for i, w in enumerate(widths):
        if i > 0:
            down = (2 ** d) * widths[i - 1] * w
            add(macs, "downsample", down * n_at[i])
            add(paper, "downsample", 2 * down * n_at[i] + w * n_at[i])
            params += down + w
        for _ in range(depths[i]):
            params += block(w, n_at[i])
    for j, i in enumerate(range(stages - 2, -1, -1)):
        w, w_in = widths[i], widths[i + 1]
        up = (2 ** d) * w_in * w
        add(macs, "upsample", up * n_at[i + 1])
        # DeepSpeed counts the transposed conv's bias over n_{i+1} / 2^d positions (see paper.py)
        add(paper, "upsample", 2 * up * n_at[i + 1] + w * (n_at[i + 1] // 2 ** d))
        add(macs, "adapter", 2 * w * w * n_at[i])
        add(paper, "adapter", 2 * 2 * w * w * n_at[i])
        params += up + w + 2 * w * w
        for _ in range(decoder_depths[j]):
            params += block(w, n_at[i])
    add(macs, "head", widths[0] * out_channels * n_at[0])
    add(paper, "head", 2 * widths[0] * out_channels * n_at[0] + out_channels * n_at[0])
    params += widths[0] * out_channels + out_channels
    return DeconverCosts(params=params, macs=sum(macs.values()), paper_flops=sum(paper.values()),
                         voxels=batch * voxels, macs_by_part=macs, paper_by_part=paper)


def paper_costs(dataset: str, roi: Sequence[int]) -> DeconverCosts:
    """:func:`deconver_costs` of the paper's configuration for ``dataset`` (docs/paper.md section 2)."""
    if dataset not in published.CONFIGS:
        raise KeyError(f"no paper configuration for {dataset!r}; known: {sorted(published.CONFIGS)}")
    return deconver_costs(roi=roi, **published.CONFIGS[dataset])
