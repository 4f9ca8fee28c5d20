"""Fused Triton kernels of one NDC update for depth-wise filters (the paper's configuration), float32.

Used by :class:`deconver.nn.ndc.NDCUpdate` on CUDA when the filter is depth-wise (``G = C``, one
filter channel per group), every tensor is float32 and Triton is installed; ``DECONVER_NDC_FUSED=0``
turns it off. Same notation as :mod:`deconver.nn.ndc`: input ``x`` ``(B, C, *S)``, pre-activation
projection ``z`` ``(B, C*sc, *S)``, rectified filter ``h`` ``(C, sc, *k)``; 1D and 2D tensors are
treated as 3D with unit leading axes.

Every kernel runs one program per (sample, channel ``c``) and block of voxels, reads the ``sc``
source channels of its group and evaluates the ``k^d`` stencil directly (cuDNN's grouped
convolutions with 1 -> sc channels per group run far below memory bandwidth):

* forward: ``K(s)`` (``_k_kernel``, ReLU of ``z`` folded in), then ``s * (A(x) + eps) / (A(K(s)) + eps)``
  (``_update_kernel``, both adjoints and the quotient in one pass) -- about 20 layer-input-sizes of
  memory traffic instead of the ~76 of the original formulation;
* backward (``x``, ``z``, ``K(s)`` saved): ``_grad_a_kernel`` recomputes ``A(x)`` and ``A(K(s))`` and
  writes ``w = dL/dA(x)`` and ``gd = dL/dA(K(s))`` with their filter-gradient partial sums;
  ``_k_kernel`` gives ``dL/dx = K(w)`` and ``dL/dK(s) = K(gd)``; ``_grad_s_kernel`` recomputes the
  quotient and writes ``dL/dz`` with the last filter-gradient partial sums. Partial sums are stored
  per program and reduced by ``torch.sum`` (deterministic, no atomics).
* filter gradient, two strategies (``DECONVER_NDC_FILTER_GRAD``, :func:`filter_grad_mode`): ``inline``
  (default, the one measured on a GPU) reduces each tap's products across the 512-voxel block inside
  the two kernels above; ``chunked`` leaves them out and runs ``_filter_grad_kernel`` once per term
  (``w``/``x``, ``gd``/``K(s)``, ``s``/``dL/dK(s)``), accumulating the products element-wise over
  8192 voxels per program and reducing once at the end -- fewer cross-thread reductions for three more
  reads of source-sized tensors. Which is faster is for ``benchmarks/ndc.py --lean-variant`` to say.

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

__all__ = ["FILTER_GRAD_MODES", "filter_grad", "filter_grad_mode", "update_backward", "update_forward", "supported"]

_BLOCK = 512  # voxels per program of the stencil kernels
_TILE = 4096  # elements of _filter_grad_kernel's [sc, k^d, voxels] accumulator (about 32 registers per thread)
_CHUNK_VOXELS = 8192  # voxels per program of _filter_grad_kernel
FILTER_GRAD_MODES = ("inline", "chunked")


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
                   RELU: tl.constexpr, NEED_H: tl.constexpr, SC: tl.constexpr, SCP: tl.constexpr,
                   KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    """w = g * s / Dn (dL/dA(x)), gd = -w * Nn / Dn (dL/dA(t)); with NEED_H, this program's part of
    sum_v w[i, v] x[v - (o - pad)] + gd[i, v] t[v - (o - pad)] per (i, o) (the filter gradient
    through both adjoints)."""
    pid_v, bc, c, V, offs, vmask, ii, imask = _program(D, H, W, C, SC, SCP, BLOCK)
    KV: tl.constexpr = KD * KH * KW
    hrow = h_ptr + c * SC * KV + ii * KV
    x_row = x_ptr + bc * V
    t_row = t_ptr + bc * V
    num, den = _adjoints(x_row, t_row, hrow, offs, vmask, imask, D, H, W, SCP, KD, KH, KW, BLOCK)
    idx, mask2 = _source_tile(bc, V, offs, vmask, ii, imask, SC)
    s = tl.load(z_ptr + idx, mask=mask2, other=0.0)
    if RELU:
        s = tl.maximum(s, 0.0)
    g = tl.load(g_ptr + idx, mask=mask2, other=0.0)
    den = den + eps
    w = g * s / den
    gd = -w * ((num + eps) / den)
    tl.store(w_ptr + idx, w, mask=mask2)
    tl.store(gd_ptr + idx, gd, mask=mask2)
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
def _grad_s_kernel(x_ptr, t_ptr, gt_ptr, z_ptr, g_ptr, h_ptr, gz_ptr, part_ptr, eps, D, H, W, C,
                   RELU: tl.constexpr, NEED_Z: tl.constexpr, NEED_H: tl.constexpr, SC: tl.constexpr,
                   SCP: tl.constexpr, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   BLOCK: tl.constexpr):
    """dL/dz = (g * Nn / Dn + A(gt)) * [z > 0 if RELU], gt = dL/dK(s); with NEED_H, this program's
    part of sum_v s[i, v] gt[v - (o - pad)] per (i, o) (the filter gradient through K)."""
    pid_v, bc, c, V, offs, vmask, ii, imask = _program(D, H, W, C, SC, SCP, BLOCK)
    KV: tl.constexpr = KD * KH * KW
    hrow = h_ptr + c * SC * KV + ii * KV
    gt_row = gt_ptr + bc * V
    idx, mask2 = _source_tile(bc, V, offs, vmask, ii, imask, SC)
    z = tl.load(z_ptr + idx, mask=mask2, other=0.0)
    s = z
    if RELU:
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
        num, den = _adjoints(x_ptr + bc * V, t_ptr + bc * V, hrow, offs, vmask, imask, D, H, W, SCP, KD,
                             KH, KW, BLOCK)
        g = tl.load(g_ptr + idx, mask=mask2, other=0.0)
        acc += g * ((num + eps) / (den + eps))
        if RELU:
            acc = tl.where(z > 0.0, acc, 0.0)
        tl.store(gz_ptr + idx, acc, mask=mask2)


@triton.jit
def _filter_grad_kernel(a_ptr, y_ptr, part_ptr, D, H, W, CHUNK, RELU: tl.constexpr, SC: tl.constexpr,
                        SCP: tl.constexpr, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                        KVP: tl.constexpr, BV: tl.constexpr):
    """part[bc, chunk, i, o] = sum over the chunk's voxels v of f(a[b, c*SC + i, v]) * y[b, c, v - (o - pad)]
    (f = relu or identity): every filter tap's product is accumulated element-wise over ``CHUNK`` blocks
    of ``BV`` voxels in a ``[SCP, KVP, BV]`` register tile and reduced across the block once, at the end."""
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
    y_row = y_ptr + bc * V
    acc = tl.zeros([SCP, KVP, BV], dtype=tl.float32)
    for j in range(CHUNK):
        offs = (pid * CHUNK + j) * BV + tl.arange(0, BV)
        vmask = offs < V
        d = offs // hw
        r = offs - d * hw
        yy = r // W
        xx = r - yy * W
        nd = d[None, :] + dd[:, None]
        ny = yy[None, :] + dh[:, None]
        nx = xx[None, :] + dw[:, None]
        inside = (omask[:, None] & vmask[None, :] & (nd >= 0) & (nd < D) & (ny >= 0) & (ny < H)
                  & (nx >= 0) & (nx < W))
        yv = tl.load(y_row + offs[None, :] + shift[:, None], mask=inside, other=0.0)
        av = tl.load(a_rows + offs[None, :], mask=imask[:, None] & vmask[None, :], other=0.0)
        if RELU:
            av = tl.maximum(av, 0.0)
        acc += av[:, None, :] * yv[None, :, :]
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


def filter_grad_mode() -> str:
    """How the fused backward takes the filter gradient: ``DECONVER_NDC_FILTER_GRAD`` = ``inline``
    (default: per-block partial sums inside the stencil kernels, one reduction per tap and block) or
    ``chunked`` (:func:`filter_grad`: a separate kernel per term that reduces once per chunk of voxels)."""
    mode = os.environ.get("DECONVER_NDC_FILTER_GRAD", "inline")
    if mode not in FILTER_GRAD_MODES:
        raise ValueError(f"DECONVER_NDC_FILTER_GRAD={mode!r}: expected one of {', '.join(FILTER_GRAD_MODES)}")
    return mode


def filter_grad(a: Tensor, y: Tensor, h: Tensor, relu: bool) -> Tensor:
    """``sum_b,v f(a[b, c*sc + i, v]) * y[b, c, v - (o - pad)]`` as a ``(C, sc, *k)`` filter gradient,
    f = ReLU or identity: the gradient of ``<A(y), f(a)> = <y, K(f(a))>`` with respect to ``h``."""
    (d, hh, w), (kd, kh, kw), meta = _geometry(y, h)
    volume, kv, scp = d * hh * w, kd * kh * kw, meta["SCP"]
    kvp = triton.next_power_of_2(kv)
    bv = max(16, min(triton.next_power_of_2(volume), _TILE // (scp * kvp)))
    chunk = max(1, min(triton.cdiv(volume, bv), _CHUNK_VOXELS // bv))
    grid = (triton.cdiv(volume, chunk * bv), y.shape[0] * y.shape[1])
    part = y.new_empty((y.shape[0], y.shape[1], grid[0], h.shape[1] * kv))
    _filter_grad_kernel[grid](a, y, part, d, hh, w, chunk, RELU=relu, SC=meta["SC"], SCP=scp, KD=kd, KH=kh,
                              KW=kw, KVP=kvp, BV=bv)
    return part.sum(dim=(0, 2)).view(h.shape)


def update_backward(g: Tensor, x: Tensor, z: Tensor, h: Tensor, t1: Tensor, eps: float, relu_input: bool,
                    need_x: bool, need_z: bool, need_h: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dL/dx, dL/dz, dL/dh)`` of :func:`update_forward`'s first output (``None`` where not
    needed). Work memory: three source-sized buffers (``w``, ``gd``; ``dL/dz`` reuses ``w``'s)."""
    g = g.contiguous()
    (d, hh, ww), _, meta = _geometry(x, h)
    volume = d * hh * ww
    grid = _grid(x, volume, meta["BLOCK"])
    c = x.shape[1]
    kv = meta["KD"] * meta["KH"] * meta["KW"]
    inline = need_h and filter_grad_mode() == "inline"
    part = x.new_empty((x.shape[0], c, grid[0], h.shape[1] * kv)) if inline else x.new_empty(1)
    w = torch.empty_like(z)
    gd = torch.empty_like(z)
    _grad_a_kernel[grid](x, t1, z, g, h, w, gd, part, eps, d, hh, ww, c, RELU=relu_input, NEED_H=inline, **meta)
    gh = None
    if inline:
        gh = part.sum(dim=(0, 2)).view(h.shape)
    elif need_h:
        gh = filter_grad(w, x, h, relu=False).add_(filter_grad(gd, t1, h, relu=False))
    gx = k_apply(w, h, relu=False) if need_x else None
    gt1 = k_apply(gd, h, relu=False)
    del gd
    if need_h and not inline:
        gh.add_(filter_grad(z, gt1, h, relu=relu_input))
    gz = w if need_z else None  # w is no longer needed: dL/dz is written over it
    if need_z or inline:
        _grad_s_kernel[grid](x, t1, gt1, z, g, h, w, part, eps, d, hh, ww, c, RELU=relu_input, NEED_Z=need_z,
                             NEED_H=inline, **meta)
        if inline:
            gh = gh.add_(part.sum(dim=(0, 2)).view(h.shape))
    return gx, gz, gh
