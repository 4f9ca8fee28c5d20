"""The fused Triton NDC kernels (deconver/nn/ndc_triton.py): on a GPU compiled, elsewhere run by
Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py), which executes the same kernel
code with NumPy, so the indexing, masking and gradient algebra are checked on every machine against
the float64 unfused lean implementation. Speed is measured on a GPU by benchmarks/ndc.py.
"""

import copy

import pytest
import torch

pytest.importorskip("triton")

from deconver.nn import NDC  # noqa: E402
from deconver.nn import ndc_update as ndc_module  # noqa: E402
from deconver.nn.ndc_ops import ndc_adjoint  # noqa: E402
from deconver.nn.ndc_update import NDCUpdate  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # without a GPU: interpreted (tests/conftest.py)


@pytest.fixture
def kernels(monkeypatch):
    """deconver.nn.ndc_triton, used by NDCUpdate on this test's device."""
    from deconver.nn import ndc_triton

    monkeypatch.setattr(ndc_module, "_FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    return ndc_triton


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    "spatial,channels,sc,kernel,relu_input,needs",
    [((5, 6, 7), 3, 4, 3, True, (True, True, True)), ((4, 5, 3), 2, 3, 3, False, (True, True, True)),
     ((6, 7), 2, 2, 5, True, (True, True, True)), ((9,), 2, 4, 3, True, (True, True, True)),
     ((3, 4, 5), 2, 1, 3, True, (True, True, True)), ((4, 5, 3), 2, 4, 3, True, (False, False, True)),
     ((4, 5, 3), 2, 4, 3, True, (True, True, False))],
)
@pytest.mark.parametrize("mode", ["inline", "split"])
@pytest.mark.parametrize("from_output", [False, True], ids=["z-saved", "output-saved"])
def test_kernels_match_float64_lean_update(kernels, spatial, channels, sc, kernel, relu_input, needs, mode,
                                           from_output, monkeypatch):
    """Forward and the requested gradients of one update equal the float64 lean node (1e-6 relative),
    with either backward strategy (DECONVER_NDC_BACKWARD), from the saved pre-activation ``z`` or from
    the saved output (what NDCUpdate keeps when ``x >= 0``)."""
    monkeypatch.setenv("DECONVER_NDC_BACKWARD", mode)
    if mode == "split":  # the separate filter-gradient kernel really runs, and only for dL/dh
        monkeypatch.setattr(kernels, "filter_grad", _counted(kernels.filter_grad, calls := []))
    torch.manual_seed(0)
    d = len(spatial)
    x = torch.rand(2, channels, *spatial, dtype=torch.float64)
    # a later iterate (relu_input False) is nonnegative; the first update's projection is not
    z = torch.randn(2, channels * sc, *spatial, dtype=torch.float64)
    z = z if relu_input else z.abs()
    h = torch.rand(channels, sc, *[kernel] * d, dtype=torch.float64)
    g = torch.randn_like(z)
    xr, zr, hr = (t.clone().requires_grad_() for t in (x, z, h))
    with pytest.MonkeyPatch.context() as mp:  # the float64 expectation from the unfused lean path
        mp.setattr(ndc_module, "_FUSED_DEVICE_TYPES", ())
        expected = NDCUpdate.apply(xr, zr, hr, channels, 1e-16, relu_input)
        expected.backward(g)
    x32, z32, h32, g32 = (t.float().to(DEVICE) for t in (x, z, h, g))
    out, t1 = kernels.update_forward(x32, z32, h32, 1e-16, relu_input)
    assert _rel(out.cpu(), expected.detach()) <= 1e-6
    need_x, need_z, need_h = needs
    saved = out if from_output else z32
    if from_output:
        z32 = None  # the kernels must not need it
    gx, gz, gh = kernels.update_backward(g32, x32, saved, h32, t1, 1e-16, relu_input, need_x, need_z, need_h,
                                         from_output=from_output)
    for got, want, needed in ((gx, xr.grad, need_x), (gz, zr.grad, need_z), (gh, hr.grad, need_h)):
        if needed:
            assert got.shape == want.shape and _rel(got.cpu(), want) <= 1e-6
        else:
            assert got is None
    if mode == "split":
        assert len(calls) == (2 if need_h else 0)


