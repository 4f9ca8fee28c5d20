"""Parameters and two independent FLOP counts of one forward pass, and their cross-check.

* :func:`fvcore_count` — fvcore's ``FlopCountAnalysis`` (a TorchScript trace; **1 MAC = 1 flop**), with
  handles registered here for every contraction (so the conventions are ours and explicit), for the
  lean NDC update (``prim::PythonOp.NDCUpdate``: a custom autograd function is opaque to the trace),
  and for any other Python autograd function registered with :func:`register_python_op`. Operators
  fvcore has no handle for are classified (:mod:`deconver.complexity.ops`): those that cost no MACs
  by convention are reported as *accounted*, the rest as *unsupported* (the model is flagged).
* :func:`flop_counter_count` — ``torch.utils.flop_counter.FlopCounterMode`` (dispatcher level;
  **1 MAC = 2 FLOPs**). It sees the convolutions inside a custom autograd function. It runs on fake
  tensors by default (shapes only, no memory, any roi in milliseconds). A recorder beside it lists
  every executed operator that has no FLOP formula and is not a no-MAC class: *uncounted* (flagged).
* :func:`cross_check` — the two agree when FLOPs = 2 x MACs within 5 %.

Only contractions (convolutions, linear layers, matrix products, einsum, attention) cost MACs here;
normalizations, activations, element-wise arithmetic, pooling and resampling are not part of the
headline count (fvcore's own estimates for normalizations/resampling are kept apart as ``other_ops``).
The paper's convention, which adds element-wise work, is in :mod:`deconver.complexity.paper`.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from deconver.complexity.ops import classify, op_base_name

CROSS_CHECK_TOLERANCE = 0.05

Handle = Callable[[list, list], int]


# ----------------------------------------------------------------------------------------- params
def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameters; a parameter shared by several modules is counted once."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return {"total": sum(p.numel() for p in seen.values()),
            "trainable": sum(p.numel() for p in seen.values() if p.requires_grad)}


# ----------------------------------------------------------------------------------------- fvcore
def _shape(value) -> list[int] | None:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def _conv_macs(inputs, outputs) -> int:
    """aten::_convolution: batch x |weight| x output positions (input positions when transposed)."""
    x, w, out = _shape(inputs[0]), _shape(inputs[1]), _shape(outputs[0])
    transposed = bool(inputs[6].toIValue())
    return x[0] * math.prod(w) * math.prod((x if transposed else out)[2:])


def _linear_macs(inputs, outputs) -> int:
    x, w = _shape(inputs[0]), _shape(inputs[1])
    return math.prod(x) * (w[0] if len(w) == 2 else 1)


def _matmul_shapes_macs(a: list[int], b: list[int]) -> int:
    """MACs of ``a @ b`` with numpy broadcasting of the batch dimensions (1-D operands promoted)."""
    a = [1, *a] if len(a) == 1 else list(a)
    b = [*b, 1] if len(b) == 1 else list(b)
    batch = torch.broadcast_shapes(torch.Size(a[:-2]), torch.Size(b[:-2]))
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


def _matmul_macs(inputs, outputs) -> int:
    return _matmul_shapes_macs(_shape(inputs[0]), _shape(inputs[1]))


def _addmm_macs(inputs, outputs) -> int:  # addmm/baddbmm(self, mat1, mat2, ...)
    return _matmul_shapes_macs(_shape(inputs[1]), _shape(inputs[2]))


def _sdpa_macs(inputs, outputs) -> int:
    """Attention: Q K^T (L x S x E) and P V (L x S x Ev) per batch/head."""
    q, k, v = (_shape(inputs[i]) for i in range(3))
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _einsum_macs(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import einsum_flop_jit

    return int(einsum_flop_jit(inputs, outputs))


def ndc_update_handle(inputs, outputs) -> int:
    """``NDCUpdate.apply(x, z, h, ...)``: K(s), A(x), A(K(s)) cost C*sc*k^d MACs each per voxel and sample.

    ``x`` is ``(B, C, *S)`` and ``h`` ``(C, sc, *k)``, so one update is ``3 * B * |S| * |h|`` MACs
    (docs/paper.md section 1; the 1x1 projection is an ordinary convolution outside the function).
    """
    x, h = _shape(inputs[0]), _shape(inputs[2])
    return 3 * x[0] * math.prod(x[2:]) * math.prod(h)


CONTRACTION_HANDLES: dict[str, Handle] = {
    "aten::_convolution": _conv_macs,
    "aten::linear": _linear_macs,
    "aten::matmul": _matmul_macs,
    "aten::mm": _matmul_macs,
    "aten::bmm": _matmul_macs,
    "aten::addmm": _addmm_macs,
    "aten::baddbmm": _addmm_macs,
    "aten::einsum": _einsum_macs,
    "aten::scaled_dot_product_attention": _sdpa_macs,
}

# custom autograd functions (fvcore kind ``prim::PythonOp.<class name>``) -> MACs handle
PYTHON_OP_HANDLES: dict[str, Handle] = {"NDCUpdate": ndc_update_handle}


def register_python_op(name: str, handle: Handle) -> None:
    """Give fvcore the MACs of a custom ``torch.autograd.Function`` named ``name`` (its class name).

    ``handle(inputs, outputs)`` receives the traced values of the function's tensor arguments and
    results (``fvcore.nn.jit_handles.get_shape`` gives their shapes) and returns MACs.
    """
    PYTHON_OP_HANDLES[name] = handle


def _other_handles() -> dict[str, Handle]:
    """fvcore's estimates for the no-MAC operators it knows (normalization, resampling, pooling)."""
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS
    from fvcore.nn.jit_handles import elementwise_flop_counter

    handles = {k: v for k, v in _DEFAULT_SUPPORTED_OPS.items() if k not in CONTRACTION_HANDLES}
    for kind, scale in [("aten::upsample_nearest1d", 1), ("aten::upsample_nearest3d", 1),
                        ("aten::upsample_linear1d", 2), ("aten::upsample_trilinear3d", 8),
                        ("aten::upsample_bicubic2d", 16)]:
        handles.setdefault(kind, elementwise_flop_counter(0, scale))
    for kind in ("aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool3d"):
        handles.setdefault(kind, elementwise_flop_counter(1, 0))
    return handles


