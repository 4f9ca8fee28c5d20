"""Native CPU kernels of Deconver's training step (``csrc/ndc_cpu.cpp``).

Three families: the depth-wise NDC update, the channels-last instance norm and the 1x1 convolutions'
weight gradient.

The CPU counterpart of :mod:`deconver.nn.ndc_triton`. On channels-last float32 CPU tensors, for a
depth-wise layer (``G = C``) with ``sc`` in 1, 2, 4 or 8 and ``C`` a multiple of 8 (:func:`supported`),
:class:`~deconver.nn.ndc_update.NDCUpdate` evaluates the stencils ``K`` and ``A`` directly instead of as
oneDNN grouped convolutions: ``K(s)`` sums its ``sc`` source channels in
registers, both adjoints of the update are computed in one pass with the update's element-wise
arithmetic (``A(x)`` and ``A(K(s))`` never exist as tensors), and the backward's ratios, ``dL/dz`` and
the three filter gradients are single passes too. Same mathematics as the convolution path, up to
summation order (tests/test_ndc_cpu.py checks every kernel against float64). Two more kernel families
serve the blocks, which train channels-last on the CPU (:func:`deconver.nn.pointwise.training_layout`):
:func:`instance_norm` and its backward (used by :mod:`deconver.nn.norm`), and :func:`weight_grad`, the
reduction over voxels that gives a 1x1 convolution's weight and bias gradients (register tiles of
8 x 48 products over L2-sized blocks of voxels: about twice MKL's SGEMM on one AMD EPYC core, where
MKL takes its AVX2 code path; docs/nn.md).

The source is compiled on first use with the system's C++ compiler (``$CXX``, default ``g++``;
``-O3 -march=native``, C++20) into ``$DECONVER_KERNEL_CACHE`` (default ``~/.cache/deconver``), under a
name that hashes the source, the flags, the compiler's version and this CPU's instruction-set flags,
and is then reused by every process (the file is written atomically). Nothing is downloaded. Not
``torch.utils.cpp_extension``: the kernels use no PyTorch header (a 3 s build instead of a full
extension's), are called through ``ctypes`` on tensors' data pointers, and a ``-march=native`` build must
be keyed by the CPU it was built for (a cluster's shared home serves nodes of several kinds). Without a
compiler, or where the build fails, a warning names the reason once and the convolution path runs.
``DECONVER_NDC_FUSED=0`` turns all these kernels off (the Triton ones too): the NDC then runs on
convolutions, the norm on PyTorch's operations, the weight gradients in BLAS.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from deconver.nn.ndc_ops import _CHANNELS_LAST, _is_channels_last

__all__ = ["available", "cache_dir", "filter_grad", "grad_z", "instance_norm", "instance_norm_backward", "k_op",
           "norm_supported", "ratios", "supported", "update", "weight_grad", "weight_grad_supported"]

SOURCE = Path(__file__).with_name("csrc") / "ndc_cpu.cpp"
FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-pthread")
_i64p, _f32p = ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p
_SIGNATURES = {
    "ndc_supports": (ctypes.c_int, ctypes.c_int64),
    "ndc_k": (ctypes.c_int, _i64p, _f32p, _f32p, _f32p, ctypes.c_float, ctypes.c_int),
    "ndc_update": (ctypes.c_int, _i64p, _f32p, _f32p, _f32p, _f32p, _f32p, ctypes.c_float, ctypes.c_int),
    "ndc_ratios": (ctypes.c_int, _i64p, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p, ctypes.c_float,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int),
    "ndc_grad_z": (ctypes.c_int, _i64p, _f32p, _f32p, _f32p, _f32p, _f32p, ctypes.c_int, ctypes.c_int),
    "ndc_filter_grad": (ctypes.c_int, _i64p, _f32p, _f32p, _f32p, ctypes.c_int),
    "instance_norm_forward": (_i64p, _f32p, _f32p, _f32p, _f32p, ctypes.c_float, ctypes.c_int),
    "instance_norm_backward": (_i64p, _f32p, _f32p, _f32p, _f32p, _f32p, ctypes.c_int),
    "weight_grad_supports": (ctypes.c_int64, ctypes.c_int64),
    "weight_grad": (ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _f32p, _f32p, _f32p, _f32p, ctypes.c_int),
}


def _cpu_flags() -> str:
    """This CPU's instruction-set flags (``-march=native`` builds for them), or '' where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def cache_dir() -> Path:
    """Where the compiled kernels live: ``$DECONVER_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/deconver``, else
    ``~/.cache/deconver``."""
    if os.environ.get("DECONVER_KERNEL_CACHE"):
        return Path(os.environ["DECONVER_KERNEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deconver"


def _build() -> Path:
    """The compiled library, built now if this source, compiler and CPU have none yet."""
    cxx = os.environ.get("CXX", "g++")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_flags()]).encode()).hexdigest()[:16]
    folder = cache_dir()
    lib = folder / f"ndc_cpu-{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=lib.stem, suffix=".so.tmp", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {SOURCE}:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)  # atomic: a concurrent process sees the old state or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels, or None (with one warning saying why) where they cannot be built."""
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"NDC native CPU kernels unavailable, using the convolution path: {err}", RuntimeWarning,
                      stacklevel=3)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernels are turned on (``DECONVER_NDC_FUSED`` is not ``0``) and built."""
    return os.environ.get("DECONVER_NDC_FUSED", "1") != "0" and _library() is not None


def supported(x: Tensor, s: Tensor, h: Tensor, groups: int) -> bool:
    """Whether the kernels take this update: CPU float32 (``x`` too), 2D/3D, ``s`` channels-last, a
    depth-wise filter whose ``sc`` and ``C`` the library has kernels for (``ndc_supports``: ``sc`` in 1,
    2, 4, 8 and ``C`` a multiple of 8), kernels built. The caller gives ``x`` (and every other operand)
    in ``s``'s layout."""
    c, sc = h.shape[:2]
    return (s.device.type == "cpu" and s.dtype == x.dtype == h.dtype == torch.float32 and _is_channels_last(s)
            and c == groups and available() and _library().ndc_supports(sc, c) == 1)


