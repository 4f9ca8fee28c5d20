"""1x1 convolutions ("Linear" layers on channels-first tensors) of the Deconver network, as GEMMs on the CPU.

:func:`pointwise` computes ``linear(fn(h))`` (``linear`` a 1x1 convolution, ``fn`` an optional
element-wise function or normalisation) keeping only ``h`` for backward, where ``fn(h)`` is recomputed
(:class:`_Pointwise`): a block's normalised inputs and its MLP's hidden activation are never stored.

On the CPU (float32/float64, no autocast) the convolution is a GEMM on a matrix view of the tensor,
forward and backward: PyTorch's own 1x1 convolution falls back to ``slow_conv3d`` there
(single-threaded, batch below 16), whose backward is several times slower than the GEMMs. A BLAS GEMM
reads either memory layout (NC(D)HW or channels-last) as it is and writes either, so the caller picks
the output layout (``channels_last``) at no cost; the gradient of ``h`` comes back in ``h``'s layout.
In training Deconver computes channels-last (:func:`training_layout`): there, for float32, the product
and the input's gradient run in oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, the
kernel PyTorch's own compiler emits for CPU linear layers: about 100 GMAC/s on one AVX-512 core where
MKL's SGEMM gives 20-45 on the same shapes, docs/nn.md), the weight's and bias's gradients (a
reduction over voxels, which oneDNN's inner product cannot read channels-last) in a native kernel
(:func:`deconver.nn.ndc_cpu.weight_grad`, BLAS where it does not apply). ``DECONVER_ONEDNN_LINEAR=0``,
or a PyTorch without oneDNN, leaves the products to BLAS. :mod:`deconver.nn.patchconv` does the same
for the stride-2 down- and up-sampling convolutions, as GEMMs on 2x..x2 patches. Elsewhere (CUDA, autocast,
shape-only tensors, tracers) the modules' own convolutions run: the same values.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deconver.nn import ndc_cpu
from deconver.nn.ndc_ops import _CHANNELS_LAST, _is_channels_last, _is_fake
from deconver.nn.norm import NativeInstanceNorm

__all__ = ["pointwise", "pointwise_cat", "training_layout"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_GEMM_DTYPES = (torch.float32, torch.float64)
_CHUNK_BYTES = 2**20  # a chunk of GELU's output in _gelu_linear: about a core's L2 cache


def _matrices(t: Tensor) -> Tensor:
    """``(B, C, *S) -> (B, C, prod(S))`` as a view (NC(D)HW: strides ``(., S, 1)``; channels-last:
    ``(., 1, C)``, which BLAS reads transposed); a contiguous copy for any other layout."""
    b, c = t.shape[:2]
    if _is_channels_last(t):
        return t.permute(0, *range(2, t.dim()), 1).reshape(b, -1, c).transpose(1, 2)
    return t.contiguous().view(b, c, -1)


def _onednn_linear():
    """oneDNN's inner product on dense CPU tensors (``torch.ops.mkldnn._linear_pointwise``: ``X W^T + b``
    for a row-major ``X``), or None where ``DECONVER_ONEDNN_LINEAR=0`` or :func:`_onednn_probe` fails."""
    if os.environ.get("DECONVER_ONEDNN_LINEAR", "1") == "0":
        return None
    return _onednn_probe()


@functools.cache
def _onednn_probe():
    """The op, once it has computed one small product right in this process; else None, with one
    warning naming why (a PyTorch built without oneDNN, or whose private op changed: it is the kernel
    PyTorch's own compiler emits for CPU linear layers, not a documented API)."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    why = "PyTorch was built without oneDNN" if not torch.backends.mkldnn.is_available() or op is None else ""
    if not why:
        x, w, b = torch.arange(6.0).view(3, 2), torch.tensor([[1.0, -2.0], [0.5, 3.0]]), torch.tensor([1.0, 2.0])
        try:
            if torch.equal(op(x, w, b, "none", [], ""), torch.addmm(b, x, w.t())):
                return op
            why = "it gave a wrong product"
        except (RuntimeError, TypeError) as err:
            why = f"it failed: {err}"
    warnings.warn(f"oneDNN's inner product (torch.ops.mkldnn._linear_pointwise) is not used: {why}; the 1x1 "
                  "convolutions run in BLAS", RuntimeWarning, stacklevel=2)
    return None


def _rows(t: Tensor) -> Tensor:
    """A channels-last ``(B, C, *S)`` tensor as its ``(B * prod(S), C)`` row-major matrix (a view)."""
    return t.permute(0, *range(2, t.dim()), 1).reshape(-1, t.shape[1])


def _from_rows(m: Tensor, shape: Sequence[int]) -> Tensor:
    """The ``(B * prod(S), O)`` matrix ``m`` as a channels-last ``(B, O, *S)`` tensor with the batch and
    spatial size of ``shape`` ``(B, ., *S)``, on ``m``'s memory (not an autograd view of it: ``m`` is a
    temporary)."""
    b, _, *spatial = shape
    return m.view(b, *spatial, m.shape[1]).permute(0, len(spatial) + 1, *range(1, len(spatial) + 1)).detach()


def _onednn_ok(*ts: Tensor) -> bool:
    """Whether oneDNN's inner product takes these operands: float32, channels-last, the op available."""
    return all(t.dtype == torch.float32 and _is_channels_last(t) for t in ts) and _onednn_linear() is not None


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
    if len(parts) == 1 and channels_last and _onednn_ok(a):  # channels-last in and out: oneDNN
        return _from_rows(_onednn_linear()(_rows(a), weight.reshape(o, -1), bias, "none", [], ""), a.shape)
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
    if need_w and _is_channels_last(a) and _is_channels_last(grad):  # rows: the native kernel or BLAS
        g_w, g_b = _weight_grad(_rows(grad), _rows(a), need_b)
        g_w = g_w.view_as(weight)
    elif need_w:
        g_w = torch.mm(gm[0], am[0].t())
        for i in range(1, a.shape[0]):
            g_w.addmm_(gm[i], am[i].t())
        g_w = g_w.view_as(weight)
    if need_b and g_b is None:
        g_b = _bias_grad(grad)
    if need_a and _onednn_ok(a, grad):
        g_a = _from_rows(_onednn_linear()(_rows(grad), w2.t().contiguous(), None, "none", [], ""), a.shape)
    elif need_a:
        g_a = a if reuse_a else torch.empty_like(a)
        gam = _matrices(g_a)
        for i in range(a.shape[0]):
            _mm(w2.t(), gm[i], gam[i])
    return g_a, g_w, g_b


def _bias_grad(grad: Tensor) -> Tensor:
    """The bias's gradient: ``grad`` summed over all but the channels (rows of a channels-last one)."""
    return _rows(grad).sum(0) if _is_channels_last(grad) else _matrices(grad).sum(dim=(0, 2))


def _chunks(rows: int, width: int):
    """``(lo, hi)`` row ranges of a ``(rows, width)`` float32 matrix, each under ``_CHUNK_BYTES``."""
    step = max(1, _CHUNK_BYTES // (4 * width))
    return ((lo, min(lo + step, rows)) for lo in range(0, rows, step))


def _gelu_linear(h: Tensor, weight: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    """``conv1x1(gelu(h))`` for a channels-last ``h`` in oneDNN, chunk by chunk of voxels: ``gelu(h)``
    only ever exists one cache-sized chunk at a time (no source-sized allocation, nor its page faults)."""
    o = weight.shape[0]
    out = torch.empty((h.shape[0], o, *h.shape[2:]), dtype=h.dtype, memory_format=_CHANNELS_LAST[h.dim() - 2])
    hr, outr, w2, linear = _rows(h), _rows(out), weight.reshape(o, -1), _onednn_linear()
    buf = torch.empty(_CHUNK_BYTES // 4, dtype=h.dtype)
    for lo, hi in _chunks(hr.shape[0], hr.shape[1]):
        a = torch.ops.aten.gelu.out(hr[lo:hi], approximate=approximate,
                                    out=buf[:(hi - lo) * hr.shape[1]].view(hi - lo, -1))
        outr[lo:hi].copy_(linear(a, w2, bias, "none", [], ""))
    return out


def _gelu_linear_backward(grad: Tensor, h: Tensor, weight: Tensor, approximate: str, need_h: bool, need_w: bool,
                          need_b: bool):
    """Gradients of :func:`_gelu_linear`: the weight's accumulated chunk by chunk over recomputed
    ``gelu(h)`` chunks, ``h``'s as oneDNN's product written over by GELU's backward."""
    o = weight.shape[0]
    w2 = weight.reshape(o, -1)
    grad = grad.contiguous(memory_format=_CHANNELS_LAST[h.dim() - 2])
    gr, hr = _rows(grad), _rows(h)
    g_h = g_w = g_b = None
    if need_w:
        g_w = torch.zeros_like(w2)
        buf = torch.empty(_CHUNK_BYTES // 4, dtype=h.dtype)
        for lo, hi in _chunks(hr.shape[0], hr.shape[1]):
            a = torch.ops.aten.gelu.out(hr[lo:hi], approximate=approximate,
                                        out=buf[:(hi - lo) * hr.shape[1]].view(hi - lo, -1))
            g_w += _weight_grad(gr[lo:hi], a, False)[0]
        g_w = g_w.view_as(weight)
    if need_b:
        g_b = gr.sum(0)
    if need_h:
        g_h = _from_rows(_onednn_linear()(gr, w2.t().contiguous(), None, "none", [], ""), h.shape)
        torch.ops.aten.gelu_backward.grad_input(g_h, h, approximate=approximate, grad_input=g_h)
    return g_h, g_w, g_b


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
        if gemm and channels_last and isinstance(fn, nn.GELU) and _onednn_ok(h):
            return _gelu_linear(h, weight, bias, fn.approximate)
        a = h if fn is None else fn(h)
        if gemm:
            return _gemm_forward(a, weight, bias, channels_last)
        return _CONV_FN[h.dim() - 2](a if dtype is None else a.to(dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        d = h.dim() - 2
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.gemm and isinstance(ctx.fn, nn.GELU) and _onednn_ok(h):
            g_h, g_w, g_b = _gelu_linear_backward(grad, h, weight, ctx.fn.approximate, need_h, need_w,
                                                  need_b and ctx.has_bias)
            return g_h, g_w, g_b, None, None, None, None
        if ctx.gemm and isinstance(ctx.fn, NativeInstanceNorm):  # the norm's gradient written in place
            a, mean, rstd = ctx.fn.with_stats(h)
            g_a, g_w, g_b = _gemm_backward(grad, a, weight, need_h, need_w, need_b and ctx.has_bias, reuse_a=True)
            if need_h:
                g_a = ctx.fn.backward_(h, g_a, mean, rstd)
            return g_a, g_w, g_b, None, None, None, None
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
        else:  # the convolution ran on fn(h) cast to autocast's dtype: its gradient is cast back (the cast's own)
            cast = a.detach() if ctx.dtype is None else a.detach().to(ctx.dtype)
            g_a, g_w, g_b = torch.ops.aten.convolution_backward(
                grad, cast, weight, [weight.shape[0]] if ctx.has_bias else None, [1] * d, [0] * d, [1] * d,
                False, [0] * d, 1, [need_h, need_w, need_b and ctx.has_bias])
            g_a = g_a if g_a is None else g_a.to(a.dtype)
        if ctx.fn is not None and need_h:
            g_a = torch.autograd.grad(a, h_, g_a)[0]
        return g_a, g_w, g_b, None, None, None, None


class _PointwiseCat(torch.autograd.Function):
    """``conv1x1(cat(xs, dim=1))`` on the CPU GEMM path without building the concatenation: only the
    parts are kept for backward (a decoder's skip is kept by the encoder anyway)."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor | None, channels_last: bool, *xs: Tensor):
        ctx.save_for_backward(weight, *xs)
        ctx.has_bias = bias is not None
        return _gemm_forward(xs, weight, bias, channels_last)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, *xs = ctx.saved_tensors
        need_w, need_b = ctx.needs_input_grad[:2]
        grads, g_ws, lo = [], [], 0
        for k, x in enumerate(xs):
            wk = weight[:, lo:lo + x.shape[1]]
            g_x, g_w, _ = _gemm_backward(grad, x, wk, ctx.needs_input_grad[3 + k], need_w, False)
            grads.append(g_x)
            g_ws.append(g_w)
            lo += x.shape[1]
        g_b = _bias_grad(grad) if need_b and ctx.has_bias else None
        return (torch.cat(g_ws, dim=1) if need_w else None), g_b, None, *grads


def pointwise_cat(xs: Sequence[Tensor], linear: nn.Module, channels_last: bool = False) -> Tensor:
    """``linear(torch.cat(xs, dim=1))``; on the CPU GEMM path in training without the concatenation
    (output channels-last if ``channels_last`` else NC(D)HW), elsewhere as written."""
    if torch.is_grad_enabled() and all(_gemm_ok(x) for x in xs):
        return _PointwiseCat.apply(linear.weight, linear.bias, channels_last, *xs)
    return linear(torch.cat(list(xs), dim=1))


def _weight_grad(g: Tensor, x: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """``(g^T x, g's column sums if bias)`` for row-major ``g`` ``(V, O)`` and ``x`` ``(V, C)``: the native
    kernel where it takes them (:func:`ndc_cpu.weight_grad`), else BLAS."""
    if ndc_cpu.weight_grad_supported(g, x):
        return ndc_cpu.weight_grad(g, x, bias)
    return torch.mm(g.t(), x), (g.sum(0) if bias else None)


def training_layout(x: Tensor) -> Tensor:
    """``x`` in the layout Deconver trains in: channels-last on the CPU GEMM path (2D/3D), where the
    1x1 convolutions run in oneDNN, the norms on the native kernels (:mod:`deconver.nn.norm`), the NDC
    in its own layout and the stride-2 convolutions as GEMMs on patches
    (:func:`deconver.nn.patchconv.patch_conv`), with no
    layout copy between them; ``x`` as it is elsewhere (and without gradients: inference keeps NC(D)HW)."""
    if x.dim() - 2 in _CHANNELS_LAST and torch.is_grad_enabled() and _gemm_ok(x):
        return x.contiguous(memory_format=_CHANNELS_LAST[x.dim() - 2])
    return x


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
