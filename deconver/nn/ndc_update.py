"""NDCUpdate: one NDC multiplicative update as a single memory-lean autograd node (the ``"lean"`` layer).

Forward ``s * (A(x) + eps) / (A(K(s)) + eps)`` with ``s = relu(z)``; only ``x``, the output (or ``z``)
and ``K(s)`` are kept, ``A(x)`` and ``A(K(s))`` are recomputed in backward. For a depth-wise float32
layer the node runs fused kernels: on CUDA the Triton kernels of :mod:`deconver.nn.ndc_triton`, on the
CPU (channels-last) the native kernels of :mod:`deconver.nn.ndc_cpu` (``DECONVER_NDC_FUSED=0`` turns
both off); elsewhere the grouped convolutions of :mod:`deconver.nn.ndc_ops`. Notation:
:mod:`deconver.nn.ndc`.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from deconver.nn import ndc_cpu
from deconver.nn.ndc_ops import (
    _adjoint_filter_grad,
    _conv_like,
    _conv_rows,
    _filter_grad_from_adjoint,
    _flat,
    _is_fake,
    _k_op,
    _like_layout,
    _slab_path,
    _slabs,
    adjoint_weight,
)

__all__ = ["NDCUpdate"]

_FUSED_DEVICE_TYPES = ("cuda",)  # where NDCUpdate runs the Triton kernels of deconver.nn.ndc_triton


@functools.cache
def _triton_kernels():
    """deconver.nn.ndc_triton, or None where Triton is not installed."""
    try:
        from deconver.nn import ndc_triton
    except ImportError:
        return None
    return ndc_triton


def _use_fused(x: Tensor, z: Tensor, h: Tensor, groups: int) -> bool:
    """Whether :class:`NDCUpdate` runs the fused Triton kernels: CUDA, depth-wise, float32, Triton
    installed, and not turned off by ``DECONVER_NDC_FUSED=0``."""
    if x.device.type not in _FUSED_DEVICE_TYPES or os.environ.get("DECONVER_NDC_FUSED", "1") == "0" or _is_fake(x):
        return False
    kernels = _triton_kernels()
    return kernels is not None and kernels.supported(x, z, h, groups)


def _native(x: Tensor, s: Tensor, h: Tensor, groups: int) -> bool:
    """Whether :class:`NDCUpdate` runs the native CPU kernels of :mod:`deconver.nn.ndc_cpu` (on the slab
    path, for the layers those kernels take, where they are built and not turned off)."""
    return _slab_path(s) and ndc_cpu.supported(x, s, h, groups)


def _lean_update_forward(
    x: Tensor, z: Tensor, h: Tensor, groups: int, eps: float, relu_input: bool, out_is_z: bool = False
) -> tuple[Tensor, Tensor]:
    """``(s * (A(x) + eps) / (A(K(s)) + eps), K(s))`` with ``s = relu(z)`` (or ``z``).

    Full-size (source-sized) allocations: ``s`` (which becomes the output), ``A(x)`` and ``A(K(s))``;
    at most two of them alive at a time. On the CPU in channels-last, ``A(x)`` and ``A(K(s))`` exist
    only slab by slab (:func:`_slab_update`), or not at all (the native kernels): the output is the only
    source-sized allocation.
    """
    wa = adjoint_weight(h, groups).contiguous()
    s = torch.relu(z) if relu_input else z
    if _native(x, s, h, groups):
        out = s if relu_input or out_is_z else torch.empty_like(s)
        t1 = ndc_cpu.k_op(s, h)
        return ndc_cpu.update(_like_layout(x, z), t1, s, wa, h, eps, out), t1
    t1 = _k_op(s, h, groups)
    if _slab_path(s):
        out = s if relu_input or out_is_z else torch.empty_like(s)
        return _slab_update(_like_layout(x, z), out, s, t1, wa, groups, eps), t1
    num = _conv_like(_like_layout(x, z), wa, groups).add_(eps)
    out = s.mul_(num) if relu_input else num.mul_(s)  # s * num (``s`` is ours when relu_input)
    del num
    out.div_(_conv_like(t1, wa, groups).add_(eps))
    return out, t1


def _slab_update(x: Tensor, out: Tensor, s: Tensor, t1: Tensor, wa: Tensor, groups: int, eps: float) -> Tensor:
    """``out = s * (A(x) + eps) / (A(t1) + eps)`` slab by slab along the first spatial axis (``out`` may
    be ``s``): the adjoints' temporaries stay below ``_SLAB_BYTES`` and in cache for the update."""
    for i, batch, lo, hi in _slabs(s, 2 * s[0, :, 0].numel() * s.element_size()):  # two temporaries
        num = _conv_rows(x.narrow(0, i, batch), wa, groups, lo, hi).add_(eps)
        den = _conv_rows(t1.narrow(0, i, batch), wa, groups, lo, hi).add_(eps)
        o = out.narrow(0, i, batch).narrow(2, lo, hi - lo)
        torch.mul(s.narrow(0, i, batch).narrow(2, lo, hi - lo), num, out=o).div_(den)
    return out


