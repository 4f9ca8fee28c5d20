"""The NDC operators ``K`` and ``A = K^T`` as plain grouped convolutions, and the CPU helpers around them.

``K(s)`` (:func:`ndc_forward_op`, and :func:`_k_op`, its channels-last CPU form), its exact adjoint
``A`` (:func:`adjoint_weight`, :func:`ndc_adjoint`), the layout helpers, the filter-gradient
reductions of the lean backward (:func:`_adjoint_filter_grad`) and the MAC count of one update
(:func:`ndc_update_macs`). Notation: :mod:`deconver.nn.ndc`. Used by the lean autograd node
(:mod:`deconver.nn.ndc_update`), the layer (:mod:`deconver.nn.ndc`) and the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "adjoint_weight",
    "ndc_adjoint",
    "ndc_forward_op",
    "ndc_update_macs",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
_SLAB_BYTES = 16 * 2**20  # largest temporary of a slab of the CPU update (see _slabs)

def _padding(h: Tensor) -> tuple[int, ...]:
    return tuple(k // 2 for k in h.shape[2:])


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


def _flat(t: Tensor) -> Tensor:
    """The elements of a NC(D)HW or channels-last tensor as a 1-D view (reductions over a channels-last
    tensor would otherwise copy it to NC(D)HW first); a copy for any other layout."""
    if _is_channels_last(t):
        return t.permute(0, *range(2, t.dim()), 1).reshape(-1)
    return t.reshape(-1)


def _is_fake(t: Tensor) -> bool:
    """Shape-only tensors (FLOP counting under FakeTensorMode) take the plain path: a FLOP count
    measures the algorithm, not the halo rows the CPU slab workaround recomputes."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _slabs(t: Tensor, row_bytes: int):
    """``(i, batch, lo, hi)``: samples ``i:i+batch`` and rows ``lo:hi`` of the first spatial axis of ``t``
    such that a temporary of ``row_bytes`` per row and sample stays below ``_SLAB_BYTES`` (the whole
    batch at once when it fits, else one sample at a time in slabs of rows)."""
    b, n = t.shape[0], t.shape[2]
    batch = b if b * n * row_bytes <= _SLAB_BYTES else 1
    rows = n if batch > 1 else max(1, min(n, _SLAB_BYTES // row_bytes))
    for i in range(0, b, batch):
        for lo in range(0, n, rows):
            yield i, batch, lo, min(n, lo + rows)


def _conv_rows(src: Tensor, weight: Tensor, groups: int, lo: int, hi: int) -> Tensor:
    """Rows ``lo:hi`` (first spatial axis) of ``conv(src, weight)`` with zero "same" padding, reading only
    the rows they need: an inner slab reads its ``k // 2`` halo rows and is convolved without padding
    along that axis, so no row is computed twice."""
    n, pad = src.shape[2], _padding(weight)
    first, last = lo - pad[0], hi + pad[0]
    conv = _CONV[weight.dim() - 2]
    if first >= 0 and last <= n:
        return conv(src.narrow(2, first, last - first), weight, padding=(0, *pad[1:]), groups=groups)
    first, last = max(0, first), min(n, last)  # at the border: padded on every side, extra rows dropped
    return conv(src.narrow(2, first, last - first), weight, padding=pad, groups=groups).narrow(2, lo - first, hi - lo)


def _k_op(s: Tensor, h: Tensor, groups: int) -> Tensor:
    """``K(s)`` for the lean path: as :func:`ndc_forward_op`, except for a depth-wise filter with
    several source channels on a channels-last CPU tensor, where oneDNN's grouped kernel pads the
    ``sc -> 1`` channels of every group to 16 and is slow. There it is a plain depth-wise convolution
    of the ``G * sc`` source channels (oneDNN's fast depth-wise kernel) summed over each group's
    ``sc`` outputs, in slabs (:func:`_slabs`, :func:`_conv_rows`) whose un-summed temporary stays below
    ``_SLAB_BYTES``: small blocks the allocator reuses instead of mapping fresh pages for each. Same
    result up to summation order.
    """
    c, sc, *ks = h.shape
    if c != groups or sc == 1 or not _slab_path(s):
        return ndc_forward_op(s, h, groups)
    b, _, n, *rest = s.shape
    d = len(ks)
    weight = h.reshape(c * sc, 1, *ks)
    out = torch.empty((b, c, n, *rest), dtype=s.dtype, device=s.device, memory_format=_CHANNELS_LAST[d])
    out_last = out.permute(0, *range(2, d + 2), 1)  # (B, *S, C) view of out's memory
    for i, batch, lo, hi in _slabs(s, s[0, :, 0].numel() * s.element_size()):
        y = _conv_rows(s.narrow(0, i, batch), weight, c * sc, lo, hi)
        y = y.permute(0, *range(2, d + 2), 1).unflatten(-1, (c, sc))  # (batch, rows, *S', C, sc)
        o = out_last.narrow(0, i, batch).narrow(1, lo, hi - lo)
        torch.add(y[..., 0], y[..., 1], out=o)  # (sc - 1 adds: faster than a sum over the last axis)
        for j in range(2, sc):
            o.add_(y[..., j])
    return out


def _slab_path(t: Tensor) -> bool:
    """Whether the lean update works in slabs: a real channels-last CPU tensor."""
    return t.device.type == "cpu" and _is_channels_last(t) and not _is_fake(t)


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


def _like_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in the memory layout of ``like`` (NC(D)HW or channels-last); one copy if they differ."""
    d = like.dim() - 2
    if d in _CHANNELS_LAST and like.is_contiguous(memory_format=_CHANNELS_LAST[d]) and not like.is_contiguous():
        return t.contiguous(memory_format=_CHANNELS_LAST[d])
    return t.contiguous()


def _conv_like(inp: Tensor, weight: Tensor, groups: int) -> Tensor:
    return _CONV[weight.dim() - 2](inp, weight, padding=_padding(weight), groups=groups)