def _keyed(key: str, handle: Callable) -> Handle:
    def wrapped(inputs, outputs):
        value = handle(inputs, outputs)
        if isinstance(value, Counter):
            value = sum(value.values())
        return Counter({key: int(value)})

    return wrapped


@dataclass
class FvcoreCount:
    """fvcore's count: MACs by operator, fvcore's no-MAC estimates, and what it could not count."""

    macs: int
    macs_by_op: dict[str, int]
    other_ops: dict[str, int]
    accounted_ops: dict[str, dict[str, Any]]
    unsupported_ops: dict[str, int]
    grad: bool
    device: str
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fvcore_count(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], *, grad: bool = False) -> FvcoreCount:
    """MACs of one forward pass of ``model(*inputs)`` by fvcore (real execution under a trace).

    ``grad=True`` traces with autograd on (for layers that take a different path when gradients are
    needed). A custom autograd function (the lean NDC's ``NDCUpdate``) appears as ``prim::PythonOp``
    and is counted by its handle in :data:`PYTHON_OP_HANDLES`.
    A failing trace is reported in ``error`` (the result is then flagged), not raised.
    """
    with warnings.catch_warnings():  # fvcore's import touches the deprecated torch.jit.script
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    device = str(inputs[0].device)
    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, inputs)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        for kind, handle in CONTRACTION_HANDLES.items():
            analysis.set_op_handle(kind, _keyed("mac/" + op_base_name(kind), handle))
        for name, handle in PYTHON_OP_HANDLES.items():
            analysis.set_op_handle(f"prim::PythonOp.{name}", _keyed(f"mac/PythonOp.{name}", handle))
        for kind, handle in _other_handles().items():
            analysis.set_op_handle(kind, _keyed("other/" + op_base_name(kind), handle))
        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            by_op = analysis.by_operator()
            unsupported = dict(analysis.unsupported_ops())
    except Exception as err:  # a model the tracer cannot follow: report, flag, go on
        return FvcoreCount(0, {}, {}, {}, {}, grad, device, error=f"{type(err).__name__}: {err}")
    finally:
        model.train(was_training)
    macs_by_op = {k[4:]: int(v) for k, v in by_op.items() if k.startswith("mac/")}
    other = {k[6:]: int(v) for k, v in by_op.items() if k.startswith("other/")}
    accounted, still = {}, {}
    for kind, calls in sorted(unsupported.items()):
        cls = classify(kind)
        if cls in ("unknown", "contraction"):
            still[kind] = int(calls)
        else:
            accounted[kind] = {"calls": int(calls), "class": cls}
    return FvcoreCount(sum(macs_by_op.values()), macs_by_op, other, accounted, still, grad, device)


# ----------------------------------------------------------------------------------- flop_counter
def _extra_flop_formulas() -> dict:
    """Formulas torch's registry lacks: the CPU flash-attention kernel that SDPA dispatches to."""
    from torch.utils.flop_counter import sdpa_flop_count

    extra = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

        extra[op] = cpu_flash
    return extra


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operator that reaches the dispatcher below the FLOP counter (name -> calls)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.packets: dict[str, Any] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        name = f"{packet._qualified_op_name}"
        self.calls[name] += 1
        self.packets[name] = packet
        return func(*args, **(kwargs or {}))


