"""The paper's FLOPs convention: DeepSpeed's FLOPs profiler, reproduced (docs/paper.md section 3).

The paper's "FLOPs / pixel" match a forward pass profiled by DeepSpeed's ``FlopsProfiler``, divided by
the number of input voxels. That profiler monkey-patches a fixed list of Python entry points for the
duration of the forward pass and adds, per call, a formula of the call's arguments:

========================================  ================================================================
patched entry point                       FLOPs per call (MACs; ``n`` = elements of the first input)
========================================  ================================================================
``F.conv1d/2d/3d``                        2 x MACs + bias (``C_out`` x output positions) (MACs)
``F.conv_transpose1d/2d/3d``              2 x MACs (over *input* positions) + bias, the bias counted
                                          over positions computed with the *forward* convolution's
                                          formula, ``(L + 2p - d(k-1) - 1) // s + 1`` (a DeepSpeed quirk,
                                          reproduced: for k = s = 2 it is 1/2^d of the true count)
``F.linear``                              2 x ``n`` x ``out_features`` (MACs); the bias is *not* counted
``F.relu, prelu, elu, leaky_relu,``       ``n``
``relu6, silu, gelu``
``F.batch_norm``                          ``n`` (``2n`` with affine); training: ``4n`` (``5n`` with affine)
``F.layer_norm, group_norm,``             ``4n`` (``5n`` with affine)
``instance_norm``
``F.{avg,max}_pool*``,                    ``n``
``F.adaptive_{avg,max}_pool*``
``F.interpolate``, ``F.upsample``         output elements (from ``size`` or ``n`` x scale^dims)
``F.softmax``                             ``n``
``F.embedding``                           0
``F.scaled_dot_product_attention``        2 x (``|Q|`` x S + ``|Q|/E`` x S x ``E_v``) (MACs)
``torch.matmul, Tensor.matmul, @,``       2 x ``|A|`` x ``B.shape[-1]`` (MACs)
``mm, bmm``
``torch.addmm, Tensor.addmm, baddbmm``    2 x MACs + ``|self|``
``torch.mul, Tensor.mul, torch.add,``     elements of the broadcast result
``Tensor.add``
``torch.einsum``, ``einops.einsum``       numpy's ``einsum_path`` "optimized flop" count
========================================  ================================================================

Everything else costs 0, notably the operators ``x + y``, ``x * y``, ``x / y`` (``Tensor.__add__``
etc. are not patched), ``torch.relu``/``torch.sigmoid``, ``torch.cat`` and dropout. A function is
seen only when it is looked up through the patched attribute at call time, so a library that keeps
its own reference (``CONV = {3: F.conv3d}`` at import time, as the official NDC does) is invisible.
Nested patched calls are each counted (``F.upsample`` calls ``F.interpolate``: counted twice).

**The NDC layer.** In the official code only the layer's source projection (a 1x1 convolution with
bias) and its two ``F.relu`` calls were visible: ``F.relu(s0)`` on the ``G*sc`` source channels and
``F.relu(h)`` on the filter expanded to the batch (``B x C x sc x k^d`` elements); its K/A
convolutions and the multiplicative update were not counted. This counter reproduces exactly that
for any :class:`deconver.nn.NDC` (lean or reference, so both give the same number): inside an NDC
layer every patched call is muted and the layer is charged the analytic cost of those three calls
(:func:`ndc_paper_cost`). The Deconver mixer around it is charged the same way, as the official
mixer's calls (:func:`mixer_paper_cost`: its two 1x1 convolutions, the second with bias, and the
ReLU), because this suite computes its output projection as a GEMM or through a convolution the
patches do not see. Other layers can be given such a rule with :func:`register_opaque`.

**Not reproduced:** the profiler sums per-module totals over the module tree and counts a module
reachable through two attributes twice (MONAI's DynUNet, 915K instead of about 456K per voxel in the
paper's baselines); here every call is counted once. The module hooks DeepSpeed has for RNN layers
are not reproduced either (no model of the suite has one).
"""
from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# ------------------------------------------------------------------------------ DeepSpeed formulas
# Each returns (flops, macs) for one call, from the call's own arguments.


