"""The Deconver network's 1x1 convolutions as CPU GEMMs (deconver.nn.pointwise): the same values and
gradients as the convolution modules, in the memory layout asked for, without storing ``fn(h)``."""

from __future__ import annotations

import pytest
import torch

from deconver.nn import Deconver, DeconverBlock
from deconver.nn import patchconv as pc
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
@pytest.mark.parametrize("batch", [1, 2])
def test_network_on_the_gemm_path_matches_the_convolutions(impl, batch, monkeypatch):
    """The whole network (blocks, decoder adapters, head) trains to the same values and gradients with
    the GEMM path (channels-last blocks, float64: BLAS, the composite norm) as with PyTorch's
    convolutions in NC(D)HW (``_gemm_ok`` forced off), at batch 1 too."""
    torch.manual_seed(3)
    net = Deconver(3, 2, 2, channels=(4, 8), ndc_impl=impl).double()
    x = torch.rand(batch, 2, 8, 6, 4, dtype=torch.float64)
    gy = torch.randn(batch, 2, 8, 6, 4, dtype=torch.float64)
    runs = []
    for gemm in (True, False):
        monkeypatch.setattr(pw, "_gemm_ok", lambda h, gemm=gemm: gemm)
        y = net(x)
        runs.append((y, torch.autograd.grad(y, list(net.parameters()), gy)))
    (y0, g0), (y1, g1) = runs
    assert torch.allclose(y0, y1, rtol=1e-10, atol=1e-12)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_block_trains_channels_last_without_layout_copies():
    """In training on the CPU a block computes channels-last: a channels-last input goes through the
    block's forward and backward without a layout conversion (no aten::copy_ of a block-sized tensor)
    and comes out channels-last; an NC(D)HW input is converted once, at the block's entry."""
    torch.manual_seed(4)
    block = DeconverBlock(8, spatial_dims=3)
    x = torch.rand(1, 8, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    with torch.profiler.profile(record_shapes=True) as prof:
        y = block(x)
        y.backward(torch.ones_like(y))
    assert _layout(y) == "cl" and _layout(x.grad) == "cl"
    big = [e for e in prof.events()
           if e.name == "aten::copy_" and e.input_shapes and e.input_shapes[0][2:] == [8, 8, 8]]
    assert not big, [e.input_shapes for e in big]
    assert _layout(block(torch.rand(1, 8, 8, 8, 8, requires_grad=True))) == "cl"
    with torch.no_grad():  # inference keeps the plain modules and NC(D)HW
        assert _layout(block(torch.rand(1, 8, 8, 8, 8))) == "nc"


@pytest.mark.parametrize("dims,threads,native", [(3, 1, True), (2, 1, True), (3, 2, True), (3, 1, False)])
def test_float32_training_path_matches_float64(monkeypatch, dims, threads, native):
    """The float32 CPU training path (channels-last blocks; oneDNN's products, the native norms and
    weight gradients, the chunked GELU, the stride-2 convolutions on patches; each asserted to have run)
    gives the float64 NC(D)HW convolutions' values and gradients to float32 rounding, at batch 1 and 2,
    in 2D and 3D, with one and two threads; and so does it without the native kernels
    (``DECONVER_NDC_FUSED=0``: composite norms, BLAS weight gradients)."""
    torch.manual_seed(6)
    torch.set_num_threads(threads)
    if not native:
        monkeypatch.setenv("DECONVER_NDC_FUSED", "0")
    net = Deconver(dims, 2, 2, channels=(16, 32))
    ref = Deconver(dims, 2, 2, channels=(16, 32)).double()
    ref.load_state_dict(net.state_dict())
    monkeypatch.setattr(pw, "_CHUNK_BYTES", 4096)  # several GELU chunks
    kernel, calls = pw.ndc_cpu.weight_grad, []
    monkeypatch.setattr(pw.ndc_cpu, "weight_grad", lambda *args: calls.append(args) or kernel(*args))
    spatial = [8, 6, 4][:dims]
    for batch in (1, 2):
        x = torch.rand(batch, 2, *spatial)
        gy = torch.randn(batch, 2, *spatial)
        with torch.profiler.profile() as prof:
            y = net(x)
            grads = torch.autograd.grad(y, list(net.parameters()), gy)
        names = {e.name for e in prof.events()}
        assert {"mkldnn::_linear_pointwise", "_PatchConv"} <= names, names
        assert ("_InstanceNorm" in names) == native
        assert bool(calls) == native  # the native weight-gradient kernel (through ctypes: not in the profile)
        with monkeypatch.context() as m:
            m.setattr(pw, "_gemm_ok", lambda h: False)
            y_ref = ref(x.double())
            ref_grads = torch.autograd.grad(y_ref, list(ref.parameters()), gy.double())
        assert (y.double() - y_ref).abs().max() < 1e-5 * y_ref.abs().max()
        for (name, _), a, b in zip(net.named_parameters(), grads, ref_grads):
            assert (a.double() - b).abs().max() < 1e-4 * b.abs().max(), name


@pytest.mark.parametrize("bias", [False, True])
def test_gelu_linear_in_chunks_matches_the_modules(bias, monkeypatch):
    """``conv1x1(gelu(h))`` chunk by chunk (chunks of 3 voxels here) equals the modules in value and in
    every gradient, without a whole-size GELU output (no aten::gelu on more than a chunk)."""
    monkeypatch.setattr(pw, "_CHUNK_BYTES", 3 * 8 * 4)
    torch.manual_seed(7)
    conv = torch.nn.Conv3d(8, 5, 1, bias=bias)
    h = torch.randn(2, 8, 4, 3, 5).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    gy = torch.randn(2, 5, 4, 3, 5)
    with torch.profiler.profile(record_shapes=True) as prof:
        out = pw.pointwise(h, conv, fn=torch.nn.GELU(), channels_last=True)
        grads = torch.autograd.grad(out, [h, *conv.parameters()], gy)
    gelus = [e.input_shapes[0] for e in prof.events() if e.name == "aten::gelu" and e.input_shapes]
    assert gelus and all(shape == [3, 8] for shape in gelus), gelus
    hd = h.detach().double().requires_grad_()
    convd = torch.nn.Conv3d(8, 5, 1, bias=bias).double()
    convd.load_state_dict(conv.state_dict())
    ref = convd(torch.nn.functional.gelu(hd))
    ref_grads = torch.autograd.grad(ref, [hd, *convd.parameters()], gy.double())
    assert _layout(out) == "cl" and torch.allclose(out.double(), ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a.double(), b, atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_patch_convolution_matches_the_module(dims, transposed):
    """A kernel-2 stride-2 convolution (or its transpose) of a channels-last float32 tensor as a GEMM on
    patches: the module's values and gradients (input, weight, bias), channels-last output."""
    torch.manual_seed(8)
    cls = {(2, False): torch.nn.Conv2d, (3, False): torch.nn.Conv3d,
           (2, True): torch.nn.ConvTranspose2d, (3, True): torch.nn.ConvTranspose3d}[dims, transposed]
    conv, ref_conv = cls(6, 10, 2, stride=2), cls(6, 10, 2, stride=2).double()
    ref_conv.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, *[4, 6, 8][:dims]).contiguous(memory_format=FORMATS[dims]).requires_grad_()
    y = pc.patch_conv(x, conv)
    assert y.grad_fn.name() == "_PatchConvBackward" and _layout(y) == "cl"
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *conv.parameters()], gy)
    xd = x.detach().double().requires_grad_()
    ref = ref_conv(xd)
    ref_grads = torch.autograd.grad(ref, [xd, *ref_conv.parameters()], gy.double())
    assert torch.allclose(y.double(), ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a.double(), b, atol=1e-4)


