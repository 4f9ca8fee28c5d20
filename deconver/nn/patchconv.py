"""Stride-2 down- and up-sampling convolutions (kernel 2) of Deconver's CPU training, as GEMMs on patches.

A 2x..x2 convolution of stride 2 reads disjoint patches: on a channels-last tensor it is one product of
the ``(voxels / 2^d, 2^d C)`` patch matrix (one copy of the image) with the weight, and its transpose one
product followed by the inverse copy. :func:`patch_conv` runs them so in training on the CPU, where the
blocks are channels-last (:func:`deconver.nn.pointwise.training_layout`): oneDNN's inner product for the
products and the input's gradient, the native weight-gradient kernel for the weight's
(:mod:`deconver.nn.pointwise`'s helpers). PyTorch's own convolutions of that kind run several times
slower channels-last in backward (docs/nn.md). Same values as the modules, to float rounding
(tests/test_pointwise.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deconver.nn.ndc_ops import _CHANNELS_LAST
from deconver.nn import pointwise
from deconver.nn.pointwise import _from_rows, _onednn_linear, _onednn_ok, _rows, _weight_grad

__all__ = ["patch_conv"]


def _space_to_depth(x: Tensor) -> Tensor:
    """A channels-last ``(B, C, *S)`` tensor as the ``(B * prod(S / 2), 2^d * C)`` matrix of its 2x..x2
    patches (a copy; columns ordered (offset, channel), offsets row-major)."""
    b, c, *spatial = x.shape
    d = len(spatial)
    last = x.permute(0, *range(2, d + 2), 1)  # (B, *S, C) view of x's memory
    split = last.reshape(b, *[n for s in spatial for n in (s // 2, 2)], c)  # (B, S1/2, 2, S2/2, 2, ..., C)
    return split.permute(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1).reshape(-1, 2 ** d * c)


def _depth_to_space(m: Tensor, b: int, half: Sequence[int]) -> Tensor:
    """The inverse of :func:`_space_to_depth`: the patch matrix ``m`` as a new channels-last tensor of
    spatial size ``2 * half``."""
    d = len(half)
    c = m.shape[1] // 2 ** d
    out = torch.empty((b, c, *[2 * n for n in half]), dtype=m.dtype, memory_format=_CHANNELS_LAST[d])
    dst = out.permute(0, *range(2, d + 2), 1).view(b, *[n for s in half for n in (s, 2)], c)
    order = [0] + [v for i in range(d) for v in (1 + i, 1 + d + i)] + [2 * d + 1]  # (B, S1/2, 2, ...) from patches
    dst.copy_(m.view(b, *half, *[2] * d, c).permute(*order))
    return out


class _PatchConv(torch.autograd.Function):
    """A 2x..x2, stride-2 convolution (``transposed``: its transpose) of a channels-last float32 tensor
    as one oneDNN GEMM on the tensor's patches, output channels-last. ``weight`` as the module's:
    ``(O, C, 2, .., 2)`` for the convolution, ``(C, O, 2, .., 2)`` transposed."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool):
        ctx.save_for_backward(x, weight)
        ctx.transposed, ctx.has_bias = transposed, bias is not None
        w2 = _patch_weight(weight, transposed)
        linear = _onednn_linear()
        if not transposed:  # patches (B * S/2^d, 2^d C) -> (B * S/2^d, O)
            half = (x.shape[0], 0, *[n // 2 for n in x.shape[2:]])
            return _from_rows(linear(_space_to_depth(x), w2, bias, "none", [], ""), half)
        b = None if bias is None else bias.repeat(2 ** (x.dim() - 2))  # (offset, channel) columns
        return _depth_to_space(linear(_rows(x), w2, b, "none", [], ""), x.shape[0], x.shape[2:])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        w2 = _patch_weight(weight, ctx.transposed)
        grad = grad.contiguous(memory_format=_CHANNELS_LAST[grad.dim() - 2])
        linear = _onednn_linear()
        g_x = g_w = g_b = None
        if not ctx.transposed:
            gr = _rows(grad)
            if need_x:
                g_x = _depth_to_space(linear(gr, w2.t().contiguous(), None, "none", [], ""), x.shape[0],
                                      grad.shape[2:])
            if need_w or need_b:
                g_w, g_b = _weight_grad(gr, _space_to_depth(x), need_b)
        else:
            gp = _space_to_depth(grad)
            if need_x:
                g_x = _from_rows(linear(gp, w2.t().contiguous(), None, "none", [], ""), x.shape)
            if need_w:
                g_w = _weight_grad(gp, _rows(x), False)[0]
            if need_b:
                g_b = gp.view(gp.shape[0], -1, grad.shape[1]).sum(dim=(0, 1))
        if g_w is not None:
            g_w = _unpatch_weight(g_w, weight, ctx.transposed)
        return g_x, g_w, g_b, None


def _patch_weight(weight: Tensor, transposed: bool) -> Tensor:
    """The module's weight as the GEMM's ``(N, K)`` matrix: ``(O, (offset, C))``, or ``((offset, O), C)``
    transposed."""
    d = weight.dim() - 2
    offsets = range(2, d + 2)
    if transposed:  # (C, O, *k) -> (*k, O, C)
        return weight.permute(*offsets, 1, 0).reshape(-1, weight.shape[0])
    return weight.permute(0, *offsets, 1).reshape(weight.shape[0], -1)  # (O, *k, C)


def _unpatch_weight(g: Tensor, weight: Tensor, transposed: bool) -> Tensor:
    """A gradient shaped like :func:`_patch_weight`'s matrix, back in the module weight's shape."""
    d = weight.dim() - 2
    if transposed:  # (*k, O, C) -> (C, O, *k)
        return g.view(*weight.shape[2:], weight.shape[1], weight.shape[0]).permute(d + 1, d, *range(d)).contiguous()
    return g.view(weight.shape[0], *weight.shape[2:], weight.shape[1]).permute(0, d + 1, *range(1, d + 1)).contiguous()


def patch_conv(x: Tensor, conv: nn.Module) -> Tensor:
    """``conv(x)`` for a ``Conv{d}d``/``ConvTranspose{d}d`` of kernel 2 and stride 2: in training on the
    CPU, for a channels-last float32 ``x`` with oneDNN's inner product available, as one GEMM on
    patches, channels-last in and out (:class:`_PatchConv`; the convolutions' own backward is several
    times slower channels-last); otherwise the module on ``x`` in NC(D)HW."""
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    # (the 1x1 path's switch, read through its module: tests that turn that path off turn this one off)
    if (torch.is_grad_enabled() and pointwise._gemm_ok(x) and _onednn_ok(x)
            and tuple(conv.kernel_size) == tuple(conv.stride) == (2,) * (x.dim() - 2) and not any(conv.padding)
            and conv.groups == 1 and (transposed or all(s % 2 == 0 for s in x.shape[2:]))):
        return _PatchConv.apply(x, conv.weight, conv.bias, transposed)
    return conv(x.contiguous())