def _numel(t) -> int:
    return int(t.numel()) if torch.is_tensor(t) else 1


def _shape_of(t) -> tuple[int, ...]:
    return tuple(int(v) for v in t.shape)


def _tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _arg(args, kwargs, index: int, name: str, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _conv_args(args, kwargs, *, transposed: bool):
    """(x, weight, bias, stride, padding, dilation, groups, dims, kernel) of an F.conv*d / F.conv_transpose*d
    call (the transposed one has output_padding at 5, groups at 6 and dilation at 7)."""
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    dilation = _arg(args, kwargs, 7 if transposed else 5, "dilation", 1)
    return (x, w, _arg(args, kwargs, 2, "bias"), _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0),
            dilation, _arg(args, kwargs, 6, "groups", 1), x.dim() - 2, _shape_of(w)[2:])


def _conv(*args, **kwargs):
    x, w, bias, stride, padding, dilation, groups, dims, k = _conv_args(args, kwargs, transposed=False)
    strides, dilations = _tuple(stride, dims), _tuple(dilation, dims)
    if isinstance(padding, str):
        pads = (0,) * dims if padding == "valid" else tuple(d * (kk - 1) // 2 for d, kk in zip(dilations, k))
    else:
        pads = _tuple(padding, dims)
    out = [(n + 2 * p - (d * (kk - 1) + 1)) // s + 1 for n, p, d, kk, s in zip(_shape_of(x)[2:], pads, dilations, k, strides)]
    c_out = _shape_of(w)[0]
    positions = _shape_of(x)[0] * math.prod(out)
    macs = math.prod(k) * _shape_of(x)[1] * (c_out // groups) * positions
    return 2 * macs + (c_out * positions if bias is not None else 0), macs


def _conv_transpose(*args, **kwargs):
    x, w, bias, stride, padding, dilation, groups, dims, k = _conv_args(args, kwargs, transposed=True)
    pads, strides, dilations = _tuple(padding, dims), _tuple(stride, dims), _tuple(dilation, dims)
    # DeepSpeed's quirk: the bias is counted over the positions of a *forward* convolution
    quirk_out = [(n + 2 * p - (d * (kk - 1) + 1)) // s + 1 for n, p, d, kk, s in zip(_shape_of(x)[2:], pads, dilations, k, strides)]
    c_out = _shape_of(w)[1]
    macs = math.prod(k) * _shape_of(x)[1] * (c_out // groups) * _shape_of(x)[0] * math.prod(_shape_of(x)[2:])
    bias_flops = c_out * _shape_of(x)[0] * math.prod(quirk_out) if bias is not None else 0
    return 2 * macs + bias_flops, macs


def _linear(*args, **kwargs):
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    macs = _numel(x) * _shape_of(w)[0]
    return 2 * macs, macs


def _per_element(*args, **kwargs):
    return _numel(args[0] if args else next(iter(kwargs.values()))), 0


def _batch_norm(*args, **kwargs):
    x = args[0]
    weight = _arg(args, kwargs, 3, "weight")
    if _arg(args, kwargs, 5, "training", False):
        return _numel(x) * (5 if weight is not None else 4), 0
    return _numel(x) * (2 if weight is not None else 1), 0


def _norm_at(index: int, name: str):
    def formula(*args, **kwargs):
        weight = _arg(args, kwargs, index, name)
        return _numel(args[0]) * (5 if weight is not None else 4), 0

    return formula


def _upsample(*args, **kwargs):
    x = args[0]
    size = _arg(args, kwargs, 1, "size")
    if size is not None:
        return (int(math.prod(size)) if isinstance(size, (tuple, list)) else int(size)), 0
    scale = _arg(args, kwargs, 2, "scale_factor")
    if scale is None:
        raise ValueError("interpolate/upsample needs size or scale_factor")
    if isinstance(scale, (tuple, list)):
        return int(_numel(x) * math.prod(scale)), 0
    return int(_numel(x) * scale ** (x.dim() - 2)), 0


def _zero(*args, **kwargs):
    return 0, 0


def _sdpa(*args, **kwargs):
    q, k, v = args[:3]
    macs = _numel(q) * _shape_of(k)[-2] + math.prod(_shape_of(q)[:-1]) * _shape_of(k)[-2] * _shape_of(v)[-1]
    return 2 * macs, macs


def _matmul(*args, **kwargs):
    a, b = args[0], args[1]
    macs = _numel(a) * _shape_of(b)[-1]
    return 2 * macs, macs


def _addmm(*args, **kwargs):
    bias, a, b = args[0], args[1], args[2]
    macs = _numel(a) * _shape_of(b)[-1]
    return 2 * macs + _numel(bias), macs


def _broadcast_elements(*args, **kwargs):
    a = args[0] if args else kwargs.get("input")
    b = args[1] if len(args) > 1 else kwargs.get("other")
    if not torch.is_tensor(a):
        return (_numel(b) if torch.is_tensor(b) else 1), 0
    if not torch.is_tensor(b):
        return _numel(a), 0
    sa, sb = _shape_of(a), _shape_of(b)
    n = max(len(sa), len(sb))
    # DeepSpeed aligns the shapes on the left (not numpy's right alignment); reproduced
    return math.prod(max(sa[i] if i < len(sa) else 1, sb[i] if i < len(sb) else 1) for i in range(n)), 0


def _einsum_flops(equation: str, shapes: list[tuple[int, ...]]) -> int:
    equation = equation.replace(" ", "")
    order = OrderedDict((c, 0) for c in equation if c.isalpha()).keys()
    equation = equation.translate({ord(c): 97 + i for i, c in enumerate(order)})
    path = np.einsum_path(equation, *[np.zeros(s) for s in shapes], optimize="optimal")[1]
    for line in path.split("\n"):
        if "optimized flop" in line.lower():
            return int(float(line.split(":")[-1]))
    raise NotImplementedError(f"einsum {equation!r}: no flop count from numpy")


def _einsum(*args, **kwargs):
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    return _einsum_flops(equation, [_shape_of(o) for o in operands]), 0


def _einops_einsum(*args, **kwargs):
    *operands, equation = args
    return _einsum_flops(equation, [_shape_of(o) for o in operands]), 0


# (owner, attribute, formula): the entry points DeepSpeed patches, in its order
def _patch_table() -> list[tuple[Any, str, Callable]]:
    table: list[tuple[Any, str, Callable]] = [(F, "linear", _linear)]
    table += [(F, f"conv{d}d", _conv) for d in (1, 2, 3)]
    table += [(F, f"conv_transpose{d}d", _conv_transpose) for d in (1, 2, 3)]
    table += [(F, name, _per_element) for name in ("relu", "prelu", "elu", "leaky_relu", "relu6", "silu", "gelu")]
    table += [(F, "batch_norm", _batch_norm), (F, "layer_norm", _norm_at(2, "weight")),
              (F, "instance_norm", _norm_at(3, "weight")), (F, "group_norm", _norm_at(2, "weight"))]
    table += [(F, f"{kind}_pool{d}d", _per_element) for kind in ("avg", "max") for d in (1, 2, 3)]
    table += [(F, f"adaptive_{kind}_pool{d}d", _per_element) for kind in ("avg", "max") for d in (1, 2, 3)]
    table += [(F, "upsample", _upsample), (F, "interpolate", _upsample), (F, "softmax", _per_element),
              (F, "embedding", _zero), (F, "scaled_dot_product_attention", _sdpa)]
    table += [(torch, "matmul", _matmul), (torch.Tensor, "matmul", _matmul), (torch.Tensor, "__matmul__", _matmul),
              (torch, "mm", _matmul), (torch.Tensor, "mm", _matmul), (torch, "bmm", _matmul),
              (torch.Tensor, "bmm", _matmul), (torch, "addmm", _addmm), (torch.Tensor, "addmm", _addmm),
              (torch, "mul", _broadcast_elements), (torch.Tensor, "mul", _broadcast_elements),
              (torch, "add", _broadcast_elements), (torch.Tensor, "add", _broadcast_elements),
              (torch, "einsum", _einsum), (torch, "baddbmm", _addmm)]
    try:
        import einops

        table.append((einops, "einsum", _einops_einsum))
    except ImportError:
        pass
    return table


# ------------------------------------------------------------------------------- opaque layers
def ndc_paper_cost(layer: nn.Module, x: torch.Tensor) -> list[tuple[str, int, int]]:
    """What DeepSpeed saw of one official NDC call: the 1x1 projection and ``F.relu`` of s0 and of h.

    ``layer`` has ``h0`` ``(C, sc, *k)`` and ``proj`` (a 1x1 convolution ``C -> G*sc``, with bias);
    ``x`` is ``(B, C, *S)``. Returns ``(name, flops, macs)`` entries.
    """
    b, n = int(x.shape[0]), math.prod(int(v) for v in x.shape[2:])
    proj = layer.proj
    g_sc, c = int(proj.weight.shape[0]), int(proj.weight.shape[1])
    macs = b * n * c * g_sc
    proj_flops = 2 * macs + (g_sc * b * n if proj.bias is not None else 0)
    return [("ndc.proj(conv)", proj_flops, macs), ("ndc.relu(s0)", b * g_sc * n, 0),
            ("ndc.relu(h)", b * int(layer.h0.numel()), 0)]


def mixer_paper_cost(mixer: nn.Module, x: torch.Tensor) -> list[tuple[str, int, int]]:
    """What DeepSpeed saw of one official Deconver mixer call: its input 1x1 convolution (``F.conv``),
    the ``F.relu`` after it, the NDC layer's visible calls (:func:`ndc_paper_cost`) and its output 1x1
    convolution with bias. Charging the mixer as a whole makes the count independent of how this
    suite's implementations compute it (the lean one projects channels-last tensors with a GEMM, the
    reference one with a convolution PyTorch's patches do not see)."""
    b, n = int(x.shape[0]), math.prod(int(v) for v in x.shape[2:])
    entries = []
    for name, conv in (("mixer.in_proj(conv)", mixer.in_proj), ("mixer.out_proj(conv)", mixer.out_proj)):
        c_out, c_in = int(conv.weight.shape[0]), int(conv.weight.shape[1])
        macs = b * n * c_in * c_out
        entries.append((name, 2 * macs + (c_out * b * n if conv.bias is not None else 0), macs))
    return [entries[0], ("mixer.relu", b * int(x.shape[1]) * n, 0), *ndc_paper_cost(mixer.ndc, x), entries[1]]


OpaqueRule = Callable[[nn.Module, torch.Tensor], list[tuple[str, int, int]]]
_OPAQUE: dict[type, OpaqueRule] = {}


def register_opaque(layer_type: type, rule: OpaqueRule) -> None:
    """Count a layer type by ``rule(layer, input)`` instead of by the calls made inside it."""
    _OPAQUE[layer_type] = rule


def _opaque_rules() -> dict[type, OpaqueRule]:
    from deconver.nn.deconver import DeconvMixer
    from deconver.nn.ndc import NDC

    rules = dict(_OPAQUE)
    rules.setdefault(DeconvMixer, mixer_paper_cost)
    rules.setdefault(NDC, ndc_paper_cost)
    return rules


# ------------------------------------------------------------------------------------ counting
@dataclass
class PaperCount:
    """FLOPs of one forward pass in the paper's (DeepSpeed's) convention."""

    flops: int
    macs: int
    by_function: dict[str, int]
    calls: dict[str, int]
    opaque_layers: int
    mode: str
    convention: str = ("DeepSpeed FlopsProfiler: 2 FLOPs per MAC (+ bias of convolutions) plus one per "
                       "element of activations, norms (4-5), pooling, softmax, torch.add/mul; NDC K/A "
                       "convolutions and update not counted")
    notes: list[str] = field(default_factory=list)

    @property
    def nonmac_flops(self) -> int:
        """The part that is not 2 x MACs: biases, activations, norms, pooling, element-wise calls."""
        return self.flops - 2 * self.macs

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "nonmac_flops": self.nonmac_flops}


_PATCH_LOCK = threading.Lock()


class _Recorder:
    def __init__(self):
        self.flops: Counter = Counter()
        self.macs: Counter = Counter()
        self.calls: Counter = Counter()
        self.muted = 0  # > 0 inside an opaque layer
        self.in_dispatch = 0  # > 0 inside torch's own dispatch machinery (fake-tensor decompositions)
        self.opaque_layers = 0

    def reset(self) -> None:
        self.__init__()

    def add(self, name: str, flops: int, macs: int) -> None:
        self.flops[name] += int(flops)
        self.macs[name] += int(macs)
        self.calls[name] += 1


class _DispatchDepth(TorchDispatchMode):
    """Marks when execution is inside the dispatcher: calls made there (e.g. the fake-tensor mode
    decomposing ``addmm`` into ``torch.mm``) are torch internals, not the model's, and are not counted."""

    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.rec.in_dispatch += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.rec.in_dispatch -= 1


def _wrap(original: Callable, formula: Callable, name: str, rec: _Recorder) -> Callable:
    def patched(*args, **kwargs):
        if not rec.muted and not rec.in_dispatch:
            flops, macs = formula(*args, **kwargs)
            rec.add(name, flops, macs)
        return original(*args, **kwargs)

    patched.__wrapped__ = original
    return patched


def _forward(model, input_shape, fake, device, dtype, rec) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) if fake else torch.no_grad():
        x = torch.randn(tuple(input_shape), device=device, dtype=dtype)
        with torch.no_grad(), _DispatchDepth(rec):
            model(x)


def paper_count(model: nn.Module, input_shape: Sequence[int], *, fake: bool = True, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> PaperCount:
    """FLOPs of one forward pass of ``model`` on an input of ``input_shape``, DeepSpeed's way.

    ``fake=True`` runs on fake tensors (shapes only). The patches are process-wide while the forward
    runs (as DeepSpeed's are) and are always undone; counting is serialized by a lock. A model that
    cannot run on fake tensors is counted for real (``mode`` says which).
    """
    rec = _Recorder()
    rules = _opaque_rules()
    hooks = []

    def pre_hook(module, args):
        if not rec.muted:
            for kind, rule in rules.items():
                if isinstance(module, kind):
                    for name, flops, macs in rule(module, args[0]):
                        rec.add(name, flops, macs)
                    rec.opaque_layers += 1
                    break
        rec.muted += 1

    def post_hook(module, args, output):
        rec.muted -= 1

    for module in model.modules():
        if any(isinstance(module, kind) for kind in rules):
            hooks.append(module.register_forward_pre_hook(pre_hook))
            hooks.append(module.register_forward_hook(post_hook, always_call=True))
    was_training = model.training
    model.eval()
    table = _patch_table()
    with _PATCH_LOCK:
        originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in table]
        try:
            for (owner, attr, formula), (_, _, original) in zip(table, originals):
                label = f"{'Tensor.' if owner is torch.Tensor else getattr(owner, '__name__', str(owner)) + '.'}{attr}"
                label = label.replace("torch.nn.functional.", "F.")
                setattr(owner, attr, _wrap(original, formula, label, rec))
            try:
                _forward(model, input_shape, fake, device, dtype, rec)
            except Exception:
                if not fake:
                    raise
                fake = False  # a model that needs real data (item(), numpy): count it for real instead
                rec.reset()
                _forward(model, input_shape, fake, device, dtype, rec)
        finally:
            for owner, attr, original in originals:
                setattr(owner, attr, original)
            for h in hooks:
                h.remove()
            model.train(was_training)
    return PaperCount(flops=sum(rec.flops.values()), macs=sum(rec.macs.values()), by_function=dict(rec.flops),
                      calls=dict(rec.calls), opaque_layers=rec.opaque_layers, mode="fake" if fake else "real")