def test_patch_convolution_falls_back_where_it_does_not_apply():
    """Odd sizes, float64, a stride-1 convolution or no gradients: the module itself, on NC(D)HW."""
    down = torch.nn.Conv3d(4, 8, 2, stride=2)
    cl = torch.randn(1, 4, 4, 6, 8).contiguous(memory_format=torch.channels_last_3d)
    down64 = torch.nn.Conv3d(4, 8, 2, stride=2).double()
    for x, conv in [(cl[:, :, :3], down), (cl.double(), down64), (cl, torch.nn.Conv3d(4, 8, 2))]:
        y = pc.patch_conv(x.requires_grad_() if x.is_leaf else x, conv)
        assert y.grad_fn.name() != "_PatchConvBackward"
        assert torch.allclose(y, conv(x.contiguous()))
    with torch.no_grad():
        assert _layout(pc.patch_conv(cl, down)) == "nc"


def test_onednn_products_can_be_turned_off(monkeypatch):
    """``DECONVER_ONEDNN_LINEAR=0`` leaves every product to BLAS: the same values and gradients."""
    torch.manual_seed(9)
    conv = torch.nn.Conv3d(8, 16, 1)
    h = torch.randn(1, 8, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    runs = []
    for off in ("1", "0"):
        monkeypatch.setenv("DECONVER_ONEDNN_LINEAR", off)
        with torch.profiler.profile() as prof:
            out = pw.pointwise(h, conv, channels_last=True)
            grads = torch.autograd.grad(out, [h, *conv.parameters()], torch.ones_like(out))
        runs.append((out, grads, any(e.name == "mkldnn::_linear_pointwise" for e in prof.events())))
    (o1, g1, used1), (o0, g0, used0) = runs
    assert used1 and not used0
    assert torch.allclose(o1, o0, atol=1e-5) and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g1, g0))


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


def test_product_benchmark_times_both_paths(tmp_path):
    """benchmarks/pointwise.py times each part of the block's three products on both paths at a tiny
    geometry and writes its JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from deconver.nn import ndc_cpu

    if not (pw._onednn_linear() and ndc_cpu.available()):
        pytest.skip("oneDNN's inner product or the native kernels are not available here")
    out = tmp_path / "pointwise.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pointwise.py"
    proc = subprocess.run([sys.executable, script, "--channels", "16", "--size", "6", "--repeats", "1", "--out", out],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [(r["product"], r["part"]) for r in report["results"]] == [
        (p, part) for p in ("16->16", "16->64", "64->16") for part in ("forward", "input gradient", "weight gradient")]
    assert all(r["blas_nc_s"] > 0 and r["channels_last_s"] > 0 for r in report["results"])
    assert "provenance" in report and report["geometry"]["ratio"] == 4


def test_a_broken_onednn_op_falls_back_to_blas_with_a_warning(monkeypatch):
    """Where the private op is missing or computes a wrong product (a future PyTorch may change it), one
    warning says so and the products run in BLAS, with the same values."""
    pw._onednn_probe.cache_clear()
    def wrong(x, w, b, *rest):
        return torch.zeros(x.shape[0], w.shape[0])

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", wrong, raising=False)
    try:
        with pytest.warns(RuntimeWarning, match="wrong product"):
            assert pw._onednn_linear() is None
        h = torch.randn(1, 8, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
        w = torch.randn(16, 8, 1, 1, 1)
        assert torch.allclose(pw._gemm_forward(h, w, None, True), torch.nn.functional.conv3d(h, w), atol=1e-5)
    finally:
        monkeypatch.undo()
        pw._onednn_probe.cache_clear()