def _geometry(t: Tensor, h: Tensor) -> ctypes.Array:
    """``(N, D, H, W, C, kd, kh, kw)`` of a channels-last input ``t`` (C channels) and filter ``h``."""
    n, _, *spatial = t.shape
    ks = list(h.shape[2:])
    if len(spatial) == 2:
        spatial, ks = [1, *spatial], [1, *ks]
    return (ctypes.c_int64 * 8)(n, *spatial, h.shape[0], *ks)


def _taps_table(h: Tensor) -> Tensor:
    """The filter ``h`` ``(C, sc, *k)`` as ``K``'s table ``(taps, C*sc)``."""
    return h.reshape(h.shape[0] * h.shape[1], -1).t().contiguous()


def _adjoint_table(wa: Tensor, h: Tensor) -> Tensor:
    """The adjoint weight ``wa`` ``(C*sc, 1, *k)`` as the adjoint's table by source ``(taps, sc, C)``."""
    c, sc = h.shape[:2]
    return wa.reshape(c, sc, -1).permute(2, 1, 0).contiguous()


def _new(like: Tensor, channels: int) -> Tensor:
    shape = (like.shape[0], channels, *like.shape[2:])
    return torch.empty(shape, dtype=like.dtype, memory_format=_CHANNELS_LAST[like.dim() - 2])


def _call(name: str, sc: int | None, geometry: ctypes.Array, *args) -> None:
    """Run kernel ``name`` on ``args`` (tensors by pointer; ``sc`` first where given, the thread count
    last) after checking that every tensor is a CPU float32 one the kernel can read as it assumes:
    images channels-last with the geometry's batch, spatial size and ``C`` or ``C*sc`` channels, tables
    contiguous (a wrong one would be read as garbage, not refused)."""
    n, d, hh, w, c = geometry[:5]
    channels = (c, c * (1 if sc is None else sc))
    for i, a in enumerate(args):
        if not isinstance(a, Tensor):
            continue
        if a.dim() >= 4:
            ok = (a.dim() - 2 in _CHANNELS_LAST and a.is_contiguous(memory_format=_CHANNELS_LAST[a.dim() - 2])
                  and a.shape[0] == n and a.shape[1] in channels and tuple(a.shape[2:]) == (d, hh, w)[-(a.dim() - 2):])
        else:
            ok = a.is_contiguous()
        if not (ok and a.dtype == torch.float32 and a.device.type == "cpu"):
            raise ValueError(f"{name}: operand {i} (shape {tuple(a.shape)}, {a.dtype}, strides {a.stride()}) is "
                             f"not a float32 CPU tensor laid out as the kernel reads it")
    ptrs = [a.data_ptr() if isinstance(a, Tensor) else a for a in args]
    head = () if sc is None else (sc,)
    if getattr(_library(), name)(*head, geometry, *ptrs, torch.get_num_threads()) != 0:
        raise RuntimeError(f"{name}: no kernel for sc={sc}")


