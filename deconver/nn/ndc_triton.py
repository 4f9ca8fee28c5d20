"""Fused Triton kernels of one NDC update for depth-wise filters (the paper's configuration), float32.

Used by :class:`deconver.nn.ndc_update.NDCUpdate` on CUDA for depth-wise filters (``G = C``), float32, with
Triton installed (``DECONVER_NDC_FUSED=0``: off). Notation of :mod:`deconver.nn.ndc`: ``x`` ``(B, C, *S)``,
pre-activation ``z`` ``(B, C*sc, *S)``, filter ``h`` ``(C, sc, *k)``; 1D/2D run as 3D with unit axes.
Every kernel runs one program per (sample, channel ``c``) and block of voxels, reads the group's ``sc``
source channels and evaluates the ``k^d`` stencil directly (cuDNN's grouped convolutions with
1 -> sc channels per group run far below memory bandwidth):

* forward: ``K(s)`` (``_k_kernel``, ReLU folded in), then ``s * (A(x) + eps) / (A(K(s)) + eps)``
  (``_update_kernel``, both adjoints and the quotient in one pass): ~20 layer-input-sizes of traffic
  (the original formulation: ~76);
* backward (``x``, ``K(s)`` and ``z`` -- or, when ``x >= 0``, the output ``out = s * R``, from which
  ``s / Dn = out / Nn`` and ``s = out / R`` -- saved), two strategies (``DECONVER_NDC_BACKWARD``,
  :func:`backward_mode`). ``inline`` (default, the one timed on a GPU): ``_grad_a_kernel`` recomputes
  ``A(x)`` and ``A(K(s))`` and writes ``w = dL/dA(x)`` and ``gd = dL/dA(K(s))``; ``_k_kernel`` gives
  ``dL/dx = K(w)`` and ``dL/dK(s) = K(gd)``; ``_grad_s_kernel`` recomputes the quotient and writes
  ``dL/dz``; filter-gradient partial sums are reduced across the 512-voxel block for every tap inside
  the first and last kernel, stored per program and summed by ``torch.sum`` (deterministic, no
  atomics). ``split``: ``_grad_a_kernel`` stores ``R = Nn / Dn`` instead of ``gd = -w * R``;
  ``_k_pair_kernel`` gives ``K(w)`` and ``K(-w * R)`` in one pass; ``_grad_s_kernel`` reads ``R``; the
  filter gradient is left to ``_filter_grad_kernel`` (the two adjoint terms in one pass, the ``K`` term
  in another), which accumulates every tap's products element-wise over 8192 voxels per program and
  reduces once: eight stencil passes instead of ten, no barrier per tap, no kernel at the 255-register
  cap (``benchmarks/ndc_kernels.py`` gives the compiled counts; ``benchmarks/ndc.py --lean-variant
  split:DECONVER_NDC_BACKWARD=split`` times them).

Exactness: float32 throughout with per-voxel sums in a fixed order (no TF32); tested against the
float64 reference under ``TRITON_INTERPRET=1`` on the CPU (tests/test_ndc_triton.py).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["BACKWARD_MODES", "backward_mode", "filter_grad", "update_backward", "update_forward", "supported"]

_BLOCK = 512  # voxels per program of the stencil kernels
_K_PAIR_BLOCK = 128  # voxels per program of _k_pair_kernel (512 spills registers to local memory on sm_90)
_TILE = 4096  # elements of _filter_grad_kernel's [sc, k^d, voxels] accumulator (about 32 registers per thread)
_CHUNK_VOXELS = 8192  # voxels per program of _filter_grad_kernel
BACKWARD_MODES = ("inline", "split")


def supported(x: Tensor, z: Tensor, h: Tensor, groups: int) -> bool:
    """Whether the fused kernels apply: depth-wise filter, float32, at most 3 spatial dimensions, and
    batch x channels within CUDA's second grid dimension."""
    return (
        h.shape[0] == groups
        and x.shape[0] * x.shape[1] <= 65535
        and x.dim() - 2 in (1, 2, 3)
        and x.dtype == z.dtype == h.dtype == torch.float32
        and z.shape[1] == h.shape[0] * h.shape[1]
    )


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _neighbour(offs, vmask, D, H, W, dd: tl.constexpr, dh: tl.constexpr, dw: tl.constexpr):
    """Flat index of the voxel at (d + dd, h + dh, w + dw) and whether it lies inside the volume."""
    hw = H * W
    d = offs // hw
    r = offs - d * hw
    y = r // W
    x = r - y * W
    nd = d + dd
    ny = y + dh
    nx = x + dw
    inside = vmask & (nd >= 0) & (nd < D) & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
    return offs + dd * hw + dh * W + dw, inside


