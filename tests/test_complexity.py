"""Complexity accounting, unit level: each counter against hand-computed FLOPs of single layers, the
NDC handle against the dispatcher, flagging of uncountable operators, the paper's (DeepSpeed's)
conventions, the CPU memory tracker and the latency measurement. Real layers, real counters."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deconver.complexity import counters
from deconver.complexity.counters import count_parameters, cross_check, flop_counter_count, fvcore_count
from deconver.complexity.ops import classify
from deconver.complexity.paper import paper_count
from deconver.complexity.runtime import MB, TensorMemoryTracker, measure_runtime
from deconver.nn import NDC


def _both(model, shape, grad=False):
    fv = fvcore_count(model, torch.randn(shape), grad=grad)
    fc = flop_counter_count(model, shape, grad=grad)
    return fv, fc, cross_check(fv, fc)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- single layers
CONV_CASES = [
    # (layer, input shape, MACs = C_out * C_in/groups * k^d * output positions)
    (lambda: nn.Conv2d(3, 8, 3, padding=1), (1, 3, 20, 24), 8 * 3 * 9 * 20 * 24),
    (lambda: nn.Conv3d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), (2, 4, 8, 10, 6), 6 * 2 * 27 * (2 * 4 * 5 * 3)),
    (lambda: nn.Conv2d(4, 4, 5, padding=2, groups=4), (1, 4, 7, 9), 4 * 1 * 25 * 63),
    # transposed: C_in * C_out * k^d * *input* positions
    (lambda: nn.ConvTranspose3d(6, 3, 2, stride=2), (1, 6, 4, 5, 3), 6 * 3 * 8 * 60),
]


@pytest.mark.parametrize("make,shape,macs", CONV_CASES)
def test_single_convolution_equals_analytic(make, shape, macs):
    torch.manual_seed(0)
    layer = make()
    fv, fc, check = _both(layer, shape)
    assert fv.macs == macs
    assert fc.flops == 2 * macs
    assert check.agree and check.ratio == 1.0 and not check.flags


def test_single_linear_equals_analytic():
    layer = nn.Linear(16, 32)
    fv, fc, check = _both(layer, (2, 10, 16))
    assert fv.macs == 2 * 10 * 16 * 32
    assert fc.flops == 2 * fv.macs
    assert check.ok
    # DeepSpeed: 2 per MAC and the bias of a linear layer is not counted
    assert paper_count(layer, (2, 10, 16)).flops == 2 * 2 * 10 * 16 * 32


def test_paper_convention_conv_bias_and_transposed_quirk():
    conv = nn.Conv3d(2, 5, 3, padding=1)
    n = 6 * 4 * 8
    assert paper_count(conv, (1, 2, 6, 4, 8)).flops == 2 * 5 * 2 * 27 * n + 5 * n
    up = nn.ConvTranspose2d(6, 3, 2, stride=2)
    # the bias over the positions of a forward k2 s2 convolution of the input: (8/2) * (10/2)
    assert paper_count(up, (1, 6, 8, 10)).flops == 2 * 6 * 3 * 4 * 80 + 3 * 4 * 5


def test_parameters_shared_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    model[0].bias.requires_grad_(False)
    assert count_parameters(model) == {"total": 20, "trainable": 16}


# ------------------------------------------------------------------------------------ the NDC
@pytest.mark.parametrize("impl,grad", [("lean", True), ("lean", False), ("reference", False)])
def test_ndc_handle_matches_dispatcher_and_formula(impl, grad):
    torch.manual_seed(0)
    layer = NDC(6, kernel_size=3, ratio=2, spatial_dims=3, impl=impl)  # sc = 2, G*sc = 12
    b, s = 2, (5, 4, 6)
    fv, fc, check = _both(layer, (b, 6, *s), grad=grad)
    n = b * math.prod(s)
    expected = n * 6 * 12 + 3 * n * 6 * 2 * 27  # projection + K(s), A(x), A(K(s))
    assert fv.macs == expected
    assert fc.flops == 2 * expected
    assert check.ok, check.flags
    if impl == "lean" and grad:  # the custom autograd node reached fvcore as a PythonOp
        assert fv.macs_by_op["PythonOp.NDCUpdate"] == 3 * n * 6 * 2 * 27


# ------------------------------------------------------------------------------- flagging
class _Opaque(torch.autograd.Function):
    """A matrix product computed in numpy: invisible to both counters."""

    @staticmethod
    def forward(ctx, x, w):
        return torch.from_numpy(x.detach().numpy() @ w.detach().numpy())

    @staticmethod
    def backward(ctx, g):
        return None, None


class _ConvFunction(torch.autograd.Function):
    """A convolution inside a custom autograd function (fvcore: PythonOp; dispatcher: a conv)."""

    @staticmethod
    def forward(ctx, x, w):
        return F.conv2d(x, w, padding=1)

    @staticmethod
    def backward(ctx, g):
        return None, None


class _OpaqueNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return _Opaque.apply(self.conv(x), self.w)


class _FFTNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.fft.irfftn(torch.fft.rfftn(self.conv(x), dim=(-2, -1)), s=x.shape[-2:], dim=(-2, -1))


class _ConvFunctionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 3, 3, 3))

    def forward(self, x):
        return _ConvFunction.apply(x, self.w)


def test_opaque_autograd_function_is_flagged_not_undercounted():
    fv = fvcore_count(_OpaqueNet(), torch.randn(1, 3, 16, 16))
    assert fv.unsupported_ops == {"prim::PythonOp._Opaque": 1}
    fc = flop_counter_count(_OpaqueNet(), (1, 3, 16, 16), fake=False)
    check = cross_check(fv, fc)
    assert check.agree  # both saw only the convolution ...
    assert check.flags and "prim::PythonOp._Opaque" in check.flags[0]  # ... and the model is flagged


def test_fft_is_flagged_by_both_counters():
    model = _FFTNet()
    fv, fc, check = _both(model, (1, 3, 16, 16))
    assert any("fft" in k for k in fv.unsupported_ops)
    assert any("fft" in k for k in fc.uncounted_ops)
    assert len(check.flags) == 2 and not check.ok


def test_python_op_handle_registration_and_disagreement(monkeypatch):
    model = _ConvFunctionNet()
    shape = (1, 3, 8, 8)
    macs = 5 * 3 * 9 * 64
    fv, fc, check = _both(model, shape)
    assert fv.unsupported_ops == {"prim::PythonOp._ConvFunction": 1} and fc.flops == 2 * macs and not check.ok
    # a right handle makes it countable ...
    monkeypatch.setitem(counters.PYTHON_OP_HANDLES, "_ConvFunction", lambda inputs, outputs: macs)
    fv, fc, check = _both(model, shape)
    assert fv.macs == macs and check.ok
    # ... and a wrong one (half the work) is caught by the cross-check
    monkeypatch.setitem(counters.PYTHON_OP_HANDLES, "_ConvFunction", lambda inputs, outputs: macs // 2)
    fv, fc, check = _both(model, shape)
    assert not check.agree and check.ratio == pytest.approx(2.0)
    assert any("counters disagree" in f for f in check.flags)


def test_classification():
    assert classify("aten::_convolution") == "contraction"
    assert classify("aten::add_") == "elementwise" and classify("aten.gelu") == "elementwise"
    assert classify("aten::instance_norm") == "normalization"
    assert classify("aten::upsample_trilinear3d") == "resampling"
    assert classify("aten::cat") == "data"
    for name in ("aten::_fft_r2c", "aten::linalg_solve", "prim::PythonOp.Foo", "mylib::kernel"):
        assert classify(name) == "unknown"


# ---------------------------------------------------------------------- the paper's convention
class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1, bias=False)
        self.norm = nn.InstanceNorm2d(4)
        self.act = nn.GELU()

    def forward(self, x):
        y = self.act(self.norm(self.conv(x)))  # 2*2*4*n, 4*4n, 4n
        y = y + torch.relu(y)  # neither counted (operator +, torch.relu)
        y = torch.add(y, F.relu(y))  # 4n + 4n
        z = y.mean(dim=(-2, -1), keepdim=True) * y  # not counted
        return z.mul(2.0) @ torch.ones(z.shape[-1], 3)  # 4n; @: 2 * 4n * 3


def test_paper_convention_counts_only_patched_functions():
    conv2d_before, add_before = F.conv2d, torch.Tensor.add
    n = 6 * 5
    pc = paper_count(_Mixed(), (1, 2, 6, 5))
    assert pc.flops == 2 * 2 * 4 * n + 4 * 4 * n + 4 * n + 4 * n + 4 * n + 4 * n + 2 * 4 * n * 3
    assert pc.by_function["F.gelu"] == 4 * n and "torch.relu" not in pc.by_function
    assert pc.mode == "fake" and paper_count(_Mixed(), (1, 2, 6, 5), fake=False).flops == pc.flops
    assert F.conv2d is conv2d_before and torch.Tensor.add is add_before  # patches undone


def test_paper_convention_ndc_is_charged_like_the_official_layer():
    x_shape = (2, 6, 4, 4, 4)
    n = 2 * 64
    lean = paper_count(NDC(6, 3, ratio=2, spatial_dims=3), x_shape)
    ref = paper_count(NDC(6, 3, ratio=2, spatial_dims=3, impl="reference"), x_shape)
    # projection 1x1 (2*MACs + bias) + relu(s0) + relu(h expanded to the batch); no K/A convolution
    expected = (2 * n * 6 * 12 + 12 * n) + 12 * n + 2 * 6 * 2 * 27
    assert lean.flops == ref.flops == expected
    assert lean.opaque_layers == 1


# ------------------------------------------------------------------------------ runtime
def test_memory_tracker_follows_live_storages():
    x = torch.randn(256, 1024)  # 1 MiB
    with TensorMemoryTracker([x]) as tracker:
        y = x * 2
        z = y + 1
        del y
        z.relu_()  # in place: no new storage
        v = z.view(-1)  # a view: no new storage
        w = z * 3
    assert tracker.baseline_bytes == MB
    assert tracker.peak == 3 * MB  # x, y, z at once; y is gone before w
    assert tracker.current == 3 * MB  # x, z, w
    del v, w


def test_measure_runtime_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 1, 1))
    rt = measure_runtime(model, (1, 2, 16, 16, 16), device="cpu", repeats=3, warmup=1)
    assert rt.device == "cpu" and rt.device_name.startswith("cpu") and not rt.errors
    assert len(rt.forward_all_ms) == 3 and len(rt.train_step_all_ms) == 3
    assert rt.forward_ms == float(np.median(rt.forward_all_ms)) and rt.forward_ms > 0
    # forward: weights + input + conv output (1 MiB... 8 x 16^3 x 4 B = 128 KiB) + relu output + head output
    weights = sum(p.numel() for p in model.parameters()) * 4
    act = 16 ** 3 * 4
    assert rt.forward_peak_mb * MB >= weights + 2 * act + 2 * 8 * act
    # training step holds gradients and AdamW state (2 per weight) on top
    assert rt.train_step_peak_mb * MB >= 4 * weights + 2 * act + 2 * 8 * act
    assert rt.train_step_peak_mb > rt.forward_peak_mb
