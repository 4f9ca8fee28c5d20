"""Instance normalisation of channels-last CPU tensors (deconver.nn.norm and its native kernels): the
values and gradients of ``F.instance_norm`` on NC(D)HW, in float64, for channels-last inputs of batch 1
and 2 (PyTorch's own backward is wrong for channels-last inputs of batch 1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deconver.nn import ndc_cpu
from deconver.nn import norm as nrm

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}
GEOMETRIES = [(1, 5, (7, 6)), (2, 16, (5, 4)), (1, 8, (4, 6, 5)), (2, 24, (3, 5, 7)), (1, 64, (16, 16, 16))]


def _reference(x: torch.Tensor, gy: torch.Tensor, eps: float):
    """Values and the input's gradient in float64 on NC(D)HW tensors."""
    xd = x.detach().double().contiguous().requires_grad_()
    y = F.instance_norm(xd, eps=eps)
    return y, torch.autograd.grad(y, xd, gy.double().contiguous())[0]


@pytest.fixture
def native():
    if not ndc_cpu.available():
        pytest.skip("native CPU kernels not built (no C++ compiler)")


@pytest.mark.parametrize("batch,channels,spatial", GEOMETRIES)
@pytest.mark.parametrize("offset", [0.0, 50.0])
@pytest.mark.parametrize("threads", [1, 3])
def test_native_norm_matches_float64_reference(native, batch, channels, spatial, offset, threads):
    """Output and input gradient equal float64 ``F.instance_norm`` on NC(D)HW to float32 rounding, also
    with a mean 50 standard deviations away from 0 (the variance is taken around the mean), with one
    and three threads; the output and the gradient are channels-last, and the node is the native one."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    fmt = FORMATS[len(spatial)]
    x = (torch.randn(batch, channels, *spatial) + offset).contiguous(memory_format=fmt).requires_grad_()
    gy = torch.randn(batch, channels, *spatial).contiguous(memory_format=fmt)
    y = nrm.instance_norm(x, 1e-5)
    assert y.grad_fn.name() == "_InstanceNormBackward"
    gx = torch.autograd.grad(y, x, gy)[0]
    ref_y, ref_gx = _reference(x, gy, 1e-5)
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
    scale = 1 + offset  # float32 rounding of x itself, relative to its standard deviation (1)
    assert (y.double() - ref_y).abs().max() < 1e-6 * scale
    assert (gx.double() - ref_gx).abs().max() < 1e-5 * scale * ref_gx.abs().max()


def test_backward_leaves_the_incoming_gradient_alone(native):
    """The autograd node writes its gradient into a buffer of its own, never over the caller's."""
    x = torch.randn(1, 8, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    gy = torch.randn_like(x)
    before = gy.clone()
    torch.autograd.grad(nrm.instance_norm(x), x, gy)
    assert torch.equal(gy, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fallback_is_right_for_channels_last_batch_one(dtype, monkeypatch):
    """Without the native kernels (``DECONVER_NDC_FUSED=0``), or in float64, a channels-last input is
    normalised by composite operations: the gradients are right at batch 1, where PyTorch's own
    channels-last backward is not (PyTorch 2.14.1)."""
    monkeypatch.setenv("DECONVER_NDC_FUSED", "0")
    torch.manual_seed(1)
    x = torch.randn(1, 4, 3, 5, 6, dtype=dtype).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    gy = torch.randn_like(x)
    y = nrm.instance_norm(x)
    assert y.grad_fn.name() != "_InstanceNormBackward"
    gx = torch.autograd.grad(y, x, gy)[0]
    ref_y, ref_gx = _reference(x, gy, 1e-5)
    assert torch.allclose(y.double(), ref_y, atol=1e-5) and torch.allclose(gx.double(), ref_gx, atol=1e-4)


def test_norm_fn_picks_the_native_norm_only_where_it_applies(native):
    """An affine-free InstanceNorm on a channels-last float32 CPU tensor gets the native function, whose
    values equal the module's; on a channels-last float64 one the composite function; an affine norm or
    an NC(D)HW tensor keep the module."""
    cl = torch.randn(2, 8, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    plain = torch.nn.InstanceNorm3d(8)
    fn = nrm.norm_fn(plain, cl)
    assert isinstance(fn, nrm.NativeInstanceNorm) and fn.eps == plain.eps
    assert torch.allclose(fn(cl), plain(cl.contiguous()), atol=1e-6)
    affine = torch.nn.InstanceNorm3d(8, affine=True)
    assert nrm.norm_fn(affine, cl) is affine
    assert nrm.norm_fn(plain, cl.contiguous()) is plain
    composite = nrm.norm_fn(plain, cl.double())  # channels-last float64: not PyTorch's backward either
    assert not isinstance(composite, (nrm.NativeInstanceNorm, torch.nn.Module))
    assert torch.allclose(composite(cl.double()), plain(cl.double().contiguous()), atol=1e-12)


def test_kernels_refuse_a_misread_operand(native):
    """A gradient in the wrong layout is refused with the kernel's name, not read as garbage."""
    x = torch.randn(1, 8, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    y, mean, rstd = ndc_cpu.instance_norm(x, 1e-5)
    with pytest.raises(ValueError, match="instance_norm_backward"):
        ndc_cpu.instance_norm_backward(x, torch.randn(1, 8, 4, 4, 4), mean, rstd)
