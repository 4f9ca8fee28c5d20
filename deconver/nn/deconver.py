"""Deconver: a U-shaped segmentation network with nonnegative-deconvolution mixing (docs/paper.md section 1).

Ashtari et al., "Deconver: A Deconvolutional Network for Medical Image Segmentation",
arXiv:2504.00302 (2025); official code github.com/pashtari/deconver (Apache-2.0).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deconver.nn.ndc import IMPLEMENTATIONS, NDC, _as_kernel
from deconver.nn.ndc_ops import _is_channels_last
from deconver.nn.norm import norm_fn
from deconver.nn.patchconv import patch_conv
from deconver.nn.pointwise import pointwise, pointwise_cat, training_layout
from deconver.nn.presets import PRESETS

__all__ = ["DeconvMixer", "DeconverBlock", "Deconver"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _residual(x: Tensor, branch: Tensor) -> Tensor:
    """``x + branch``, written over ``branch`` (a block branch's fresh output, which no backward keeps)
    where that gives the same tensor: same dtype (under autocast the branch may be narrower) and shape."""
    if branch.dtype == x.dtype and branch.shape == x.shape:
        return branch.add_(x)
    return x + branch


def _linear(spatial_dims: int, cin: int, cout: int, bias: bool = True) -> nn.Module:
    """A "Linear" layer on channels-first tensors: a 1x1 convolution."""
    return _CONV[spatial_dims](cin, cout, kernel_size=1, bias=bias)


class DeconvMixer(nn.Module):
    """Deconvolutional token mixer: ``Linear(C->C, no bias) -> ReLU -> NDC -> Linear(G*sc->C) -> Dropout``.

    Args:
        channels: width ``C``.
        kernel_size: odd NDC filter size. Default 3.
        spatial_dims: 1, 2 or 3. Default 3.
        groups: NDC groups, ``-1`` = depth-wise (default).
        ratio: NDC source channels per group ``round(C * ratio / G)``. Default 4.
        source_channels: explicit NDC source channels per group (overrides ``ratio``). Default None.
        num_iters: NDC multiplicative updates. Default 1.
        num_grad_iters: NDC updates that carry gradients (the last ones). Default None = all.
        eps: NDC stabilizer. Default 1e-16.
        dropout: dropout after the output projection. Default 0.
        impl: NDC implementation, ``"lean"`` (default) or ``"reference"``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | Sequence[int] = 3,
        spatial_dims: int = 3,
        groups: int = -1,
        ratio: float = 4,
        source_channels: int | None = None,
        num_iters: int = 1,
        num_grad_iters: int | None = None,
        eps: float = 1e-16,
        dropout: float = 0.0,
        impl: str = "lean",
    ) -> None:
        super().__init__()
        self.in_proj = _linear(spatial_dims, channels, channels, bias=False)
        self.act = nn.ReLU(inplace=True)  # the projection's output is not needed by its backward
        self.ndc = NDC(
            channels,
            kernel_size,
            ratio=ratio,
            source_channels=source_channels,
            groups=groups,
            num_iters=num_iters,
            num_grad_iters=num_grad_iters,
            eps=eps,
            spatial_dims=spatial_dims,
            impl=impl,
        )
        self.out_proj = _linear(spatial_dims, self.ndc.out_channels, channels, bias=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, norm: nn.Module | None = None) -> Tensor:
        """``Mixer(x)``, or ``Mixer(norm(x))`` with ``norm(x)`` recomputed in backward, not stored."""
        # on the CPU the lean NDC computes channels-last: the input projection writes that layout and
        # the output projection reads it, answering in x's layout (GEMMs, no layout conversion)
        lean = self.ndc.impl == "lean" and self.ndc.spatial_dims > 1
        s = self.ndc(self.act(pointwise(x, self.in_proj, fn=norm, channels_last=lean)))
        return self.dropout(pointwise(s, self.out_proj, channels_last=_is_channels_last(x)))


