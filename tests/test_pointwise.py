"""The Deconver network's 1x1 convolutions as CPU GEMMs (deconver.nn.pointwise): the same values and
gradients as the convolution modules, in the memory layout asked for, without storing ``fn(h)``."""

from __future__ import annotations

import pytest
import torch

from deconver.nn import Deconver, DeconverBlock
from deconver.nn import pointwise as pw

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}


def _layout(t: torch.Tensor) -> str:
    fmt = FORMATS.get(t.dim() - 2)
    return "cl" if fmt and t.is_contiguous(memory_format=fmt) and not t.is_contiguous() else "nc"


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("in_cl", [False, True])
@pytest.mark.parametrize("out_cl", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fn", [None, "norm", "gelu"])
def test_gemm_path_matches_the_convolution(dims, in_cl, out_cl, bias, fn):
    """Values and gradients (input, weight, bias) equal those of ``conv(fn(h))`` through autograd, for
    both input layouts and both output layouts; the output has the layout asked for (NC(D)HW when
    there is no channels-last format) and the input's gradient has the input's layout (through an
    element-wise ``fn``)."""
    if in_cl and dims == 1:
        pytest.skip("no channels-last layout in 1D")
    torch.manual_seed(0)
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims](6, 5, 1, bias=bias).double()
    f = {None: None, "gelu": torch.nn.GELU(),
         "norm": {1: torch.nn.InstanceNorm1d, 2: torch.nn.InstanceNorm2d, 3: torch.nn.InstanceNorm3d}[dims](6)}[fn]
    h = torch.randn(2, 6, *[5, 4, 3][:dims], dtype=torch.float64)
    if in_cl:
        h = h.contiguous(memory_format=FORMATS[dims])
    h.requires_grad_()
    gy = torch.randn(2, 5, *h.shape[2:], dtype=torch.float64)
    ref = conv(h if f is None else f(h))
    ref_grads = torch.autograd.grad(ref, [h, *conv.parameters()], gy)
    assert pw._gemm_ok(h)
    out = pw.pointwise(h, conv, fn=f, channels_last=out_cl)
    assert out.grad_fn.name() == "_PointwiseBackward"
    assert _layout(out) == ("cl" if out_cl and dims > 1 else "nc")
    grads = torch.autograd.grad(out, [h, *conv.parameters()], gy)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    if fn != "norm":  # (a normalisation's backward picks its own layout)
        assert _layout(grads[0]) == _layout(h)
    with torch.no_grad():  # a requested layout takes the GEMM path without gradients too
        assert torch.allclose(pw.pointwise(h, conv, fn=f, channels_last=out_cl), ref, rtol=1e-12, atol=1e-12)


def test_gemm_path_writes_its_output_in_place(monkeypatch):
    """A column-major (channels-last) output matrix is computed as the transposed product, written by
    BLAS in place: no copy of the output (aten::copy_) beyond the bias broadcast."""
    h = torch.randn(1, 8, 6, 5, 4)
    w = torch.randn(16, 8, 1, 1, 1)
    with torch.profiler.profile() as prof:
        out = pw._gemm_forward(h, w, None, channels_last=True)
    assert _layout(out) == "cl"
    assert not [e for e in prof.events() if e.name == "aten::copy_"]
    assert torch.allclose(out, torch.nn.functional.conv3d(h, w), atol=1e-5)


@pytest.mark.parametrize("impl", ["lean", "reference"])
def test_network_on_the_gemm_path_matches_the_convolutions(impl, monkeypatch):
    """The whole network (blocks, decoder adapters, head) trains to the same values and gradients with
    the GEMM path as with PyTorch's convolutions (``_gemm_ok`` forced off)."""
    torch.manual_seed(3)
    net = Deconver(3, 2, 2, channels=(4, 8), ndc_impl=impl).double()
    x = torch.rand(2, 2, 8, 6, 4, dtype=torch.float64)
    gy = torch.randn(2, 2, 8, 6, 4, dtype=torch.float64)
    runs = []
    for gemm in (True, False):
        monkeypatch.setattr(pw, "_gemm_ok", lambda h, gemm=gemm: gemm)
        y = net(x)
        runs.append((y, torch.autograd.grad(y, list(net.parameters()), gy)))
    (y0, g0), (y1, g1) = runs
    assert torch.allclose(y0, y1, rtol=1e-10, atol=1e-12)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_block_mixer_runs_channels_last_without_layout_copies():
    """In training on the CPU the lean mixer's input projection writes channels-last and its output
    projection answers NC(D)HW: no layout conversion (aten::copy_ of a block-sized tensor) in the block's
    forward and backward, and the block's output keeps the input's NC(D)HW layout."""
    torch.manual_seed(4)
    block = DeconverBlock(8, spatial_dims=3)
    x = torch.rand(1, 8, 8, 8, 8, requires_grad=True)
    with torch.profiler.profile(record_shapes=True) as prof:
        y = block(x)
        y.backward(torch.ones_like(y))
    assert y.is_contiguous()
    big = [e for e in prof.events() if e.name == "aten::copy_" and e.input_shapes and e.input_shapes[0][2:] == [8, 8, 8]]
    assert not big, [e.input_shapes for e in big]


@pytest.mark.parametrize("bias", [False, True])
def test_concatenation_is_read_in_parts(bias):
    """``pointwise_cat((a, b), conv)`` equals ``conv(cat((a, b)))`` in value and in every gradient (parts of
    either layout), and keeps the parts, not their concatenation, for backward."""
    torch.manual_seed(5)
    conv = torch.nn.Conv3d(7, 4, 1, bias=bias).double()
    a = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 4, 5, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    b.requires_grad_()
    gy = torch.randn(2, 4, 4, 5, 3, dtype=torch.float64)
    ref = conv(torch.cat([a, b], dim=1))
    ref_grads = torch.autograd.grad(ref, [a, b, *conv.parameters()], gy)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = pw.pointwise_cat((a, b), conv)
    assert (2, 7, 4, 5, 3) not in saved and (2, 3, 4, 5, 3) in saved
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    for x, y in zip(torch.autograd.grad(out, [a, b, *conv.parameters()], gy), ref_grads):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)