def _lean_backward(g: Tensor, x: Tensor, saved: Tensor, h: Tensor, t1: Tensor, groups: int, eps: float,
                   relu_input: bool, from_output: bool, need_x: bool, need_z: bool, need_h: bool):
    """Gradients ``(dL/dx, dL/dz, dL/dh)`` of one unfused :class:`NDCUpdate`.

    ``saved`` is ``z`` or, with ``from_output`` (valid when ``N = A(x) + eps > 0``), the update's output
    ``out = s * N / D``: then ``s / D = out / N``, ``s = out / R`` with ``R = N / D``, and ReLU's mask is
    ``out > 0``. Two source-sized work buffers; each is freed before the next one is made. On the CPU slab
    path (channels-last) the adjoints ``N``, ``D`` and ``A(dL/dt1)`` exist only slab by slab, each used
    where it is computed (:func:`_slab_ratios`, :func:`_slab_grad_z`), or not at all where the native
    kernels run (:mod:`deconver.nn.ndc_cpu`: the same steps, each one pass).
    """
    g = _like_layout(g, saved)
    x = _like_layout(x, saved)  # a temporary copy if the caller's x has another layout
    wa = adjoint_weight(h, groups).contiguous()
    gx = gz = gwa = None
    native = _native(x, saved, h, groups)
    slabs = _slab_path(saved)

    def k_op(t: Tensor, scale: float = 1.0) -> Tensor:
        if native:
            return ndc_cpu.k_op(t, h, scale)
        out = _k_op(t, h, groups)
        return out if scale == 1.0 else out.mul_(scale)

    def filter_grad(inp: Tensor, grad_out: Tensor) -> Tensor:
        return ndc_cpu.filter_grad(inp, grad_out, wa, h) if native else _adjoint_filter_grad(inp, grad_out, wa, groups)

    if native:
        r, w = ndc_cpu.ratios(x, t1, saved, g, wa, h, eps, relu_input, from_output)
    elif slabs:
        r, w = _slab_ratios(x, t1, saved, g, wa, groups, eps, relu_input, from_output)
    else:
        inv_d = _conv_like(t1, wa, groups).add_(eps).reciprocal_()  # 1 / D
        num = _conv_like(x, wa, groups).add_(eps)  # N
        if from_output:
            r = inv_d.mul_(num)  # R = N / D
            w = num.reciprocal_().mul_(saved)  # s / D = out / N
        else:
            r = num.mul_(inv_d)  # R = N / D
            w = inv_d.mul_(saved)  # s / D; with D > 0 (h >= 0) relu commutes with the positive factor
            if relu_input:
                w.clamp_min_(0)
        del inv_d, num
        w.mul_(g)  # dL/dA(x) = g * s / D
    if need_h:
        gwa = filter_grad(x, w)
    del x
    if need_x:
        gx = k_op(w)  # A^T = K
    q = w.mul_(r)  # -dL/dA(t1) = g * s * N / D^2 = w * R (the sign is applied to the results: exact)
    gt1 = k_op(q, -1.0)  # dL/dt1 = K(-q)
    if need_h:
        gwa.sub_(filter_grad(t1, q))
        if from_output:
            s = torch.div(saved, r, out=q)  # s = out / R
        else:
            s = torch.clamp(saved, min=0, out=q) if relu_input else saved
        gwa.add_(filter_grad(gt1, s))  # <gt1, K(s)> = <A(gt1), s>
        del s
    del w, q  # the first buffer: freed before the third one below
    if need_z:
        if native:
            gz = ndc_cpu.grad_z(r, g, gt1, saved, wa, h, relu_input)
        elif slabs:
            gz = _slab_grad_z(r, g, gt1, saved, wa, groups, relu_input)
        else:
            p = r.mul_(g)  # dL/ds, direct term: g * N / D
            b3 = _conv_like(gt1, wa, groups)
            p.add_(b3)  # + K^T(dL/dt1)
            del b3
            if relu_input:  # relu's derivative: 1 where z > 0, i.e. where relu(z) > 0 and where out > 0
                p = torch.ops.aten.threshold_backward.grad_input(p, saved, 0, grad_input=p)  # one pass, in place
            gz = p
    gh = _filter_grad_from_adjoint(gwa, h, groups) if need_h else None
    return gx, gz, gh