def k_op(s: Tensor, h: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * K(s)``: ``(B, C*sc, *S) -> (B, C, *S)``, channels-last."""
    out = _new(s, h.shape[0])
    _call("ndc_k", h.shape[1], _geometry(out, h), s, _taps_table(h), out, scale)
    return out


def update(x: Tensor, t1: Tensor, s: Tensor, wa: Tensor, h: Tensor, eps: float, out: Tensor) -> Tensor:
    """``out = s * (A(x) + eps) / (A(t1) + eps)`` (``wa`` the adjoint weight of ``h``; ``out`` may be ``s``)."""
    _call("ndc_update", h.shape[1], _geometry(x, h), x, t1, s, _adjoint_table(wa, h), out, eps)
    return out


def ratios(x: Tensor, t1: Tensor, saved: Tensor, g: Tensor, wa: Tensor, h: Tensor, eps: float, relu_input: bool,
           from_output: bool) -> tuple[Tensor, Tensor]:
    """``(R, w)`` of the lean backward: ``R = N / D`` and ``w = g * s / D`` (``= g * out / N`` from the
    output; relu'd when ``relu_input`` and not from the output), ``N = A(x) + eps``, ``D = A(t1) + eps``."""
    r, w = torch.empty_like(saved), torch.empty_like(saved)
    _call("ndc_ratios", h.shape[1], _geometry(x, h), x, t1, saved, g, _adjoint_table(wa, h), r, w, eps,
          int(relu_input), int(from_output))
    return r, w


def grad_z(r: Tensor, g: Tensor, gt1: Tensor, saved: Tensor, wa: Tensor, h: Tensor, relu_input: bool) -> Tensor:
    """``dL/dz = (g * R + A(gt1)) * relu'`` written over ``r`` (``relu'``: ``saved > 0``)."""
    _call("ndc_grad_z", h.shape[1], _geometry(gt1, h), gt1, _adjoint_table(wa, h), r, g, saved, int(relu_input))
    return r


def filter_grad(y: Tensor, g: Tensor, wa: Tensor, h: Tensor) -> Tensor:
    """Gradient w.r.t. the adjoint weight ``wa`` of ``<g, conv(y, wa, groups=C)>`` (``y``: C channels,
    ``g``: C*sc), shaped like ``wa``."""
    c, sc = h.shape[:2]
    table = torch.empty(wa[0].numel(), sc, c, dtype=torch.float32)  # (taps, sc, C), as _adjoint_table
    _call("ndc_filter_grad", sc, _geometry(y, h), y, g, table)
    return table.permute(2, 1, 0).reshape(wa.shape)


def norm_supported(x: Tensor) -> bool:
    """Whether :func:`instance_norm` takes ``x``: a 2D/3D channels-last float32 CPU image, kernels built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _is_channels_last(x) and available()


def _norm_geometry(x: Tensor) -> ctypes.Array:
    n, c, *spatial = x.shape
    return (ctypes.c_int64 * 8)(n, *([1] * (3 - len(spatial))), *spatial, c, 1, 1, 1)


def instance_norm(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)``: ``y = F.instance_norm(x, eps=eps)`` (channels-last, like ``x``) and the
    per-sample, per-channel statistics ``(N, C)`` its backward reads."""
    y = torch.empty_like(x)
    mean, rstd = (torch.empty(x.shape[:2], dtype=torch.float32) for _ in range(2))
    _call("instance_norm_forward", None, _norm_geometry(x), x, y, mean, rstd, eps)
    return y, mean, rstd


def instance_norm_backward(x: Tensor, g: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """Gradient w.r.t. ``x`` of :func:`instance_norm` for the gradient ``g`` of its output (written over
    ``g``, which must be channels-last like ``x``)."""
    _call("instance_norm_backward", None, _norm_geometry(x), x, g, mean, rstd, g)
    return g


def weight_grad_supported(g: Tensor, x: Tensor) -> bool:
    """Whether :func:`weight_grad` takes the row-major float32 CPU matrices ``g`` ``(V, O)`` and ``x``
    ``(V, C)`` (``weight_grad_supports``: ``O`` a multiple of 8, ``C`` of 16; kernels built)."""
    return (g.device.type == x.device.type == "cpu" and g.dtype == x.dtype == torch.float32 and g.dim() == x.dim() == 2
            and g.shape[0] == x.shape[0] and g.is_contiguous() and x.is_contiguous() and available()
            and _library().weight_grad_supports(g.shape[1], x.shape[1]) == 1)


def weight_grad(g: Tensor, x: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """``(g^T x, g summed over rows)`` (the second only with ``bias``) of row-major float32 matrices
    ``g`` ``(V, O)`` and ``x`` ``(V, C)``: a 1x1 convolution's weight and bias gradients on channels-last
    tensors (:func:`weight_grad_supported` must hold)."""
    if not weight_grad_supported(g, x):
        raise ValueError(f"weight_grad: operands {tuple(g.shape)}, {tuple(x.shape)} ({g.dtype}, {x.dtype}) are not "
                         "row-major float32 CPU matrices with O % 8 == 0 and C % 16 == 0")
    gw = torch.empty(g.shape[1], x.shape[1], dtype=torch.float32)
    gb = torch.empty(g.shape[1], dtype=torch.float32) if bias else None
    if _library().weight_grad(g.shape[0], g.shape[1], x.shape[1], g.data_ptr(), x.data_ptr(), gw.data_ptr(),
                              None if gb is None else gb.data_ptr(), torch.get_num_threads()) != 0:
        raise RuntimeError(f"weight_grad: no kernel for O={g.shape[1]}, C={x.shape[1]}")
    return gw, gb
