"""InstanceNorm without affine parameters that keeps a channels-last CPU tensor's layout.

Deconver's blocks train channels-last on the CPU (:mod:`deconver.nn.deconver`). PyTorch's
``instance_norm`` copies such an input to NC(D)HW first, and at batch 1 its backward is wrong when the
input or the incoming gradient is channels-last (PyTorch 2.14.1, CPU, float32 and float64: gradients
off by up to 3.8 for a 4-channel 5D input and unit-variance gradients, against the same call on
NC(D)HW tensors; batch 2 agrees). On a channels-last float32 CPU tensor :func:`instance_norm` runs the
native kernels of :mod:`deconver.nn.ndc_cpu` (statistics in double, the variance taken around the
mean; forward and backward each without a layout copy); on another channels-last tensor it is
composed of PyTorch's reductions and element-wise operations (autograd through them); anywhere else it
is ``F.instance_norm``. The same values as ``nn.InstanceNorm{1,2,3}d(affine=False)`` in training mode
(tests/test_norm.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deconver.nn import ndc_cpu
from deconver.nn.ndc_ops import _is_channels_last

__all__ = ["NativeInstanceNorm", "instance_norm", "norm_fn"]


class _InstanceNorm(torch.autograd.Function):
    """``F.instance_norm(x, eps=eps)`` on the native kernels; keeps ``x`` and its ``(N, C)`` statistics."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        y, mean, rstd = ndc_cpu.instance_norm(x, eps)
        ctx.save_for_backward(x, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, mean, rstd = ctx.saved_tensors
        g = torch.empty_like(x).copy_(g)  # the kernel writes over its gradient: never the caller's
        return ndc_cpu.instance_norm_backward(x, g, mean, rstd), None


class NativeInstanceNorm:
    """The function :func:`norm_fn` gives a block for a tensor the native kernels take: ``self(x)`` is
    :func:`instance_norm`; :mod:`deconver.nn.pointwise`, which recomputes it in backward, calls the
    kernels directly there (:meth:`with_stats`, :meth:`backward_`) so that the gradient is written in place."""

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def __call__(self, x: Tensor) -> Tensor:
        return _InstanceNorm.apply(x, self.eps)

    def with_stats(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, mean, rstd)`` (no autograd node)."""
        return ndc_cpu.instance_norm(x, self.eps)

    @staticmethod
    def backward_(x: Tensor, g: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
        """The gradient w.r.t. ``x`` written over ``g`` (channels-last, the caller's own buffer)."""
        return ndc_cpu.instance_norm_backward(x, g, mean, rstd)


def instance_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Instance normalisation of ``x`` ``(B, C, *S)`` (biased variance, no affine parameters, batch
    statistics), in ``x``'s layout where the native kernels take it (:func:`ndc_cpu.norm_supported`)."""
    if ndc_cpu.norm_supported(x):
        return _InstanceNorm.apply(x, eps)
    if _is_channels_last(x):  # composite ops (PyTorch's own backward is wrong there at batch 1, above)
        var, mean = torch.var_mean(x, dim=tuple(range(2, x.dim())), keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + eps)
    return F.instance_norm(x, eps=eps)


def norm_fn(norm: nn.Module, x: Tensor):
    """The function a block applies as ``norm`` to ``x``: for an affine-free InstanceNorm module (batch
    statistics) and a channels-last ``x``, :class:`NativeInstanceNorm` where the kernels take ``x``,
    else :func:`instance_norm` (never PyTorch's channels-last backward); the module itself otherwise."""
    if (isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.affine and not norm.track_running_stats
            and _is_channels_last(x)):
        if ndc_cpu.norm_supported(x):
            return NativeInstanceNorm(norm.eps)
        return functools.partial(instance_norm, eps=norm.eps)
    return norm