@dataclass
class FlopCounterCount:
    """torch.utils.flop_counter's count: FLOPs (2 per MAC) by operator, and what it does not count."""

    flops: int
    flops_by_op: dict[str, int]
    accounted_ops: dict[str, dict[str, Any]]
    uncounted_ops: dict[str, int]
    grad: bool
    mode: str
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_flop_counter(model, input_shape, fake, device, grad, dtype, extra):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    recorder = _OpRecorder()
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext():
        x = torch.randn(tuple(input_shape), device=device, dtype=dtype)
        counter = FlopCounterMode(display=False, custom_mapping=extra)
        with recorder, counter, torch.set_grad_enabled(grad):
            model(x)
    return recorder, counter


def flop_counter_count(model: nn.Module, input_shape: Sequence[int], *, fake: bool = True, device: str | torch.device = "cpu",
                       grad: bool = False, dtype: torch.dtype = torch.float32) -> FlopCounterCount:
    """FLOPs of one forward pass on an input of ``input_shape`` by ``torch.utils.flop_counter``.

    ``fake=True`` runs under ``FakeTensorMode``: the model's real parameters are used as constants,
    activations are shape-only, so nothing is computed or allocated; a model that cannot run on fake
    tensors (it reads values: ``.item()``, numpy) is counted for real instead (``mode`` says which).
    ``fake=False`` runs for real on ``device``. Errors are reported in ``error`` (and flag the model).
    """
    from torch.utils.flop_counter import flop_registry

    extra = _extra_flop_formulas()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                recorder, counter = _run_flop_counter(model, input_shape, fake, device, grad, dtype, extra)
            except Exception as err:
                if not fake:
                    return FlopCounterCount(0, {}, {}, {}, grad, "real", error=f"{type(err).__name__}: {err}")
                fake = False  # a model that needs real data (item(), numpy): count it for real instead
                try:
                    recorder, counter = _run_flop_counter(model, input_shape, fake, device, grad, dtype, extra)
                except Exception as err2:
                    return FlopCounterCount(0, {}, {}, {}, grad, "real", error=f"{type(err2).__name__}: {err2}")
    finally:
        model.train(was_training)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    registry = {**flop_registry, **extra}
    accounted, uncounted = {}, {}
    for name, calls in sorted(recorder.calls.items()):
        if recorder.packets[name] in registry:
            continue
        cls = classify(name)
        if cls in ("unknown", "contraction"):
            uncounted[name] = int(calls)
        else:
            accounted[name] = {"calls": int(calls), "class": cls}
    return FlopCounterCount(sum(by_op.values()), by_op, accounted, uncounted, grad, "fake" if fake else "real")


# ------------------------------------------------------------------------------------ cross-check
@dataclass
class CrossCheck:
    """flop_counter FLOPs / (2 x fvcore MACs), whether it is within the tolerance, and every flag.

    ``agree`` is the ratio test alone; ``flags`` also lists failures and operators a counter could not
    vouch for. A model is trustworthy when ``agree and not flags`` (:attr:`ok`).
    """

    ratio: float | None
    tolerance: float
    agree: bool
    flags: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.agree and not self.flags

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cross_check(fv: FvcoreCount, fc: FlopCounterCount, tolerance: float = CROSS_CHECK_TOLERANCE) -> CrossCheck:
    """Compare the two counts; flag disagreement, failures, and every op a counter could not vouch for."""
    flags = []
    if fv.error:
        flags.append(f"fvcore failed: {fv.error}")
    if fc.error:
        flags.append(f"flop_counter failed: {fc.error}")
    if fv.unsupported_ops:
        flags.append("fvcore could not count: " + ", ".join(f"{k} x{v}" for k, v in fv.unsupported_ops.items()))
    if fc.uncounted_ops:
        flags.append("flop_counter could not count: " + ", ".join(f"{k} x{v}" for k, v in fc.uncounted_ops.items()))
    if fv.error or fc.error:
        return CrossCheck(None, tolerance, False, flags)
    if fv.macs == 0 and fc.flops == 0:
        ratio, agree = 1.0, True
    elif fv.macs == 0:
        ratio, agree = math.inf, False
    else:
        ratio = fc.flops / (2 * fv.macs)
        agree = abs(ratio - 1) <= tolerance
    if not agree:
        flags.append(f"counters disagree: flop_counter {fc.flops:,} FLOPs vs 2 x fvcore {fv.macs:,} MACs "
                     f"(ratio {ratio:.4f}, tolerance {tolerance:.0%})")
    return CrossCheck(ratio, tolerance, agree, flags)
