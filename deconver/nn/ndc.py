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
    place (two alive at a time). On CPU the 2D/3D layer computes in channels-last layout, the layout in
    which oneDNN runs these grouped convolutions natively (the projection writes it directly, without
    converting ``x``), and returns a channels-last tensor; there, the depth-wise ``K`` is a depth-wise
    convolution plus a sum (see ``_k_op``) and the filter gradients merge groups (see
    ``_adjoint_filter_grad``). On CUDA, for a depth-wise float32 layer (the paper's configuration), the
    node runs fused Triton kernels that evaluate the stencils directly (:mod:`deconver.nn.ndc_triton`;
    ``DECONVER_NDC_FUSED=0`` turns them off); otherwise the same node runs on cuDNN in NC(D)HW.

``num_grad_iters`` follows the official code: iteration ``it`` (1-based) runs under ``torch.no_grad()``
when ``it <= num_iters - num_grad_iters``, so only the last ``num_grad_iters`` iterations carry
gradients (``None`` = all of them; with fewer, the projection and the earlier iterations receive no
gradient at all, exactly as in the official code).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "NDC",
    "NDCUpdate",
    "IMPLEMENTATIONS",
    "adjoint_weight",
    "ndc_adjoint",
    "ndc_forward_op",
    "ndc_update_macs",
    "pointwise_conv",
    "project_channels_last",
]

IMPLEMENTATIONS = ("lean", "reference")

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_MODULE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
_SLAB_BYTES = 32 * 2**20  # source tensors from this size on are convolved in slabs (see _k_op)
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