@triton.jit
def _program(D, H, W, C, SC: tl.constexpr, SCP: tl.constexpr, BLOCK: tl.constexpr):
    """This program's voxel block, row ``bc = b * C + c`` and channel ``c``, the volume ``V``, the
    voxel offsets and their mask, the source channels ``ii`` of the group and their mask."""
    pid_v = tl.program_id(0)
    bc = tl.program_id(1).to(tl.int64)
    V = D * H * W
    offs = pid_v * BLOCK + tl.arange(0, BLOCK)
    ii = tl.arange(0, SCP)
    return pid_v, bc, bc % C, V, offs, offs < V, ii, ii < SC


@triton.jit
def _source_tile(bc, V, offs, vmask, ii, imask, SC: tl.constexpr):
    """Flat index and mask of this program's ``[SCP, BLOCK]`` tile of a source-sized tensor."""
    return bc * SC * V + ii[:, None].to(tl.int64) * V + offs[None, :], imask[:, None] & vmask[None, :]


@triton.jit
def _k_kernel(src_ptr, h_ptr, out_ptr, D, H, W, C, RELU: tl.constexpr, SC: tl.constexpr,
              SCP: tl.constexpr, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
              BLOCK: tl.constexpr):
    """out[b, c] = sum_i sum_o h[c, i, o] * f(src[b, c*SC + i])[v + o - pad], f = relu or identity."""
    pid_v, bc, c, V, offs, vmask, ii, imask = _program(D, H, W, C, SC, SCP, BLOCK)
    src = src_ptr + bc * SC * V + ii[:, None].to(tl.int64) * V
    hrow = h_ptr + c * SC * (KD * KH * KW) + ii * (KD * KH * KW)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for kd in tl.static_range(KD):
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                nb, inside = _neighbour(offs, vmask, D, H, W, kd - KD // 2, kh - KH // 2, kw - KW // 2)
                vals = tl.load(src + nb[None, :], mask=imask[:, None] & inside[None, :], other=0.0)
                if RELU:
                    vals = tl.maximum(vals, 0.0)
                hv = tl.load(hrow + (kd * KH + kh) * KW + kw, mask=imask, other=0.0)
                acc += tl.sum(vals * hv[:, None], axis=0)
    tl.store(out_ptr + bc * V + offs, acc, mask=vmask)


@triton.jit
def _k_pair_kernel(w_ptr, r_ptr, h_ptr, gx_ptr, gt_ptr, D, H, W, C, NEED_X: tl.constexpr, SC: tl.constexpr,
                   SCP: tl.constexpr, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   BLOCK: tl.constexpr):
    """gx = K(w) (with NEED_X) and gt = K(-w * r) in one pass over the stencil (the backward's dL/dx
    and dL/dK(s) from w = dL/dA(x) and R = Nn / Dn)."""
    pid_v, bc, c, V, offs, vmask, ii, imask = _program(D, H, W, C, SC, SCP, BLOCK)
    w_src = w_ptr + bc * SC * V + ii[:, None].to(tl.int64) * V
    r_src = r_ptr + bc * SC * V + ii[:, None].to(tl.int64) * V
    hrow = h_ptr + c * SC * (KD * KH * KW) + ii * (KD * KH * KW)
    acc_x = tl.zeros([BLOCK], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK], dtype=tl.float32)
    for kd in tl.static_range(KD):
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                nb, inside = _neighbour(offs, vmask, D, H, W, kd - KD // 2, kh - KH // 2, kw - KW // 2)
                m = imask[:, None] & inside[None, :]
                hw_ = tl.load(hrow + (kd * KH + kh) * KW + kw, mask=imask, other=0.0)[:, None] * tl.load(
                    w_src + nb[None, :], mask=m, other=0.0)
                if NEED_X:
                    acc_x += tl.sum(hw_, axis=0)
                acc_t -= tl.sum(hw_ * tl.load(r_src + nb[None, :], mask=m, other=0.0), axis=0)
    if NEED_X:
        tl.store(gx_ptr + bc * V + offs, acc_x, mask=vmask)
    tl.store(gt_ptr + bc * V + offs, acc_t, mask=vmask)


@triton.jit
def _adjoints(x_row, t_row, hrow, offs, vmask, imask, D, H, W, SCP: tl.constexpr, KD: tl.constexpr,
              KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    """A(x) and A(t) for the SC source channels of one group: sum_o h[c, i, o] * y[v - (o - pad)]."""
    num = tl.zeros([SCP, BLOCK], dtype=tl.float32)
    den = tl.zeros([SCP, BLOCK], dtype=tl.float32)
    for kd in tl.static_range(KD):
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                nb, inside = _neighbour(offs, vmask, D, H, W, KD // 2 - kd, KH // 2 - kh, KW // 2 - kw)
                hv = tl.load(hrow + (kd * KH + kh) * KW + kw, mask=imask, other=0.0)[:, None]
                num += hv * tl.load(x_row + nb, mask=inside, other=0.0)[None, :]
                den += hv * tl.load(t_row + nb, mask=inside, other=0.0)[None, :]
    return num, den


@triton.jit
def _update_kernel(x_ptr, t_ptr, z_ptr, h_ptr, out_ptr, eps, D, H, W, C, RELU: tl.constexpr,
                   SC: tl.constexpr, SCP: tl.constexpr, KD: tl.constexpr, KH: tl.constexpr,
                   KW: tl.constexpr, BLOCK: tl.constexpr):
    """out = s * (A(x) + eps) / (A(t) + eps), s = relu(z) or z, t = K(s)."""
    pid_v, bc, c, V, offs, vmask, ii, imask = _program(D, H, W, C, SC, SCP, BLOCK)
    hrow = h_ptr + c * SC * (KD * KH * KW) + ii * (KD * KH * KW)
    num, den = _adjoints(x_ptr + bc * V, t_ptr + bc * V, hrow, offs, vmask, imask, D, H, W, SCP, KD, KH,
                         KW, BLOCK)
    idx, mask2 = _source_tile(bc, V, offs, vmask, ii, imask, SC)
    s = tl.load(z_ptr + idx, mask=mask2, other=0.0)
    if RELU:
        s = tl.maximum(s, 0.0)
    tl.store(out_ptr + idx, s * (num + eps) / (den + eps), mask=mask2)


@triton.jit
def _grad_a_kernel(x_ptr, t_ptr, z_ptr, g_ptr, h_ptr, w_ptr, gd_ptr, part_ptr, eps, D, H, W, C,
                   RELU: tl.constexpr, NEED_H: tl.constexpr, STORE_R: tl.constexpr, FROM_OUT: tl.constexpr,
                   SC: tl.constexpr, SCP: tl.constexpr, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   BLOCK: tl.constexpr):
    """w = g * s / Dn (dL/dA(x)) and gd = -w * R (dL/dA(t)), R = Nn / Dn; with STORE_R, R instead of
    gd. With FROM_OUT, ``z_ptr`` holds the update's output ``out = s * R`` and ``w = g * out / Nn``.
    With NEED_H, this program's part of sum_v w[i, v] x[v - (o - pad)] + gd[i, v] t[v - (o - pad)]
    per (i, o) (the filter gradient through both adjoints)."""
    pid_v, bc, c, V, offs, vmask, ii, imask = _program(D, H, W, C, SC, SCP, BLOCK)
    KV: tl.constexpr = KD * KH * KW
    hrow = h_ptr + c * SC * KV + ii * KV
    x_row = x_ptr + bc * V
    t_row = t_ptr + bc * V
    num, den = _adjoints(x_row, t_row, hrow, offs, vmask, imask, D, H, W, SCP, KD, KH, KW, BLOCK)
    idx, mask2 = _source_tile(bc, V, offs, vmask, ii, imask, SC)
    s = tl.load(z_ptr + idx, mask=mask2, other=0.0)
    if RELU and not FROM_OUT:
        s = tl.maximum(s, 0.0)
    g = tl.load(g_ptr + idx, mask=mask2, other=0.0)
    den = den + eps
    if FROM_OUT:
        w = g * s / (num + eps)  # s / Dn = out / Nn
    else:
        w = g * s / den
    r = (num + eps) / den
    gd = -w * r
    tl.store(w_ptr + idx, w, mask=mask2)
    tl.store(gd_ptr + idx, r if STORE_R else gd, mask=mask2)
    if NEED_H:
        part = part_ptr + (bc * tl.num_programs(0) + pid_v) * SC * KV + ii * KV
        for kd in tl.static_range(KD):
            for kh in tl.static_range(KH):
                for kw in tl.static_range(KW):
                    nb, inside = _neighbour(offs, vmask, D, H, W, KD // 2 - kd, KH // 2 - kh, KW // 2 - kw)
                    xv = tl.load(x_row + nb, mask=inside, other=0.0)[None, :]
                    tv = tl.load(t_row + nb, mask=inside, other=0.0)[None, :]
                    tl.store(part + (kd * KH + kh) * KW + kw, tl.sum(w * xv + gd * tv, axis=1), mask=imask)


@triton.jit
def _grad_s_kernel(x_ptr, t_ptr, r_ptr, gt_ptr, z_ptr, g_ptr, h_ptr, gz_ptr, part_ptr, eps, D, H, W, C,
                   RELU: tl.constexpr, NEED_Z: tl.constexpr, NEED_H: tl.constexpr, R_SAVED: tl.constexpr,
                   FROM_OUT: tl.constexpr, SC: tl.constexpr, SCP: tl.constexpr, KD: tl.constexpr,
                   KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    """dL/dz = (g * R + A(gt)) * [z > 0 if RELU], gt = dL/dK(s), R = Nn / Dn (read from ``r_ptr`` with
    R_SAVED, else recomputed from x and t); with NEED_H, this program's part of
    sum_v s[i, v] gt[v - (o - pad)] per (i, o) (the filter gradient through K). With FROM_OUT, ``z_ptr``
    holds the output ``out = s * R``: ``s = out / R`` and ReLU's mask is ``out > 0``."""
    pid_v, bc, c, V, offs, vmask, ii, imask = _program(D, H, W, C, SC, SCP, BLOCK)
    KV: tl.constexpr = KD * KH * KW
    hrow = h_ptr + c * SC * KV + ii * KV
    gt_row = gt_ptr + bc * V
    idx, mask2 = _source_tile(bc, V, offs, vmask, ii, imask, SC)
    z = tl.load(z_ptr + idx, mask=mask2, other=0.0)
    s = z
    if FROM_OUT:  # R first: s = out / R
        if R_SAVED:
            r = tl.load(r_ptr + idx, mask=mask2, other=1.0)
        else:
            num, den = _adjoints(x_ptr + bc * V, t_ptr + bc * V, hrow, offs, vmask, imask, D, H, W, SCP, KD,
                                 KH, KW, BLOCK)
            r = (num + eps) / (den + eps)
        s = z / r
    elif RELU:
        s = tl.maximum(z, 0.0)
    acc = tl.zeros([SCP, BLOCK], dtype=tl.float32)
    part = part_ptr + (bc * tl.num_programs(0) + pid_v) * SC * KV + ii * KV
    for kd in tl.static_range(KD):
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                nb, inside = _neighbour(offs, vmask, D, H, W, KD // 2 - kd, KH // 2 - kh, KW // 2 - kw)
                gv = tl.load(gt_row + nb, mask=inside, other=0.0)[None, :]
                if NEED_Z:
                    hv = tl.load(hrow + (kd * KH + kh) * KW + kw, mask=imask, other=0.0)[:, None]
                    acc += hv * gv
                if NEED_H:
                    tl.store(part + (kd * KH + kh) * KW + kw, tl.sum(s * gv, axis=1), mask=imask)
    if NEED_Z:
        if not FROM_OUT:
            if R_SAVED:
                r = tl.load(r_ptr + idx, mask=mask2, other=0.0)
            else:
                num, den = _adjoints(x_ptr + bc * V, t_ptr + bc * V, hrow, offs, vmask, imask, D, H, W, SCP, KD,
                                     KH, KW, BLOCK)
                r = (num + eps) / (den + eps)
        g = tl.load(g_ptr + idx, mask=mask2, other=0.0)
        acc += g * r
        if RELU:
            acc = tl.where(z > 0.0, acc, 0.0)
        tl.store(gz_ptr + idx, acc, mask=mask2)


@triton.jit
def _filter_grad_kernel(a_ptr, b_ptr, y_ptr, y2_ptr, part_ptr, D, H, W, ROWS, RELU: tl.constexpr,
                        PAIR: tl.constexpr, DIV: tl.constexpr, SC: tl.constexpr, SCP: tl.constexpr,
                        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, KVP: tl.constexpr,
                        BV: tl.constexpr):
    """part[bc, chunk, i, o] = sum over the chunk's voxels v of f(a[i, v]) * y[v - (o - pad)] (f = relu,
    identity or, with DIV, division by b[i, v]), with PAIR minus a[i, v] b[i, v] y2[v - (o - pad)]
    (PAIR and DIV exclusive; source rows ``b * C * SC + c * SC + i``,
    channel rows ``b * C + c``). A program's chunk is ``ROWS`` rows of the contiguous axis, walked in
    blocks of ``BV`` voxels (no block crosses a row: the taps' depth/height bounds are checked once per
    row, and no integer division runs in the loops); every tap's product is accumulated element-wise
    in a ``[SCP, KVP, BV]`` register tile and reduced once, at the end."""
    KV: tl.constexpr = KD * KH * KW
    pid = tl.program_id(0)
    bc = tl.program_id(1).to(tl.int64)
    hw = H * W
    V = D * hw
    ii = tl.arange(0, SCP)
    imask = ii < SC
    oo = tl.arange(0, KVP)
    omask = oo < KV
    dd = KD // 2 - oo // (KH * KW)  # the tap's neighbour offset, as in _adjoints
    dh = KH // 2 - (oo // KW) % KH
    dw = KW // 2 - oo % KW
    shift = dd * hw + dh * W + dw
    a_rows = a_ptr + bc * SC * V + ii[:, None].to(tl.int64) * V
    b_rows = b_ptr + bc * SC * V + ii[:, None].to(tl.int64) * V
    y_row = y_ptr + bc * V
    y2_row = y2_ptr + bc * V
    acc = tl.zeros([SCP, KVP, BV], dtype=tl.float32)
    row = pid * ROWS
    d = row // H
    yy = row - d * H
    for _ in range(ROWS):
        tap_ok = omask & (d + dd >= 0) & (d + dd < D) & (yy + dh >= 0) & (yy + dh < H) & (row < D * H)
        for x0 in range(0, W, BV):
            xs = x0 + tl.arange(0, BV)
            vmask = (xs < W) & (row < D * H)
            offs = row * W + xs
            nx = xs[None, :] + dw[:, None]
            inside = tap_ok[:, None] & (xs < W)[None, :] & (nx >= 0) & (nx < W)
            nb = offs[None, :] + shift[:, None]
            amask = imask[:, None] & vmask[None, :]
            av = tl.load(a_rows + offs[None, :], mask=amask, other=0.0)
            if RELU:
                av = tl.maximum(av, 0.0)
            if DIV:
                av = av / tl.load(b_rows + offs[None, :], mask=amask, other=1.0)
            acc += av[:, None, :] * tl.load(y_row + nb, mask=inside, other=0.0)[None, :, :]
            if PAIR:
                ab = av * tl.load(b_rows + offs[None, :], mask=amask, other=0.0)
                acc -= ab[:, None, :] * tl.load(y2_row + nb, mask=inside, other=0.0)[None, :, :]
        row += 1
        wrap = (yy == H - 1).to(tl.int32)  # the next row starts the next depth slice
        d += wrap
        yy = (yy + 1) * (1 - wrap)
    part = part_ptr + (bc * tl.num_programs(0) + pid) * SC * KV
    tl.store(part + ii[:, None] * KV + oo[None, :], tl.sum(acc, axis=2), mask=imask[:, None] & omask[None, :])


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def _geometry(x: Tensor, h: Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int], dict]:
    """(D, H, W) and (KD, KH, KW) with unit leading axes for 1D/2D, and the common launch constants."""
    spatial = (1,) * (5 - x.dim()) + tuple(x.shape[2:])
    kernel = (1,) * (5 - h.dim()) + tuple(h.shape[2:])
    volume = math.prod(spatial)
    block = max(16, min(_BLOCK, triton.next_power_of_2(volume)))
    sc = h.shape[1]
    meta = dict(SC=sc, SCP=triton.next_power_of_2(sc), KD=kernel[0], KH=kernel[1], KW=kernel[2], BLOCK=block)
    return spatial, kernel, meta


def _grid(x: Tensor, volume: int, block: int) -> tuple[int, int]:
    return (triton.cdiv(volume, block), x.shape[0] * x.shape[1])


def k_apply(src: Tensor, h: Tensor, relu: bool) -> Tensor:
    """``K(f(src))`` for a depth-wise filter (f = ReLU or identity): ``(B, C*sc, *S) -> (B, C, *S)``."""
    src = src.contiguous()
    b, c = src.shape[0], h.shape[0]
    out = torch.empty((b, c, *src.shape[2:]), dtype=src.dtype, device=src.device)
    (d, hh, w), _, meta = _geometry(out, h)
    _k_kernel[_grid(out, d * hh * w, meta["BLOCK"])](src, h, out, d, hh, w, c, RELU=relu, **meta)
    return out


def update_forward(x: Tensor, z: Tensor, h: Tensor, eps: float, relu_input: bool) -> tuple[Tensor, Tensor]:
    """``(s * (A(x) + eps) / (A(K(s)) + eps), K(s))`` with ``s = relu(z)`` (or ``z``); contiguous inputs."""
    t1 = k_apply(z, h, relu_input)
    out = torch.empty_like(z)
    (d, hh, w), _, meta = _geometry(x, h)
    _update_kernel[_grid(x, d * hh * w, meta["BLOCK"])](x, t1, z, h, out, eps, d, hh, w, x.shape[1],
                                                        RELU=relu_input, **meta)
    return out, t1


def backward_mode() -> str:
    """The fused backward's strategy, ``DECONVER_NDC_BACKWARD``: ``inline`` (default) or ``split``
    (see the module docstring); anything else is an error naming the variable and the choices."""
    mode = os.environ.get("DECONVER_NDC_BACKWARD", "inline")
    if mode not in BACKWARD_MODES:
        raise ValueError(f"DECONVER_NDC_BACKWARD={mode!r}: expected one of {', '.join(BACKWARD_MODES)}")
    return mode


def filter_grad_launch(y: Tensor, h: Tensor) -> dict:
    """Launch configuration of ``_filter_grad_kernel`` for channel-sized ``y`` and filter ``h``: its
    constants (``meta``), rows per program (``rows``), ``grid``, ``num_warps`` and the 3D ``spatial`` size."""
    (d, hh, w), (kd, kh, kw), meta = _geometry(y, h)
    scp, kvp = meta["SCP"], triton.next_power_of_2(kd * kh * kw)
    bv = max(16, min(triton.next_power_of_2(w), _TILE // (scp * kvp)))
    rows = max(1, min(d * hh, _CHUNK_VOXELS // (triton.cdiv(w, bv) * bv)))
    return dict(meta=dict(SC=meta["SC"], SCP=scp, KD=kd, KH=kh, KW=kw, KVP=kvp, BV=bv), rows=rows,
                grid=(triton.cdiv(d * hh, rows), y.shape[0] * y.shape[1]), num_warps=4, spatial=(d, hh, w))


def filter_grad(a: Tensor, y: Tensor, h: Tensor, relu: bool, b: Tensor | None = None,
                y2: Tensor | None = None, div: Tensor | None = None) -> Tensor:
    """``sum_b,v f(a[b, c*sc + i, v]) * y[b, c, v - (o - pad)]`` as a ``(C, sc, *k)`` filter gradient
    (f = ReLU, identity or, with ``div``, ``a / div``): the gradient of ``<A(y), f(a)>`` w.r.t. ``h``;
    with ``b`` and ``y2``, minus the same sum of ``a * b`` and ``y2`` (both adjoints' terms in one pass)."""
    launch = filter_grad_launch(y, h)
    grid, meta, (d, hh, w) = launch["grid"], launch["meta"], launch["spatial"]
    part = y.new_empty((y.shape[0], y.shape[1], grid[0], h.shape[1] * meta["KD"] * meta["KH"] * meta["KW"]))
    pair = b is not None
    other = b if pair else div if div is not None else a  # (a pair and div exclude each other)
    _filter_grad_kernel[grid](a, other, y, y2 if pair else y, part, d, hh, w, launch["rows"], RELU=relu,
                              PAIR=pair, DIV=div is not None, num_warps=launch["num_warps"], **meta)
    return part.sum(dim=(0, 2)).view(h.shape)


def update_backward(g: Tensor, x: Tensor, z: Tensor, h: Tensor, t1: Tensor, eps: float, relu_input: bool,
                    need_x: bool, need_z: bool, need_h: bool, from_output: bool = False,
                    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dL/dx, dL/dz, dL/dh)`` of :func:`update_forward` (``None`` where not needed) by the
    :func:`backward_mode` strategy; ``z`` is the projection or, ``from_output`` (needs ``x >= 0``,
    ``eps > 0``), the output. Work memory: two source-sized buffers, ``dL/dz`` written over the first."""
    g = g.contiguous()
    (d, hh, ww), _, meta = _geometry(x, h)
    grid = _grid(x, d * hh * ww, meta["BLOCK"])
    c = x.shape[1]
    kv = meta["KD"] * meta["KH"] * meta["KW"]
    split = backward_mode() == "split"
    inline = need_h and not split
    part = x.new_empty((x.shape[0], c, grid[0], h.shape[1] * kv)) if inline else x.new_empty(1)
    w = torch.empty_like(z)
    gd = torch.empty_like(z)  # split: R = N / D
    _grad_a_kernel[grid](x, t1, z, g, h, w, gd, part, eps, d, hh, ww, c, RELU=relu_input, NEED_H=inline,
                         STORE_R=split, FROM_OUT=from_output, **meta)
    gx = gh = None
    if split:
        r = gd
        gt1 = torch.empty_like(x)
        gx = torch.empty_like(x) if need_x else gt1
        _k_pair_kernel[_grid(x, d * hh * ww, _K_PAIR_BLOCK)](w, r, h, gx, gt1, d, hh, ww, c, NEED_X=need_x,
                                                             **dict(meta, BLOCK=_K_PAIR_BLOCK))
        gx = gx if need_x else None
        if need_h:
            k_term = (filter_grad(z, gt1, h, relu=False, div=r) if from_output
                      else filter_grad(z, gt1, h, relu=relu_input))
            gh = filter_grad(w, x, h, relu=False, b=r, y2=t1).add_(k_term)
        if need_z:  # dL/dz over w's buffer
            _grad_s_kernel[grid](x, t1, r, gt1, z, g, h, w, part, eps, d, hh, ww, c, RELU=relu_input, NEED_Z=True,
                                 NEED_H=False, R_SAVED=True, FROM_OUT=from_output, **meta)
        return gx, (w if need_z else None), gh
    if inline:
        gh = part.sum(dim=(0, 2)).view(h.shape)
    gx = k_apply(w, h, relu=False) if need_x else None
    gt1 = k_apply(gd, h, relu=False)
    del gd
    gz = w if need_z else None  # w is no longer needed: dL/dz is written over it
    if need_z or inline:
        _grad_s_kernel[grid](x, t1, x, gt1, z, g, h, w, part, eps, d, hh, ww, c, RELU=relu_input, NEED_Z=need_z,
                             NEED_H=inline, R_SAVED=False, FROM_OUT=from_output, **meta)
        if inline:
            gh = gh.add_(part.sum(dim=(0, 2)).view(h.shape))
    return gx, gz, gh
