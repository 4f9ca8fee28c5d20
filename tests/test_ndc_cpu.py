"""The native CPU kernels (deconver.nn.ndc_cpu): the NDC update's against float64 convolutions, the
layer on them against the reference formulation, the 1x1 convolutions' weight-gradient kernel against a
float64 product, and their build: cache, fallback, switch (the instance-norm kernels: test_norm.py)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from deconver.nn import NDC, ndc_cpu
from deconver.nn.ndc_ops import _adjoint_filter_grad, adjoint_weight, ndc_adjoint, ndc_forward_op

pytestmark = pytest.mark.usefixtures("one_thread")

# (dims, C, sc, kernel, spatial size): every sc the kernels are built for; one and two blocks of 8
# channels (the blocked loops and their tails); odd, anisotropic and larger-than-the-image kernels
# (rows with no inner voxel); 2D as D = 1
GEOMETRIES = [
    (3, 16, 4, (3, 3, 3), (5, 6, 7)),
    (3, 8, 1, (3, 3, 3), (4, 5, 9)),
    (3, 24, 2, (1, 3, 5), (3, 4, 6)),
    (3, 8, 8, (3, 3, 3), (3, 3, 4)),
    (3, 8, 4, (5, 5, 5), (2, 3, 4)),
    (2, 8, 2, (5, 5), (9, 6)),
    (2, 16, 4, (3, 7), (5, 11)),
    (2, 32, 1, (3, 3), (4, 3)),
]


@pytest.fixture(scope="module")
def kernels():
    if not ndc_cpu.available():
        pytest.skip("the native NDC kernels could not be built here (no C++ compiler?)")
    return ndc_cpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def _operands(dims, c, sc, kernel, size, seed=0):
    """float64 operands (NC(D)HW) and a float32 channels-last converter."""
    torch.manual_seed(seed)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    h = torch.rand(c, sc, *kernel, dtype=torch.float64)
    x = torch.rand(2, c, *size, dtype=torch.float64)
    s = torch.rand(2, c * sc, *size, dtype=torch.float64)
    g = torch.randn(2, c * sc, *size, dtype=torch.float64)

    def cl(t: torch.Tensor) -> torch.Tensor:
        return t.float().contiguous(memory_format=fmt)

    return h, x, s, g, cl


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dims,c,sc,kernel,size", GEOMETRIES)
def test_kernels_match_float64_convolutions(kernels, dims, c, sc, kernel, size, threads):
    """K, the update, the backward's ratios and dL/dz, and the filter gradient, each against the same
    quantity built from float64 grouped convolutions; one thread and three (rows split unevenly)."""
    torch.set_num_threads(threads)
    h, x, s, g, cl = _operands(dims, c, sc, kernel, size)
    eps = 1e-3
    wa = adjoint_weight(h, c)
    h32, wa32 = h.float(), wa.float().contiguous()
    t1 = ndc_forward_op(s, h, c)
    num, den = ndc_adjoint(x, h, c) + eps, ndc_adjoint(t1, h, c) + eps

    k = kernels.k_op(cl(s), h32, scale=-2.0)
    assert k.is_contiguous(memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last)
    assert _rel(k, -2.0 * t1) < 1e-6

    out = kernels.update(cl(x), cl(t1), cl(s), wa32, h32, eps, torch.empty_like(cl(s)))
    assert _rel(out, s * num / den) < 1e-6
    inplace = cl(s)
    assert kernels.update(cl(x), cl(t1), inplace, wa32, h32, eps, inplace) is inplace  # out may be s
    assert _rel(inplace, s * num / den) < 1e-6

    z = s - 0.4  # signed: relu matters
    for relu_input, from_output in itertools.product((False, True), repeat=2):
        r, w = kernels.ratios(cl(x), cl(t1), cl(z), cl(g), wa32, h32, eps, relu_input, from_output)
        assert _rel(r, num / den) < 1e-6
        if from_output:
            expected = g * z / num
        else:
            expected = g * (z / den).clamp_min(0) if relu_input else g * z / den
        assert _rel(w, expected) < 1e-6, (relu_input, from_output)

    gt1 = torch.randn_like(x)
    for relu_input in (False, True):
        gz = kernels.grad_z(cl(num / den), cl(g), cl(gt1), cl(z), wa32, h32, relu_input)
        expected = (num / den) * g + ndc_adjoint(gt1, h, c)
        assert _rel(gz, expected * (z > 0) if relu_input else expected) < 1e-5

    gw = kernels.filter_grad(cl(x), cl(g), wa32, h32)
    assert gw.shape == wa.shape
    assert _rel(gw, _adjoint_filter_grad(x, g, wa, c)) < 1e-5


@pytest.mark.parametrize("num_iters", [1, 2])
@pytest.mark.parametrize("dims,ratio,kernel,shift", [(3, 4, 3, 0.0), (3, 2, 5, 0.3), (2, 4, 3, 0.0), (2, 1, 5, 0.3)])
def test_layer_on_the_kernels_matches_the_reference(kernels, monkeypatch, dims, ratio, kernel, shift, num_iters):
    """A float32 layer whose updates run on the native kernels (checked) gives the float64 reference's
    output and gradients, with a nonnegative input (backward from the output) and a signed one."""
    import deconver.nn.ndc_update as ndc_update

    taken = []
    original = ndc_update._native
    monkeypatch.setattr(ndc_update, "_native", lambda *a: taken.append(original(*a)) or taken[-1])
    torch.manual_seed(21)
    layer = NDC(16, kernel, ratio=ratio, num_iters=num_iters, spatial_dims=dims)
    with torch.no_grad():
        layer.proj.bias.add_(0.3)
    size = (6, 5, 7)[:dims]
    x = torch.rand(2, 16, *size) - shift
    gy = torch.randn(2, layer.out_channels, *size)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    got = (y, *torch.autograd.grad(y, [xg, *layer.parameters()], gy))
    assert taken and all(taken)  # every forward and backward of every update took the kernels

    ref_layer = NDC(16, kernel, ratio=ratio, num_iters=num_iters, spatial_dims=dims, impl="reference").double()
    ref_layer.load_state_dict(layer.state_dict())
    xd = x.double().requires_grad_()
    y = ref_layer(xd)
    ref = (y, *torch.autograd.grad(y, [xd, *ref_layer.parameters()], gy.double()))
    for name, a, b in zip(("output", "x", "h0", "proj.weight", "proj.bias"), got, ref):
        assert _rel(a, b) < 2e-5, name


def test_what_the_kernels_take(kernels):
    """Depth-wise float32 channels-last layers with sc in 1, 2, 4, 8 and C a multiple of 8, nothing else."""
    def case(c=16, sc=4, groups=16, dtype=torch.float32, channels_last=True, dims=3):
        fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
        s = torch.rand(1, c * sc, *(4,) * dims, dtype=dtype)
        s = s.contiguous(memory_format=fmt) if channels_last else s
        return kernels.supported(torch.rand(1, c, *(4,) * dims, dtype=dtype), s,
                                 torch.rand(c, sc, *(3,) * dims, dtype=dtype), groups)

    assert case() and case(sc=1) and case(sc=8) and case(dims=2)
    assert not case(sc=3)  # no kernel instantiated for it
    assert not case(c=12, groups=12)  # not a multiple of 8
    assert not case(groups=4)  # grouped, not depth-wise
    assert not case(dtype=torch.float64)
    assert not case(channels_last=False)


def test_switch_and_failed_build_fall_back_to_convolutions(kernels, monkeypatch, tmp_path):
    """``DECONVER_NDC_FUSED=0`` turns the kernels off; a compiler that fails gives one warning naming it
    and the convolution path, with the same values."""
    import deconver.nn.ndc_update as ndc_update

    torch.manual_seed(22)
    layer = NDC(8, 3, spatial_dims=3)
    x = torch.rand(1, 8, 4, 5, 6)
    native = layer(x)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    s = native.detach()
    h = torch.relu(layer.h0)
    assert ndc_update._native(x_cl, s, h, 8)

    monkeypatch.setenv("DECONVER_NDC_FUSED", "0")
    assert not kernels.available() and not ndc_update._native(x_cl, s, h, 8)
    assert _rel(layer(x), native.double()) < 1e-6
    monkeypatch.delenv("DECONVER_NDC_FUSED")

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DECONVER_KERNEL_CACHE", str(tmp_path / "cache"))
    kernels._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no-such-compiler"):
            assert not kernels.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, not at every call
            assert not kernels.available()
        assert _rel(layer(x), native.double()) < 1e-6
    finally:
        kernels._library.cache_clear()


def test_build_is_cached_per_source_and_written_whole(kernels, monkeypatch, tmp_path):
    """A build goes to the cache under a name hashing the source, flags, compiler and CPU; the next one
    reuses it without compiling; no temporary file is left behind; another source gets another file."""
    import shutil

    monkeypatch.setenv("DECONVER_KERNEL_CACHE", str(tmp_path))
    lib = kernels._build()
    assert lib.parent == tmp_path and lib.suffix == ".so"
    stamp = lib.stat().st_mtime_ns
    assert kernels._build() == lib and lib.stat().st_mtime_ns == stamp
    source = tmp_path / "src" / "ndc_cpu.cpp"
    source.parent.mkdir()
    shutil.copy(kernels.SOURCE, source)
    source.write_text(source.read_text() + "\n// another version\n")
    monkeypatch.setattr(kernels, "SOURCE", source)
    other = kernels._build()
    assert other != lib and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted([lib.name, other.name])


def test_kernel_benchmark_runs_both_paths(kernels, tmp_path):
    """benchmarks/ndc_cpu.py times every step in both forms at a tiny geometry and writes its JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ndc_cpu.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ndc_cpu.py"
    proc = subprocess.run([sys.executable, script, "--channels", "8", "--size", "6", "--repeats", "1", "--out", out],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [r["step"] for r in report["results"]] == ["K(s)", "forward update", "backward ratios", "dL/dz",
                                                      "filter gradient"]
    assert all(r["convolutions_s"] > 0 and r["native_s"] > 0 for r in report["results"])
    assert report["geometry"]["channels"] == 8 and "provenance" in report


def test_operands_the_kernels_would_misread_are_refused(kernels):
    """A tensor in another layout, dtype or shape than the kernel reads is an error naming the operand,
    not a silent misread."""
    h, x, s, g, cl = _operands(3, 8, 4, (3, 3, 3), (4, 5, 6))
    h32 = h.float()
    with pytest.raises(ValueError, match="ndc_k: operand 0"):
        kernels.k_op(s.float(), h32)  # NC(D)HW, not channels-last
    with pytest.raises(ValueError, match="operand 0"):
        kernels.k_op(cl(s).double(), h32)
    with pytest.raises(ValueError, match="ndc_update: operand 1"):
        kernels.update(cl(x), cl(x[:, :, :3]), cl(s), adjoint_weight(h32, 8).contiguous(), h32, 1e-3, cl(s))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("v,o,c", [(1, 8, 16), (1500, 16, 80), (3000, 24, 48), (700, 64, 256), (5000, 256, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_gradient_kernel_matches_float64(kernels, v, o, c, bias, threads):
    """``weight_grad(g, x)`` is ``g^T x`` (and ``g``'s column sums) in float64 to float32 rounding, over
    several voxel blocks, vector widths (one and three vectors of 16 inputs a tile) and output rows."""
    torch.manual_seed(v + o + c)
    torch.set_num_threads(threads)
    g, x = torch.randn(v, o), torch.randn(v, c) + 3.0
    gw, gb = ndc_cpu.weight_grad(g, x, bias)
    ref = g.double().t() @ x.double()
    assert gw.shape == (o, c) and (gw.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    if bias:
        assert torch.allclose(gb.double(), g.double().sum(0), rtol=1e-5, atol=1e-4)
    else:
        assert gb is None


def test_weight_gradient_kernel_takes_only_what_it_reads(kernels):
    """Outputs not a multiple of 8, inputs not a multiple of 16, float64 or transposed operands are
    refused (the caller then uses BLAS)."""
    g, x = torch.randn(40, 16), torch.randn(40, 32)
    assert ndc_cpu.weight_grad_supported(g, x)
    for a, b in [(torch.randn(40, 12), x), (g, torch.randn(40, 24)), (g.double(), x.double()),
                 (torch.randn(16, 40).t(), x)]:
        assert not ndc_cpu.weight_grad_supported(a, b)
        with pytest.raises(ValueError, match="weight_grad"):
            ndc_cpu.weight_grad(a, b, True)