# --------------------------------------------------------------------------------------------------
# the two operators, as plain grouped convolutions (shared by both implementations' tests)
# --------------------------------------------------------------------------------------------------
def _padding(h: Tensor) -> tuple[int, ...]:
    return tuple(k // 2 for k in h.shape[2:])


def pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A 1x1 convolution (``weight`` ``(O, C, 1, ..., 1)``) that keeps the layout of ``x``.

    On a channels-last tensor it is one GEMM on the ``(B * S, C)`` view (``F.linear``), so the result
    is channels-last too and no layout conversion is paid (PyTorch's own convolution picks a path
    that answers in NCHW for some sizes and thread counts). Otherwise an ordinary convolution.
    """
    d = x.dim() - 2
    if d in _CHANNELS_LAST and x.is_contiguous(memory_format=_CHANNELS_LAST[d]) and not x.is_contiguous():
        out = F.linear(x.permute(0, *range(2, d + 2), 1), weight.flatten(1), bias)
        return out.permute(0, d + 1, *range(1, d + 1))
    return _CONV[d](x, weight, bias)


def project_channels_last(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A 1x1 convolution whose result is channels-last, reading ``x`` as it is (NC(D)HW or
    channels-last) with one GEMM and no layout conversion of ``x``."""
    d = x.dim() - 2
    if not x.is_contiguous():
        return pointwise_conv(x.contiguous(memory_format=_CHANNELS_LAST[d]), weight, bias)
    b, c = x.shape[:2]
    w2 = weight.flatten(1)  # (O, C)
    xt = x.reshape(b, c, -1).transpose(1, 2)  # (B, S, C), a view: BLAS reads it transposed
    if b == 1:  # one GEMM (a batched one would also give a per-sample weight gradient)
        out = F.linear(xt[0], w2, bias).unsqueeze(0)
    else:
        out = torch.bmm(xt, w2.t().unsqueeze(0).expand(b, c, w2.shape[0]))
        if bias is not None:
            out = out.add_(bias)
    return out.view(b, *x.shape[2:], w2.shape[0]).permute(0, d + 1, *range(1, d + 1))


def adjoint_weight(h: Tensor, groups: int) -> Tensor:
    """Weight of ``A = K^T`` as an ordinary grouped-convolution weight, shape ``(G*sc, m, *k)``.

    ``h`` is the filter of ``K``, shape ``(C, sc, *k)`` with ``C = G*m``. The kernel is flipped along
    its spatial axes and, inside every group, the ``m`` output and ``sc`` input channel axes are
    swapped; this is exact for any ``m`` (for ``m == 1`` the swap is a no-op).
    """
    c, sc, *ks = h.shape
    m = c // groups
    sp = tuple(range(-len(ks), 0))
    return h.reshape(groups, m, sc, *ks).transpose(1, 2).flip(sp).reshape(groups * sc, m, *ks)


def ndc_forward_op(s: Tensor, h: Tensor, groups: int) -> Tensor:
    """``K(s)``: ``(B, G*sc, *S) -> (B, C, *S)``, grouped cross-correlation with zero "same" padding."""
    return _CONV[h.dim() - 2](s, h, padding=_padding(h), groups=groups)


def _is_channels_last(t: Tensor) -> bool:
    d = t.dim() - 2
    return d in _CHANNELS_LAST and t.is_contiguous(memory_format=_CHANNELS_LAST[d]) and not t.is_contiguous()


def _is_fake(t: Tensor) -> bool:
    """Shape-only tensors (FLOP counting under FakeTensorMode) take the plain path: a FLOP count
    measures the algorithm, not the halo rows the CPU slab workaround recomputes."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _k_op(s: Tensor, h: Tensor, groups: int) -> Tensor:
    """``K(s)`` for the lean path: as :func:`ndc_forward_op`, except for a depth-wise filter with
    several source channels on a channels-last CPU tensor, where oneDNN's grouped kernel pads the
    ``sc -> 1`` channels of every group to 16 and is slow. There it is a plain depth-wise convolution
    of the ``G * sc`` source channels (oneDNN's fast depth-wise kernel) summed over each group's
    ``sc`` outputs. Source tensors of 32 MiB or more are done in up to ``2 * sc`` slabs (of at least
    8 rows) along the first spatial axis (halo ``k // 2``), so that the un-summed temporary stays
    about half the size of ``K(s)``. Same result up to summation order.
    """
    c, sc, *ks = h.shape
    if c != groups or sc == 1 or s.device.type != "cpu" or not _is_channels_last(s) or _is_fake(s):
        return ndc_forward_op(s, h, groups)
    b, _, n, *rest = s.shape
    d = len(ks)
    weight = h.reshape(c * sc, 1, *ks)
    pad = _padding(h)
    out = torch.empty((b, c, n, *rest), dtype=s.dtype, device=s.device, memory_format=_CHANNELS_LAST[d])
    out_last = out.permute(0, *range(2, d + 2), 1)  # (B, *S, C) view of out's memory
    # slabs only pay off for large samples (halo rows are computed twice): at least 8 rows each;
    # with slabs, one sample at a time, so that every slab is a dense channels-last block
    per_sample = s[0].numel() * s.element_size()
    slabs = 1 if per_sample < _SLAB_BYTES else max(1, min(2 * sc, n // 8))
    step = -(-n // slabs)
    for i in range(b) if slabs > 1 else [None]:
        src = s if i is None else s.narrow(0, i, 1)
        dst = out_last if i is None else out_last.narrow(0, i, 1)
        for lo_out in range(0, n, step):
            hi_out = min(n, lo_out + step)
            lo, hi = max(0, lo_out - pad[0]), min(n, hi_out + pad[0])
            # zero padding on every side; rows next to an inner slab boundary are wrong and dropped
            y = _CONV[d](src.narrow(2, lo, hi - lo), weight, padding=pad, groups=c * sc)
            y = y.narrow(2, lo_out - lo, hi_out - lo_out).permute(0, *range(2, d + 2), 1)  # (b, *S', C*sc)
            torch.sum(y.unflatten(-1, (c, sc)), dim=-1, out=dst.narrow(1, lo_out, hi_out - lo_out))
    return out


def ndc_adjoint(y: Tensor, h: Tensor, groups: int) -> Tensor:
    """``A(y) = K^T(y)``: ``(B, C, *S) -> (B, G*sc, *S)``, the exact adjoint of :func:`ndc_forward_op`."""
    return _CONV[h.dim() - 2](y, adjoint_weight(h, groups), padding=_padding(h), groups=groups)


def _wgrad_merge(groups: int, m: int, sc: int) -> int:
    """How many groups to merge into one for the weight-gradient kernel (see _adjoint_filter_grad)."""
    merge = 1
    while groups % (2 * merge) == 0 and 2 * merge * max(m, sc) <= 16:
        merge *= 2
    return merge


def _adjoint_filter_grad(inp: Tensor, grad_out: Tensor, wa: Tensor, groups: int) -> Tensor:
    """Gradient w.r.t. the adjoint weight ``wa`` of ``<grad_out, conv(inp, wa, groups)>``.

    All three filter-gradient terms are taken in this form (input ``(B, C, *S)``, output gradient
    ``(B, G*sc, *S)``): oneDNN's weight-gradient kernels are 2-4x faster for it than for the
    ``K`` form. Groups are merged ``M`` at a time into a block-diagonal weight of ``M*m -> M*sc``
    channels per group (about 16, oneDNN's channel block, instead of a few padded to 16): the
    gradient of the blocks off the diagonal is computed and thrown away, which is still about
    twice as fast at the BraTS geometry. A weight gradient does not depend on the weight's values,
    so the merged weight is never built.
    """
    d = wa.dim() - 2
    gsc, m, *ks = wa.shape
    sc = gsc // groups
    merge = _wgrad_merge(groups, m, sc) if grad_out.device.type == "cpu" else 1  # measured on CPU only
    g2 = groups // merge
    weight = wa.new_empty(1).expand(gsc, merge * m, *ks)
    pad = [k // 2 for k in ks]
    gw = torch.ops.aten.convolution_backward(
        grad_out, inp, weight, None, [1] * d, pad, [1] * d, False, [0] * d, g2, [False, True, False]
    )[1]
    if merge == 1:
        return gw
    # (g2, j, sc, j', m, *k): keep the diagonal j == j' -> (g2, sc, m, *k, j) -> (G*sc, m, *k)
    blocks = gw.reshape(g2, merge, sc, merge, m, *ks).diagonal(dim1=1, dim2=3)
    return blocks.permute(0, -1, *range(1, blocks.dim() - 1)).reshape(wa.shape)


def _filter_grad_from_adjoint(gwa: Tensor, h: Tensor, groups: int) -> Tensor:
    """Map a gradient w.r.t. :func:`adjoint_weight` back to ``h`` (the inverse permutation and flip)."""
    c, sc, *ks = h.shape
    sp = tuple(range(-len(ks), 0))
    return gwa.reshape(groups, sc, c // groups, *ks).transpose(1, 2).flip(sp).reshape(h.shape)


def ndc_update_macs(x_shape: Sequence[int], h_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward :class:`NDCUpdate`: ``3 * B * prod(S) * C * sc * k^d``.

    ``K(s)``, ``A(x)`` and ``A(K(s))`` each cost ``C * sc * k^d`` MACs per voxel and sample
    (element-wise work, a handful of operations per source element, is not included).
    """
    b, _c, *spatial = x_shape
    return 3 * b * math.prod(spatial) * math.prod(h_shape)


# --------------------------------------------------------------------------------------------------
# lean implementation: one autograd node per multiplicative update
# --------------------------------------------------------------------------------------------------
def _lean_update_forward(
    x: Tensor, z: Tensor, h: Tensor, groups: int, eps: float, relu_input: bool
) -> tuple[Tensor, Tensor]:
    """``(s * (A(x) + eps) / (A(K(s)) + eps), K(s))`` with ``s = relu(z)`` (or ``z``).

    Full-size (source-sized) allocations: ``s`` (which becomes the output), ``A(x)`` and ``A(K(s))``;
    at most two of them alive at a time.
    """
    wa = adjoint_weight(h, groups).contiguous()
    s = torch.relu(z) if relu_input else z
    t1 = _k_op(s, h, groups)
    num = _conv_like(_like_layout(x, z), wa, groups).add_(eps)
    out = s.mul_(num) if relu_input else num.mul_(s)  # s * num (``s`` is ours when relu_input)
    del num
    out.div_(_conv_like(t1, wa, groups).add_(eps))
    return out, t1


def _like_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in the memory layout of ``like`` (NC(D)HW or channels-last); one copy if they differ."""
    d = like.dim() - 2
    if d in _CHANNELS_LAST and like.is_contiguous(memory_format=_CHANNELS_LAST[d]) and not like.is_contiguous():
        return t.contiguous(memory_format=_CHANNELS_LAST[d])
    return t.contiguous()


def _conv_like(inp: Tensor, weight: Tensor, groups: int) -> Tensor:
    return _CONV[weight.dim() - 2](inp, weight, padding=_padding(weight), groups=groups)


def _lean_backward(g: Tensor, x: Tensor, saved: Tensor, h: Tensor, t1: Tensor, groups: int, eps: float,
                   relu_input: bool, from_output: bool, need_x: bool, need_z: bool, need_h: bool):
    """Gradients ``(dL/dx, dL/dz, dL/dh)`` of one unfused :class:`NDCUpdate`.

    ``saved`` is ``z`` or, with ``from_output`` (valid when ``N = A(x) + eps > 0``), the update's output
    ``out = s * N / D``: then ``s / D = out / N``, ``s = out / R`` with ``R = N / D``, and ReLU's mask is
    ``out > 0``. Two source-sized work buffers; each is freed before the next one is made.
    """
    g = _like_layout(g, saved)
    x = _like_layout(x, saved)  # a temporary copy if the caller's x has another layout
    wa = adjoint_weight(h, groups).contiguous()
    gx = gz = gwa = None
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
        gwa = _adjoint_filter_grad(x, w, wa, groups)
    del x
    if need_x:
        gx = _k_op(w, h, groups)  # A^T = K
    gd = w.mul_(r).neg_()  # dL/dA(t1) = -g * s * N / D^2 = -w * R
    gt1 = _k_op(gd, h, groups)  # dL/dt1
    if need_h:
        gwa.add_(_adjoint_filter_grad(t1, gd, wa, groups))
        if from_output:
            s = torch.div(saved, r, out=gd)  # s = out / R
        else:
            s = torch.clamp(saved, min=0, out=gd) if relu_input else saved
        gwa.add_(_adjoint_filter_grad(gt1, s, wa, groups))  # <gt1, K(s)> = <A(gt1), s>
        del s
    del w, gd  # the first buffer: freed before the third one below
    if need_z:
        p = r.mul_(g)  # dL/ds, direct term: g * N / D
        b3 = _conv_like(gt1, wa, groups)
        p.add_(b3)  # + K^T(dL/dt1)
        if relu_input:  # relu's derivative: 1 where z > 0, i.e. where relu(z) > 0 and where out > 0
            p.mul_(torch.clamp(saved, min=0, out=b3).sign_())
        gz = p
    gh = _filter_grad_from_adjoint(gwa, h, groups) if need_h else None
    return gx, gz, gh


class NDCUpdate(torch.autograd.Function):
    """One NDC multiplicative update as a single autograd node (the ``"lean"`` implementation).

    ``NDCUpdate.apply(x, z, h, groups, eps, relu_input)`` returns
    ``s * (A(x) + eps) / (A(K(s)) + eps)`` with ``s = relu(z)`` if ``relu_input`` else ``s = z``;
    ``x``: ``(B, C, *S)``; ``z``: ``(B, G*sc, *S)`` (the pre-activation projection, bias included, for
    the first update; the previous iterate for later ones); ``h``: the rectified filter ``(C, sc, *k)``,
    which must be nonnegative (the backward relies on ``A(K(s)) + eps > 0``). The computation runs in
    the memory layout of ``z``; ``x`` is converted to it on the fly if needed (a temporary copy).

    Saved for backward: ``x``, ``z`` and ``K(s)`` (plus the small ``h``); with ``x >= 0`` and ``eps > 0``
    the output replaces ``z`` (``s = out * D / N``, see :func:`_lean_backward`; the fused kernels do the
    same), so the caller must not modify the output in place. ``A(x)``
    and ``A(K(s))`` are recomputed in backward. Not twice differentiable.

    Cost (for FLOP counters; the class name is stable: TorchScript/fvcore see this node as
    ``prim::PythonOp`` named ``NDCUpdate``, fvcore's handle key ``"prim::PythonOp.NDCUpdate"``):
    per voxel and sample, ``K(s)`` is ``C * sc * k^d`` MACs and ``A(x)`` and ``A(K(s))`` are the same
    each, i.e. ``3 * C * sc * k^d`` MACs forward (:func:`ndc_update_macs`), plus about five
    element-wise operations per source element (``G * sc`` per voxel). Backward: two recomputed
    adjoints, three convolutions for input gradients and three filter-gradient reductions of the same
    size (about ``8 * C * sc * k^d`` MACs per voxel).
    """

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, h: Tensor, groups: int, eps: float, relu_input: bool):
        ctx.fused = _use_fused(x, z, h, groups)
        if ctx.fused:
            x, z, h = x.contiguous(), z.contiguous(), h.contiguous()
            out, t1 = _triton_kernels().update_forward(x, z, h, eps, relu_input)
        else:
            out, t1 = _lean_update_forward(x, z, h, groups, eps, relu_input)
        # With x >= 0 (the mixer's ReLU gives it) and eps > 0, N = A(x) + eps > 0, so s = out * D / N
        # can be recovered in backward: keep the output (alive anyway: the next layer holds it)
        # instead of z, one source-sized tensor less over the layer's lifetime (both paths).
        ctx.from_output = eps > 0 and not _is_fake(x) and bool(x.min() >= 0)  # fake: shapes only
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
            return gx, gz, gh, None, None, None
        gx, gz, gh = _lean_backward(g, x, z, h, t1, groups, eps, relu_input, ctx.from_output, need_x, need_z, need_h)
        return gx, gz, gh, None, None, None


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
            s = project_channels_last(x, self.proj.weight, self.proj.bias)
        else:
            s = self.proj(x)
        relu_input = True
        for it in range(1, self.num_iters + 1):
            with self._grad_context(it):  # one NDCUpdate node per update (also under no_grad,
                s = NDCUpdate.apply(x, s, h, self.groups, self.eps, relu_input)  # for tracers)
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
