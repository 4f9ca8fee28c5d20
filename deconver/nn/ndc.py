"""NDC: the nonnegative deconvolution layer of Deconver (docs/paper.md section 1).

Notation (as in docs/paper.md): input ``x`` of shape ``(B, C, *S)``, ``G`` groups (``groups=-1`` means
``G = C``, depth-wise), ``m = C / G`` filter channels per group, ``sc`` source channels per group,
odd kernel ``k`` in ``d`` spatial dimensions.

* filter ``h = relu(h0)``, ``h0`` of shape ``(C, sc, k, ..., k)``, shared by the whole batch;
* source init ``s0 = relu(proj(x))``, ``proj`` a 1x1 convolution ``C -> G*sc`` with bias;
* ``K(s)``: grouped cross-correlation with ``h`` (``G`` groups, ``sc -> m`` channels per group, zero
  "same" padding ``k // 2``); ``A = K^T`` its exact adjoint (filter flipped spatially, the per-group
  in/out channel axes swapped);
* ``num_iters`` multiplicative (ISRA / Lee-Seung) updates ``s <- s * (A(x) + eps) / (A(K(s)) + eps)``;
  the layer returns ``s`` (``G * sc`` channels).

Two implementations of the same layer (same parameters, interchangeable state dicts), chosen by
``impl``:

``"reference"``
    the official original formulation: the filter is expanded to every sample and the batch is folded
    into the channels, so each convolution is one grouped convolution over ``B * G`` groups, followed by
    four eager element-wise passes; autograd records every intermediate.
``"lean"`` (default)
    ordinary grouped convolutions with ``G`` groups on the unsplit tensor (the filter is shared by the
    batch, so this is exactly the same map), the adjoint as a convolution with the flipped, regrouped
    filter, and one custom autograd node, :class:`NDCUpdate`, that keeps only ``x``, the pre-activation
    projection ``z`` (with ``x >= 0``: the update's output, from which ``s`` is recovered) and
    ``K(s)`` for backward and recomputes ``A(x)`` and ``A(K(s))`` there. ReLU and
    the projection's bias are folded into the node, and the source-sized temporaries are updated in
    place (two alive at a time). On CPU the 2D/3D layer computes in channels-last layout (the projection
    writes it directly, without converting ``x``) and returns a channels-last tensor. For a depth-wise
    float32 layer (the paper's configuration) the node then runs native kernels that evaluate the
    stencils directly (:mod:`deconver.nn.ndc_cpu`); otherwise oneDNN's grouped convolutions, which run
    natively in that layout: the depth-wise ``K`` is a depth-wise convolution plus a sum (see
    ``ndc_ops._k_op``) and the filter gradients merge groups (see ``ndc_ops._adjoint_filter_grad``). On
    CUDA, for a depth-wise float32 layer, the node runs fused Triton kernels that evaluate the stencils
    directly (:mod:`deconver.nn.ndc_triton`); otherwise the same node runs on cuDNN in NC(D)HW.
    ``DECONVER_NDC_FUSED=0`` turns both kinds of fused kernels off.

``num_grad_iters`` follows the official code: iteration ``it`` (1-based) runs under ``torch.no_grad()``
when ``it <= num_iters - num_grad_iters``, so only the last ``num_grad_iters`` iterations carry
gradients (``None`` = all of them; with fewer, the projection and the earlier iterations receive no
gradient at all, exactly as in the official code).

Code: this module is the layer (parameters, checks, the two forwards) and the official formulation;
:mod:`deconver.nn.ndc_update` the lean autograd node; :mod:`deconver.nn.ndc_ops` the operators ``K``
and ``A`` as convolutions and their CPU helpers; :mod:`deconver.nn.ndc_triton` the fused CUDA kernels;
:mod:`deconver.nn.ndc_cpu` the native CPU kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from deconver.nn.ndc_ops import _CHANNELS_LAST, _CONV
from deconver.nn.ndc_update import NDCUpdate
from deconver.nn.pointwise import pointwise

__all__ = ["NDC", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("lean", "reference")

_CONV_MODULE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# --------------------------------------------------------------------------------------------------
# reference implementation: the official formulation (batch folded into a B*G-group convolution)
# --------------------------------------------------------------------------------------------------
def _batched_conv(inp: Tensor, weight: Tensor, padding: tuple[int, ...]) -> Tensor:
    """Per-sample convolution: ``inp`` ``(N, Cin, *S)``, ``weight`` ``(N, Cout, Cin, *k)``, N groups."""
    n = inp.shape[0]
    d = inp.dim() - 2
    out = _CONV[d](
        inp.reshape(1, n * inp.shape[1], *inp.shape[2:]),
        weight.reshape(n * weight.shape[1], weight.shape[2], *weight.shape[3:]),
        padding=padding,
        groups=n,
    )
    return out.reshape(n, -1, *out.shape[2:])


def _reference_update(x: Tensor, s: Tensor, h: Tensor, eps: float, padding) -> Tensor:
    """``s * (conv(x, t(flip(h))) + eps) / (conv(conv(s, h), t(flip(h))) + eps)`` on split tensors."""
    ht = torch.flip(h, dims=tuple(range(3 - h.dim(), 0))).transpose(1, 2)  # official t(flip(h))
    numerator = _batched_conv(x, ht, padding) + eps
    denominator = _batched_conv(_batched_conv(s, h, padding), ht, padding) + eps
    return s * numerator / denominator


# --------------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------------
def _as_kernel(kernel_size, spatial_dims: int) -> tuple[int, ...]:
    if isinstance(kernel_size, int):
        ks = (kernel_size,) * spatial_dims
    else:
        ks = tuple(kernel_size)
        if len(ks) != spatial_dims:
            raise ValueError(
                f"kernel_size {kernel_size!r} should have spatial_dims={spatial_dims} entries"
            )
    if not all(isinstance(k, int) and k > 0 and k % 2 == 1 for k in ks):
        raise ValueError(f"kernel_size should be odd positive integers, got {kernel_size!r}")
    return ks


class NDC(nn.Module):
    """Nonnegative deconvolution (NDC) layer of Deconver (Ashtari et al., arXiv:2504.00302).

    Infers a nonnegative source ``s`` with ``x ~ K(s)`` by ``num_iters`` multiplicative updates
    ``s <- s * (A(x) + eps) / (A(K(s)) + eps)`` from ``s0 = relu(proj(x))``; see the module docstring
    for the notation and the two implementations.

    Args:
        channels: input channels ``C``.
        kernel_size: odd filter size, an int or one int per spatial dimension.
        ratio: source channels per group ``sc = round(C * ratio / G)`` (ignored when
            ``source_channels`` is given). Default 4, the paper's value (the official layer defaults
            to 1).
        source_channels: explicit source channels per group ``sc``. Default ``None`` (use ``ratio``).
        groups: ``G``; ``-1`` (default) means ``G = C`` (depth-wise). Must divide ``channels``.
        num_iters: number of multiplicative updates (0 returns ``s0``). Default 1.
        num_grad_iters: how many of the last updates carry gradients; the earlier ones run under
            ``torch.no_grad()`` (official semantics). Default ``None`` = all.
        eps: stabilizer added to numerator and denominator. Default 1e-16. Under autocast the layer
            runs in float32 (1e-16 underflows in half precision).
        spatial_dims: 1, 2 or 3. Default 3.
        impl: ``"lean"`` (default; :class:`NDCUpdate`) or ``"reference"`` (the official formulation).
            Can be changed on a built layer (``layer.impl = "reference"``); the state dict is the same.
            On CPU the lean layer answers in channels-last memory layout (same values).

    Shape:
        input ``(B, C, *S)``, output ``(B, G * sc, *S)``.

    Examples::

        >>> layer = NDC(32, kernel_size=3, spatial_dims=3)          # depth-wise, ratio 4
        >>> layer(torch.rand(1, 32, 8, 8, 8)).shape
        torch.Size([1, 128, 8, 8, 8])
        >>> layer2d = NDC(16, kernel_size=5, groups=4, source_channels=2, spatial_dims=2, impl="reference")
        >>> layer2d(torch.rand(2, 16, 10, 10)).shape
        torch.Size([2, 8, 10, 10])
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | Sequence[int],
        ratio: float = 4,
        source_channels: int | None = None,
        groups: int = -1,
        num_iters: int = 1,
        num_grad_iters: int | None = None,
        eps: float = 1e-16,
        spatial_dims: int = 3,
        impl: str = "lean",
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims should be 1, 2 or 3, got {spatial_dims!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels should be a positive integer, got {channels!r}")
        ks = _as_kernel(kernel_size, spatial_dims)
        if not isinstance(groups, int) or not (groups == -1 or groups >= 1):
            raise ValueError(f"groups should be -1 (depth-wise) or a positive integer, got {groups!r}")
        g = channels if groups == -1 else groups
        if channels % g != 0:
            raise ValueError(f"channels ({channels}) should be divisible by groups ({groups})")
        if source_channels is None:
            if not isinstance(ratio, (int, float)) or not ratio > 0:
                raise ValueError(f"ratio should be positive, got {ratio!r}")
            sc = round(channels * ratio / g)
            if sc < 1:
                raise ValueError(
                    f"ratio={ratio} gives round({channels} * {ratio} / {g}) = 0 source channels per "
                    "group; increase ratio or pass source_channels"
                )
        else:
            if not isinstance(source_channels, int) or source_channels < 1:
                raise ValueError(
                    f"source_channels should be a positive integer, got {source_channels!r}"
                )
            sc = source_channels
        if not isinstance(num_iters, int) or num_iters < 0:
            raise ValueError(f"num_iters should be a nonnegative integer, got {num_iters!r}")
        if num_grad_iters is None:
            num_grad_iters = num_iters
        if not isinstance(num_grad_iters, int) or not 0 <= num_grad_iters <= num_iters:
            raise ValueError(
                f"num_grad_iters should be an integer in [0, num_iters={num_iters}], got {num_grad_iters!r}"
            )
        if not eps >= 0:
            raise ValueError(f"eps should be nonnegative, got {eps!r}")
        self.channels = channels
        self.kernel_size = ks
        self.spatial_dims = spatial_dims
        self.groups = g
        self.source_channels = sc
        self.out_channels = g * sc
        self.num_iters = num_iters
        self.num_grad_iters = num_grad_iters
        self.eps = float(eps)
        self.impl = impl  # validated by the property setter

        h0 = torch.empty(channels, sc, *ks)
        nn.init.kaiming_uniform_(h0, a=math.sqrt(5))  # PyTorch's default conv/linear init
        self.h0 = nn.Parameter(h0)
        self.proj = _CONV_MODULE[spatial_dims](channels, g * sc, kernel_size=1, bias=True)

    # ``impl`` is a plain attribute with validation, so it can be switched on a built model
    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"impl should be one of {IMPLEMENTATIONS}, got {value!r}")
        self._impl = value

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, kernel_size={self.kernel_size}, groups={self.groups}, "
            f"source_channels={self.source_channels}, num_iters={self.num_iters}, "
            f"num_grad_iters={self.num_grad_iters}, eps={self.eps}, impl={self.impl!r}"
        )

    def _grad_context(self, it: int):
        """Official rule: iteration ``it`` (1-based) has no gradient if ``it <= iters - grad_iters``."""
        return torch.no_grad() if it <= self.num_iters - self.num_grad_iters else nullcontext()

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"input x should have {self.spatial_dims + 2} dimensions (B, C, *S) for "
                f"spatial_dims={self.spatial_dims}, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.channels:
            raise ValueError(
                f"input x should have channels={self.channels} channels, got {x.shape[1]} "
                f"(shape {tuple(x.shape)})"
            )

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            self._check_input(x)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # eps = 1e-16 vanishes in half precision: run the whole layer in float32
            with torch.autocast(device_type, enabled=False):
                return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if self._impl == "reference":
            return self._forward_reference(x)
        return self._forward_lean(x)

    def _forward_lean(self, x: Tensor) -> Tensor:
        h = torch.relu(self.h0)
        # pre-activation projection (bias included); relu is folded into the update. On CPU the
        # update runs channels-last (oneDNN's fast layout for these grouped convolutions); the
        # projection writes that layout directly, x stays as it is (NDCUpdate converts a copy).
        if x.device.type == "cpu" and self.spatial_dims in _CHANNELS_LAST:
            s = pointwise(x, self.proj, channels_last=True)
        else:
            s = self.proj(x)
        relu_input = True
        for it in range(1, self.num_iters + 1):
            with self._grad_context(it):  # one NDCUpdate node per update (also under no_grad,
                s = NDCUpdate.apply(x, s, h, self.groups, self.eps, relu_input, it == 1)  # for tracers)
            relu_input = False
        return torch.relu(s) if relu_input else s

    def _forward_reference(self, x: Tensor) -> Tensor:
        # verbatim structure of the official Deconv.forward (update_filter off)
        b, g = x.shape[0], self.groups
        h = torch.relu(self.h0.expand(b, *self.h0.shape))  # per-sample filter (B, C, sc, *k)
        s = torch.relu(self.proj(x))
        if g != 1:  # "b (g c) ... -> (b g) c ..."
            x = x.reshape(b * g, -1, *x.shape[2:])
            s = s.reshape(b * g, -1, *s.shape[2:])
            h = h.reshape(b * g, -1, *h.shape[2:])
        padding = tuple(k // 2 for k in self.kernel_size)
        for it in range(1, self.num_iters + 1):
            with self._grad_context(it):
                s = _reference_update(x, s, h, self.eps, padding)
        if g != 1:  # "(b g) c ... -> b (g c) ..."
            s = s.reshape(b, -1, *s.shape[2:])
        return s