class DeconverBlock(nn.Module):
    """Pre-norm residual pair ``y = x + Mixer(N(x)); out = y + MLP(N(y))``.

    ``N`` is InstanceNorm (``affine=False``, no parameters); ``MLP = Linear(C->r*C) -> GELU -> Dropout
    -> Linear(r*C->C) -> Dropout`` with ``r = mlp_ratio``.

    With :attr:`checkpointing` set (default off) and gradients enabled, the block keeps only its input
    for backward and recomputes its forward there (``torch.utils.checkpoint``, non-reentrant, random
    state preserved): the same values and gradients, less memory, one more forward of the block.

    Args:
        channels: width ``C``.
        mlp_ratio: hidden width of the MLP as a multiple of ``C``. Default 4.
        dropout: dropout in the mixer and the MLP. Default 0.
        spatial_dims: 1, 2 or 3. Default 3.
        **mixer_kwargs: forwarded to :class:`DeconvMixer` (kernel_size, groups, ratio, ...).
    """

    def __init__(
        self,
        channels: int,
        mlp_ratio: float = 4,
        dropout: float = 0.0,
        spatial_dims: int = 3,
        **mixer_kwargs,
    ) -> None:
        super().__init__()
        norm = _INSTANCE_NORM[spatial_dims]
        hidden = int(mlp_ratio * channels)
        self.norm1 = norm(channels, affine=False)
        self.mixer = DeconvMixer(channels, spatial_dims=spatial_dims, dropout=dropout, **mixer_kwargs)
        self.norm2 = norm(channels, affine=False)
        self.mlp = nn.Sequential(
            _linear(spatial_dims, channels, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            _linear(spatial_dims, hidden, channels),
            nn.Dropout(dropout),
        )
        self.checkpointing = False

    def _forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or torch.jit.is_tracing():
            # nothing is kept for backward: the plain modules, in the order FLOP counters expect them
            # (norm1 outside the mixer, whose layers the paper-convention counter charges as a whole)
            x = x + self.mixer(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        # the same computation as x + mixer(norm1(x)); x + mlp(norm2(x)), with the normalised inputs and
        # the GELU output recomputed in backward instead of stored (deconver.nn.pointwise); on the CPU
        # the block computes channels-last (its GEMMs in oneDNN, the NDC's layout), the layout it returns
        x = training_layout(x)
        cl = _is_channels_last(x)
        x = _residual(x, self.mixer(x, norm_fn(self.norm1, x)))
        fc1, act, inner_dropout, fc2, dropout = self.mlp
        hidden = pointwise(x, fc1, fn=norm_fn(self.norm2, x), channels_last=cl)
        if self.training and inner_dropout.p > 0:  # dropout between GELU and fc2: the plain modules
            return _residual(x, dropout(fc2(inner_dropout(act(hidden)))))
        return _residual(x, dropout(pointwise(hidden, fc2, fn=act, channels_last=cl)))

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class _DecoderStage(nn.Module):
    """Transposed conv k2 s2 -> concat [skip, up] -> Linear(2w->w, no bias) -> blocks."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.upsample = _CONV_T[spatial_dims](cin, cout, kernel_size=2, stride=2)
        self.adapter = _linear(spatial_dims, 2 * cout, cout, bias=False)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = patch_conv(x, self.upsample)  # channels-last in training on the CPU (pointwise.training_layout)
        return self.blocks(pointwise_cat((skip, up), self.adapter, _is_channels_last(skip)))  # no concatenation kept


def _per_stage(value, n: int, name: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ValueError(f"{name} should be a nonnegative int or {n} nonnegative ints, got {value!r}")
    return values


class Deconver(nn.Module):
    """Deconver: U-shaped network with nonnegative deconvolution (NDC) mixing blocks.

    Ashtari et al., "Deconver: A Deconvolutional Network for Medical Image Segmentation",
    arXiv:2504.00302 (2025). Stem conv k3 (no bias) to ``channels[0]``; encoder stage ``i`` =
    downsampling conv k2 s2 (with bias; none at stage 0) + ``depths[i]`` :class:`DeconverBlock`;
    decoder stage ``i`` = transposed conv k2 s2 -> concat [skip, up] -> 1x1 adapter (``2w -> w``, no
    bias) -> ``decoder_depths[i]`` blocks; head conv k1 to ``out_channels`` (logits, no activation).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        out_channels: output channels (logits).
        channels: width per stage, stage 0 at full resolution. Default ``(32, 64, 128, 256, 512)``.
        depths: blocks per encoder stage, an int or one per stage. Default 1.
        decoder_depths: blocks per decoder stage, indexed like ``channels[:-1]`` (stage 0 = full
            resolution); default ``None`` = ``depths[:-1]``.
        kernel_size: odd NDC filter size. Default 3.
        groups: NDC groups, ``-1`` = depth-wise (default); must divide every width.
        ratio: NDC source channels per group ``round(w * ratio / G)``. Default 4 (the paper's).
        source_channels: explicit NDC source channels per group (overrides ``ratio``). Default None.
        mlp_ratio: MLP hidden width as a multiple of the block width. Default 4.
        num_iters: NDC multiplicative updates. Default 1.
        num_grad_iters: NDC updates that carry gradients (the last ones). Default None = all.
        eps: NDC stabilizer. Default 1e-16.
        dropout: dropout in mixers and MLPs. Default 0.
        ndc_impl: ``"lean"`` (default) or ``"reference"``; switchable later via ``model.ndc_impl``.
        checkpointing: activation checkpointing of every stage (encoder stage with its downsampling,
            the stem with stage 0; decoder stage with its upsampling and adapter) in training (default
            False, the paper's computation): same values and gradients, much less memory, about one more
            forward pass per step (docs/nn.md); switchable via ``model.checkpointing``.

    Every spatial size of the input must be divisible by :attr:`divisor` ``= 2 ** (len(channels) - 1)``.

    Examples::

        >>> net = Deconver(spatial_dims=3, in_channels=4, out_channels=3, channels=(32, 64, 128, 256, 512))
        >>> net(torch.rand(1, 4, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
        >>> net2d = Deconver(2, 3, 1, channels=(16, 32, 64), kernel_size=5, ndc_impl="reference")
        >>> net2d(torch.rand(2, 3, 64, 48)).shape
        torch.Size([2, 1, 64, 48])
        >>> Deconver.from_preset("isles22").divisor
        8
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        depths: int | Sequence[int] = 1,
        decoder_depths: int | Sequence[int] | None = None,
        kernel_size: int | Sequence[int] = 3,
        groups: int = -1,
        ratio: float = 4,
        source_channels: int | None = None,
        mlp_ratio: float = 4,
        num_iters: int = 1,
        num_grad_iters: int | None = None,
        eps: float = 1e-16,
        dropout: float = 0.0,
        ndc_impl: str = "lean",
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims should be 1, 2 or 3, got {spatial_dims!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} should be a positive integer, got {value!r}")
        channels = tuple(channels) if isinstance(channels, Sequence) else (channels,)
        if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"channels should be a non-empty sequence of positive ints, got {channels!r}")
        n = len(channels)
        depths = _per_stage(depths, n, "depths")
        decoder_depths = depths[:-1] if decoder_depths is None else _per_stage(decoder_depths, n - 1, "decoder_depths")
        _as_kernel(kernel_size, spatial_dims)  # raises ValueError naming kernel_size
        if not isinstance(groups, int) or not (groups == -1 or groups >= 1):
            raise ValueError(f"groups should be -1 (depth-wise) or a positive integer, got {groups!r}")
        if groups != -1 and any(c % groups for c in channels):
            raise ValueError(f"every width in channels {channels} should be divisible by groups ({groups})")
        if source_channels is None and not (isinstance(ratio, (int, float)) and ratio > 0):
            raise ValueError(f"ratio should be positive, got {ratio!r}")
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
            raise ValueError(f"mlp_ratio should be positive, got {mlp_ratio!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout should be in [0, 1), got {dropout!r}")
        if ndc_impl not in IMPLEMENTATIONS:
            raise ValueError(f"ndc_impl should be one of {IMPLEMENTATIONS}, got {ndc_impl!r}")
        if not isinstance(checkpointing, bool):
            raise ValueError(f"checkpointing should be True or False, got {checkpointing!r}")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        conv = _CONV[spatial_dims]
        block_kwargs = dict(
            spatial_dims=spatial_dims,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            kernel_size=kernel_size,
            groups=groups,
            ratio=ratio,
            source_channels=source_channels,
            num_iters=num_iters,
            num_grad_iters=num_grad_iters,
            eps=eps,
            impl=ndc_impl,
        )

        def blocks(width: int, depth: int) -> list[nn.Module]:
            return [DeconverBlock(width, **block_kwargs) for _ in range(depth)]

        self.stem = conv(in_channels, channels[0], kernel_size=3, padding=1, bias=False)
        self.encoder = nn.ModuleList()
        for i, width in enumerate(channels):
            down = nn.Identity() if i == 0 else conv(channels[i - 1], width, kernel_size=2, stride=2)
            self.encoder.append(
                nn.Sequential(OrderedDict(downsample=down, blocks=nn.Sequential(*blocks(width, depths[i]))))
            )
        self.decoder = nn.ModuleList(
            _DecoderStage(spatial_dims, channels[i + 1], channels[i], blocks(channels[i], decoder_depths[i]))
            for i in range(n - 1)
        )
        self.head = conv(channels[0], out_channels, kernel_size=1)
        self.checkpointing = checkpointing

    @property
    def checkpointing(self) -> bool:
        """Whether every stage recomputes its forward in backward (training only)."""
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"checkpointing should be True or False, got {value!r}")
        self._checkpointing = value

    def _encode(self, i: int, x: Tensor) -> Tensor:
        """Encoder stage ``i`` (the stem first at stage 0; channels-last in training on the CPU, see
        :func:`deconver.nn.pointwise.training_layout`)."""
        stage = self.encoder[i]
        return stage.blocks(self.stem(training_layout(x)) if i == 0 else patch_conv(x, stage.downsample))

    @property
    def divisor(self) -> int:
        """Total stride: every spatial size of the input must be a multiple of this."""
        return 2 ** (len(self.channels) - 1)

    @property
    def ndc_impl(self) -> str:
        """The NDC implementation of every layer; assigning it switches them all."""
        impls = {m.impl for m in self.modules() if isinstance(m, NDC)}
        return impls.pop() if len(impls) == 1 else ",".join(sorted(impls))

    @ndc_impl.setter
    def ndc_impl(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"ndc_impl should be one of {IMPLEMENTATIONS}, got {value!r}")
        for m in self.modules():
            if isinstance(m, NDC):
                m.impl = value

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Deconver":
        """Build a named configuration from :data:`deconver.nn.PRESETS`; keyword overrides win.

        >>> Deconver.from_preset("brats23", ndc_impl="reference").out_channels
        3
        """
        if name not in PRESETS:
            raise KeyError(f"unknown Deconver preset {name!r}; available: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name]["kwargs"], **overrides})

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError if ``x`` has the wrong rank, channel count or a non-divisible size."""
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"input x should have {self.spatial_dims + 2} dimensions (B, C, *S) for "
                f"spatial_dims={self.spatial_dims}, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input x should have in_channels={self.in_channels} channels, got {x.shape[1]}")
        sizes = tuple(x.shape[2:])
        bad = [i for i, s in enumerate(sizes) if s % self.divisor]
        if bad:
            fix = tuple(-(-s // self.divisor) * self.divisor for s in sizes)
            raise ValueError(
                f"spatial size {sizes} of input x is not divisible by the network's divisor "
                f"{self.divisor} (2 ** (len(channels) - 1)) in dimension(s) {bad}; pad or crop it, "
                f"e.g. to {fix}"
            )

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            self.check_input(x)
        # checkpointing: each stage keeps only its inputs (the skips, kept for the decoder anyway) and
        # recomputes its forward in backward
        ckpt = self._checkpointing and torch.is_grad_enabled() and not torch.jit.is_tracing()

        def run(stage, *args):
            return checkpoint(stage, *args, use_reentrant=False) if ckpt else stage(*args)

        skips = []
        for i in range(len(self.encoder)):
            x = run(self._encode, i, x)
            skips.append(x)
        for i in reversed(range(len(self.decoder))):
            x = run(self.decoder[i], x, skips[i])
        return pointwise(x, self.head)
