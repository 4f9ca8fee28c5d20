"""1x1 convolutions ("Linear" layers on channels-first tensors) of the Deconver network, as GEMMs on the CPU.

:func:`pointwise` computes ``linear(fn(h))`` (``linear`` a 1x1 convolution, ``fn`` an optional
element-wise function or normalisation) keeping only ``h`` for backward, where ``fn(h)`` is recomputed
(:class:`_Pointwise`): a block's normalised inputs and its MLP's hidden activation are never stored.

On the CPU (float32/float64, no autocast) the convolution is one GEMM per sample on a ``(C, S)`` view
of the tensor, forward and backward: PyTorch's own 1x1 convolution falls back to ``slow_conv3d`` there
(single-threaded, batch below 16), whose backward is several times slower than the GEMMs. A GEMM
reads either memory layout (NC(D)HW or channels-last) as it is and writes either, so the caller
picks the output layout (``channels_last``) at no cost: the NDC layer computes channels-last (the
layout of oneDNN's fast depth-wise kernels) while the residual stream stays NC(D)HW, and no tensor is
ever converted between them. The gradient of ``h`` comes back in ``h``'s layout. Elsewhere (CUDA,
autocast, shape-only tensors, tracers) the module's own convolution runs: the same values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deconver.nn.ndc_ops import _CHANNELS_LAST, _is_channels_last, _is_fake

__all__ = ["pointwise", "pointwise_cat"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_GEMM_DTYPES = (torch.float32, torch.float64)


def _matrices(t: Tensor) -> Tensor:
    """``(B, C, *S) -> (B, C, prod(S))`` as a view (NC(D)HW: strides ``(., S, 1)``; channels-last:
    ``(., 1, C)``, which BLAS reads transposed); a contiguous copy for any other layout."""
    b, c = t.shape[:2]
    if _is_channels_last(t):
        return t.permute(0, *range(2, t.dim()), 1).reshape(b, -1, c).transpose(1, 2)
    return t.contiguous().view(b, c, -1)


def _mm(a: Tensor, b: Tensor, out: Tensor, bias: Tensor | None = None, accumulate: bool = False) -> None:
    """``out = a @ b (+ bias[:, None])`` (``accumulate``: ``out += a @ b``) with ``out`` a 2D view that is
    row- or column-major: the transposed problem where it is column-major, so that BLAS writes it in
    place (no copy)."""
    transposed = out.stride(-1) != 1
    if transposed:
        a, b, out = b.t(), a.t(), out.t()
    if accumulate:
        out.addmm_(a, b)
    elif bias is not None:
        torch.addmm(bias.unsqueeze(0) if transposed else bias.unsqueeze(1), a, b, out=out)
    else:
        torch.mm(a, b, out=out)


def _gemm_forward(a: Tensor | tuple[Tensor, ...], weight: Tensor, bias: Tensor | None, channels_last: bool) -> Tensor:
    """``conv(a, weight, bias)`` for a 1x1 ``weight``: per sample ``out = W a (+ b)`` written into a
    tensor of the requested layout. A tuple ``a`` is read as its concatenation along the channels
    (``W`` split into the matching column blocks), which is never built."""
    parts = a if isinstance(a, tuple) else (a,)
    b, _, *spatial = parts[0].shape
    o = weight.shape[0]
    fmt = _CHANNELS_LAST[len(spatial)] if channels_last and len(spatial) in _CHANNELS_LAST else torch.contiguous_format
    out = torch.empty((b, o, *spatial), dtype=parts[0].dtype, device=parts[0].device, memory_format=fmt)
    om, w2 = _matrices(out), weight.reshape(o, -1)
    lo = 0
    for k, part in enumerate(parts):
        am, wk = _matrices(part), w2[:, lo:lo + part.shape[1]]
        for i in range(b):
            _mm(wk, am[i], om[i], bias, accumulate=k > 0)
        lo += part.shape[1]
    return out


def _gemm_backward(grad: Tensor, a: Tensor, weight: Tensor, need_a: bool, need_w: bool, need_b: bool,
                   reuse_a: bool = False):
    """Gradients of :func:`_gemm_forward` w.r.t. ``a`` (in ``a``'s layout), the weight and the bias;
    ``reuse_a``: ``a``'s gradient is written over ``a`` (taken last), no new buffer."""
    gm, am = _matrices(grad), _matrices(a)
    o, c = weight.shape[:2]
    w2 = weight.reshape(o, c)
    g_a = g_w = g_b = None
    if need_w:
        g_w = torch.mm(gm[0], am[0].t())
        for i in range(1, a.shape[0]):
            g_w.addmm_(gm[i], am[i].t())
        g_w = g_w.view_as(weight)
    if need_b:
        g_b = gm.sum(dim=(0, 2))
    if need_a:
        g_a = a if reuse_a else torch.empty_like(a)
        gam = _matrices(g_a)
        for i in range(a.shape[0]):
            _mm(w2.t(), gm[i], gam[i])
    return g_a, g_w, g_b


class _Pointwise(torch.autograd.Function):
    """``conv1x1(fn(h))`` keeping only ``h`` for backward, where ``fn(h)`` is recomputed (``fn`` None:
    ``h`` itself). ``gemm``: the CPU GEMM path (output layout ``channels_last``); otherwise the
    convolution and its ``convolution_backward``, with ``fn(h)`` cast to ``dtype`` (autocast's) before
    it. Backward runs ``fn``'s own backward on the recomputed ``fn(h)``: the same gradients as autograd
    through ``fn`` and the convolution, for one more evaluation of ``fn``."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, fn, dtype, gemm: bool, channels_last: bool):
        ctx.save_for_backward(h, weight)
        ctx.fn, ctx.dtype, ctx.has_bias, ctx.gemm = fn, dtype, bias is not None, gemm
        a = h if fn is None else fn(h)
        if gemm:
            return _gemm_forward(a, weight, bias, channels_last)
        return _CONV_FN[h.dim() - 2](a if dtype is None else a.to(dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        d = h.dim() - 2
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.gemm and isinstance(ctx.fn, nn.GELU):  # one buffer: GELU(h), then its gradient in place
            a = ctx.fn(h)
            g_a, g_w, g_b = _gemm_backward(grad, a, weight, need_h, need_w, need_b and ctx.has_bias, reuse_a=True)
            if need_h:  # GELU's backward reads h, not its output: it may overwrite its incoming gradient
                g_a = torch.ops.aten.gelu_backward.grad_input(g_a, h, approximate=ctx.fn.approximate, grad_input=g_a)
            return g_a, g_w, g_b, None, None, None, None
        a = h_ = h
        if ctx.fn is not None:
            with torch.enable_grad():
                h_ = h.detach().requires_grad_(need_h)
                a = ctx.fn(h_)
        if ctx.gemm:
            g_a, g_w, g_b = _gemm_backward(grad, a.detach(), weight, need_h, need_w, need_b and ctx.has_bias)
        else:
            a = a if ctx.dtype is None else a.to(ctx.dtype)
            g_a, g_w, g_b = torch.ops.aten.convolution_backward(
                grad, a.detach(), weight, [weight.shape[0]] if ctx.has_bias else None, [1] * d, [0] * d, [1] * d,
                False, [0] * d, 1, [need_h, need_w, need_b and ctx.has_bias])
        if ctx.fn is not None and need_h:
            g_a = torch.autograd.grad(a, h_, g_a)[0]
        return g_a, g_w, g_b, None, None, None, None


class _PointwiseCat(torch.autograd.Function):
    """``conv1x1(cat(xs, dim=1))`` on the CPU GEMM path without building the concatenation: only the
    parts are kept for backward (a decoder's skip is kept by the encoder anyway)."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor | None, *xs: Tensor):
        ctx.save_for_backward(weight, *xs)
        ctx.has_bias = bias is not None
        return _gemm_forward(xs, weight, bias, channels_last=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, *xs = ctx.saved_tensors
        need_w, need_b = ctx.needs_input_grad[:2]
        grads, g_ws, lo = [], [], 0
        for k, x in enumerate(xs):
            wk = weight[:, lo:lo + x.shape[1]]
            g_x, g_w, _ = _gemm_backward(grad, x, wk, ctx.needs_input_grad[2 + k], need_w, False)
            grads.append(g_x)
            g_ws.append(g_w)
            lo += x.shape[1]
        g_b = _matrices(grad).sum(dim=(0, 2)) if need_b and ctx.has_bias else None
        return (torch.cat(g_ws, dim=1) if need_w else None), g_b, *grads


def pointwise_cat(xs: Sequence[Tensor], linear: nn.Module) -> Tensor:
    """``linear(torch.cat(xs, dim=1))``; on the CPU GEMM path in training without the concatenation
    (NC(D)HW output), elsewhere as written."""
    if torch.is_grad_enabled() and all(_gemm_ok(x) for x in xs):
        return _PointwiseCat.apply(linear.weight, linear.bias, *xs)
    return linear(torch.cat(list(xs), dim=1))


def _gemm_ok(h: Tensor) -> bool:
    """Whether the GEMM path applies: a real CPU float32/float64 tensor, no autocast, no tracer."""
    return (h.device.type == "cpu" and h.dtype in _GEMM_DTYPES and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not _is_fake(h))


def pointwise(h: Tensor, linear: nn.Module, fn=None, channels_last: bool | None = None) -> Tensor:
    """``linear(fn(h))`` (``linear`` a 1x1 convolution module, ``fn`` None or a function of ``h``),
    keeping only ``h`` for backward.

    On the CPU GEMM path (see the module docstring) the output is channels-last if ``channels_last``
    else NC(D)HW. Without gradients, only a requested layout takes the GEMM path (``channels_last`` not
    None); otherwise, and under a tracer or on shape-only tensors, ``linear(fn(h))`` itself runs (FLOP
    counters see the plain modules). Under autocast as autocast would run it: ``fn`` in ``h``'s dtype,
    the convolution in the autocast dtype (the parameters' casts are autograd nodes: their gradients
    come back in float32).
    """
    gemm = _gemm_ok(h)
    if not torch.is_grad_enabled() or torch.jit.is_tracing():  # nothing to keep
        a = h if fn is None else fn(h)
        if gemm and channels_last is not None:
            return _gemm_forward(a, linear.weight, linear.bias, channels_last)
        return linear(a)
    weight, bias, device = linear.weight, linear.bias, h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if dtype is not None:
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device, enabled=False):  # forward and recomputation alike
        return _Pointwise.apply(h, weight, bias, fn, dtype, gemm, bool(channels_last))