def _counted(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("spatial,sc,kernel,relu,pair", [((20, 20, 21), 4, 3, True, False),
                                                         ((20, 20, 21), 4, 3, False, True),
                                                         ((3, 40), 3, 5, False, True), ((300,), 1, 3, True, False)])
def test_filter_grad_matches_float64_autograd(kernels, spatial, sc, kernel, relu, pair):
    """The filter-gradient kernel equals autograd's gradient of <A(y), f(a)> (pair: minus <A(y2), a*b>)
    in float64 (1e-6), across several chunks with a partial last block (20*20*21 voxels: 2 chunks)."""
    torch.manual_seed(3)
    channels, d = 3, len(spatial)
    a, b = (torch.randn(2, channels * sc, *spatial, dtype=torch.float64) for _ in range(2))
    y, y2 = (torch.randn(2, channels, *spatial, dtype=torch.float64) for _ in range(2))
    h = torch.rand(channels, sc, *[kernel] * d, dtype=torch.float64, requires_grad=True)
    objective = (ndc_adjoint(y, h, channels) * (a.clamp_min(0) if relu else a)).sum()
    if pair:
        objective = objective - (ndc_adjoint(y2, h, channels) * a * b).sum()
    (want,) = torch.autograd.grad(objective, h)
    a, b, y, y2, h32 = (t.detach().float().to(DEVICE) for t in (a, b, y, y2, h))
    got = kernels.filter_grad(a, y, h32, relu, b=b, y2=y2) if pair else kernels.filter_grad(a, y, h32, relu)
    assert got.shape == h.shape and _rel(got.cpu(), want) <= 1e-6


def test_backward_mode_is_checked(kernels, monkeypatch):
    """An unknown DECONVER_NDC_BACKWARD is an error that names the variable and the choices."""
    monkeypatch.setenv("DECONVER_NDC_BACKWARD", "fast")
    with pytest.raises(ValueError, match="DECONVER_NDC_BACKWARD='fast'.*inline, split"):
        kernels.backward_mode()


@pytest.mark.parametrize("batch,num_iters,shift", [(1, 1, 0.0), (2, 2, 0.0), (1, 1, -0.5)],
                         ids=["b1-nonneg", "b2-iters2-nonneg", "b1-signed"])
def test_layer_on_fused_path_matches_reference(kernels, batch, num_iters, shift, monkeypatch):
    """The whole float32 layer through the fused path equals the official formulation run in float64
    (forward 1e-6, every gradient 1e-5 relative; the float64 reference keeps cuDNN's TF32 out). A
    nonnegative input keeps the output for backward (not the pre-activation projection), a signed one
    the projection."""
    calls, modes = [], []
    forward, backward = kernels.update_forward, kernels.update_backward
    monkeypatch.setattr(kernels, "update_forward", lambda *a: calls.append(1) or forward(*a))
    monkeypatch.setattr(kernels, "update_backward", lambda *a, **k: modes.append(k["from_output"]) or backward(*a, **k))
    torch.manual_seed(1)
    layer = NDC(4, 3, ratio=2, num_iters=num_iters, spatial_dims=3).to(DEVICE)
    x = (torch.rand(batch, 4, 6, 5, 4, device=DEVICE) + shift).requires_grad_()
    y = layer(x)
    assert len(calls) == num_iters  # the fused kernels really ran
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], gy)
    reference = copy.deepcopy(layer).double()
    reference.impl = "reference"
    x64 = x.detach().double().requires_grad_()
    y_ref = reference(x64)
    grads_ref = torch.autograd.grad(y_ref, [x64, *reference.parameters()], gy.double())
    assert modes == [shift >= 0] * num_iters
    assert _rel(y, y_ref) <= 1e-6
    for got, want in zip(grads, grads_ref):
        assert _rel(got, want) <= 1e-5


def test_autocast_keeps_the_fused_path_in_float32(kernels, monkeypatch):
    """Under autocast (bfloat16) the layer leaves autocast and the fused float32 kernels run: the output
    is float32 and equals the same layer without autocast (1e-6)."""
    calls = []
    forward = kernels.update_forward
    monkeypatch.setattr(kernels, "update_forward", lambda *a: calls.append(a[0].dtype) or forward(*a))
    torch.manual_seed(4)
    layer = NDC(4, 3, ratio=2, spatial_dims=3).to(DEVICE)
    x = torch.rand(1, 4, 5, 6, 4, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32 and calls == [torch.float32]
    assert _rel(y, layer(x)) <= 1e-6


def test_unsupported_geometry_and_switch_fall_back(kernels, monkeypatch):
    """Grouped (not depth-wise) filters, float64 and DECONVER_NDC_FUSED=0 take the unfused lean path."""

    def fail(*args):
        raise AssertionError("fused kernels used")

    monkeypatch.setattr(kernels, "update_forward", fail)
    torch.manual_seed(2)
    x = torch.rand(2, 4, 5, 5, 5, device=DEVICE)
    NDC(4, 3, groups=2, source_channels=2, spatial_dims=3).to(DEVICE)(x)  # m = 2 filter channels per group
    NDC(4, 3, spatial_dims=3).double().to(DEVICE)(x.double())
    monkeypatch.setenv("DECONVER_NDC_FUSED", "0")
    NDC(4, 3, spatial_dims=3).to(DEVICE)(x)
    monkeypatch.delenv("DECONVER_NDC_FUSED")
    with pytest.raises(AssertionError, match="fused kernels used"):
        NDC(4, 3, spatial_dims=3).to(DEVICE)(x)


@pytest.mark.parametrize("geometry", [[], ["--sc", "1", "--kernel", "5", "--dims", "2", "--size", "40"]])
def test_every_kernel_compiles_for_sm90(tmp_path, geometry):
    """benchmarks/ndc_kernels.py compiles every kernel (both backward strategies) to sm_90 SASS with the
    ptxas in the Triton wheel, no GPU needed: a kernel that only the interpreter accepts fails here.
    Its loop accounting must match the SASS (the tool refuses otherwise)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel has no ptxas")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, root / "benchmarks" / "ndc_kernels.py", "--out", out, *geometry],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["arch"] == "sm_90" and len(report["kernels"]) == 10
    for kernel in report["kernels"]:
        assert 0 < kernel["registers"] <= 255 and kernel["per_voxel"]["instructions"] > 0, kernel["label"]
    assert set(report["totals_per_voxel"]) == {"forward", "inline", "split"}