def _rows(t: Tensor, i: int, batch: int, lo: int, hi: int) -> Tensor:
    """Samples ``i:i+batch``, rows ``lo:hi`` (first spatial axis) of ``t``: a view."""
    return t.narrow(0, i, batch).narrow(2, lo, hi - lo)


def _slab_ratios(x: Tensor, t1: Tensor, saved: Tensor, g: Tensor, wa: Tensor, groups: int, eps: float,
                 relu_input: bool, from_output: bool) -> tuple[Tensor, Tensor]:
    """``(R, w)`` of :func:`_lean_backward` (``R = N / D``, ``w = g * s / D``) slab by slab: ``N = A(x) + eps``
    and ``D = A(t1) + eps`` exist only as slab temporaries; two source-sized outputs, written once."""
    r, w = torch.empty_like(saved), torch.empty_like(saved)
    for i, batch, lo, hi in _slabs(saved, 2 * saved[0, :, 0].numel() * saved.element_size()):  # two temporaries
        num = _conv_rows(x.narrow(0, i, batch), wa, groups, lo, hi).add_(eps)
        den = _conv_rows(t1.narrow(0, i, batch), wa, groups, lo, hi).add_(eps)
        w_rows = _rows(w, i, batch, lo, hi)
        torch.div(num, den, out=_rows(r, i, batch, lo, hi))
        if from_output:
            torch.div(_rows(saved, i, batch, lo, hi), num, out=w_rows)  # s / D = out / N
        else:
            torch.div(_rows(saved, i, batch, lo, hi), den, out=w_rows)  # with D > 0, relu commutes with 1 / D
            if relu_input:
                w_rows.clamp_min_(0)
        w_rows.mul_(_rows(g, i, batch, lo, hi))
    return r, w


def _slab_grad_z(r: Tensor, g: Tensor, gt1: Tensor, saved: Tensor, wa: Tensor, groups: int,
                 relu_input: bool) -> Tensor:
    """``dL/dz = (g * R + A(dL/dt1)) * relu'`` written over ``r``, slab by slab (``A(dL/dt1)`` a slab
    temporary)."""
    for i, batch, lo, hi in _slabs(r, r[0, :, 0].numel() * r.element_size()):
        p = _rows(r, i, batch, lo, hi)
        torch.addcmul(_conv_rows(gt1.narrow(0, i, batch), wa, groups, lo, hi), p, _rows(g, i, batch, lo, hi), out=p)
        if relu_input:  # relu's derivative: 1 where z > 0, i.e. where relu(z) > 0 and where out > 0
            torch.ops.aten.threshold_backward.grad_input(p, _rows(saved, i, batch, lo, hi), 0, grad_input=p)
    return r


class NDCUpdate(torch.autograd.Function):
    """One NDC multiplicative update as a single autograd node (the ``"lean"`` implementation).

    ``NDCUpdate.apply(x, z, h, groups, eps, relu_input, own_z=False)`` returns
    ``s * (A(x) + eps) / (A(K(s)) + eps)`` with ``s = relu(z)`` if ``relu_input`` else ``s = z``;
    ``x``: ``(B, C, *S)``; ``z``: ``(B, G*sc, *S)`` (the pre-activation projection, bias included, for
    the first update; the previous iterate for later ones); ``h``: the rectified filter ``(C, sc, *k)``,
    which must be nonnegative (the backward relies on ``A(K(s)) + eps > 0``). The computation runs in
    the memory layout of ``z``; ``x`` is converted to it on the fly if needed (a temporary copy).

    Saved for backward: ``x``, ``z`` and ``K(s)`` (plus the small ``h``); with ``x >= 0`` and ``eps > 0``
    the output replaces ``z`` (``s = out * D / N``, see :func:`_lean_backward`; the fused kernels do the
    same), so the caller must not modify the output in place. ``A(x)``
    and ``A(K(s))`` are recomputed in backward. Not twice differentiable. ``own_z``: ``z`` is the
    caller's temporary (the layer's projection); where ``z`` is then not needed in backward (``x >= 0``,
    CPU slab path) the update is computed in ``z``'s memory and returns ``z`` itself (marked dirty).

    Cost (for FLOP counters; the class name is stable: TorchScript/fvcore see this node as
    ``prim::PythonOp`` named ``NDCUpdate``, fvcore's handle key ``"prim::PythonOp.NDCUpdate"``):
    per voxel and sample, ``K(s)`` is ``C * sc * k^d`` MACs and ``A(x)`` and ``A(K(s))`` are the same
    each, i.e. ``3 * C * sc * k^d`` MACs forward (:func:`ndc_update_macs`), plus about five
    element-wise operations per source element (``G * sc`` per voxel). Backward: two recomputed
    adjoints, three convolutions for input gradients and three filter-gradient reductions of the same
    size (about ``8 * C * sc * k^d`` MACs per voxel).
    """

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, h: Tensor, groups: int, eps: float, relu_input: bool,
                own_z: bool = False):
        # With x >= 0 (the mixer's ReLU gives it) and eps > 0, N = A(x) + eps > 0, so s = out * D / N
        # can be recovered in backward: keep the output (alive anyway: the next layer holds it)
        # instead of z, one source-sized tensor less over the layer's lifetime (both paths).
        ctx.from_output = eps > 0 and not _is_fake(x) and bool(_flat(x).min() >= 0)  # fake: shapes only
        ctx.fused = _use_fused(x, z, h, groups)
        if ctx.fused:
            x, z, h = x.contiguous(), z.contiguous(), h.contiguous()
            out, t1 = _triton_kernels().update_forward(x, z, h, eps, relu_input)
        elif own_z and relu_input and ctx.from_output and _slab_path(z):
            # z is the caller's temporary and not needed in backward: the update overwrites it
            out, t1 = _lean_update_forward(x, z.relu_(), h, groups, eps, relu_input=False, out_is_z=True)
            ctx.mark_dirty(z)
        else:
            out, t1 = _lean_update_forward(x, z, h, groups, eps, relu_input)
        if ctx.from_output:
            z = out
        ctx.save_for_backward(x, z, h, t1)
        ctx.cfg = (groups, eps, relu_input)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "NDCUpdate (the lean NDC implementation) is not twice differentiable; "
                "use impl='reference' for higher-order gradients"
            )
        x, z, h, t1 = ctx.saved_tensors
        groups, eps, relu_input = ctx.cfg
        need_x, need_z, need_h = ctx.needs_input_grad[:3]
        if ctx.fused:
            gx, gz, gh = _triton_kernels().update_backward(g, x, z, h, t1, eps, relu_input, need_x, need_z, need_h,
                                                           from_output=ctx.from_output)
            return gx, gz, gh, None, None, None, None
        gx, gz, gh = _lean_backward(g, x, z, h, t1, groups, eps, relu_input, ctx.from_output, need_x, need_z, need_h)
        return gx, gz, gh, None, None, None, None
