"""The lean NDC implementation (NDCUpdate) against the reference (official) formulation."""

from __future__ import annotations

import itertools

import pytest
import torch

from deconver.nn import NDC, NDCUpdate

SIZES = {1: (7,), 2: (5, 4), 3: (3, 4, 3)}
GRID = list(itertools.product((1, 2, 3), (-1, 1, 2, 4), (1, 2, 4), (3, 5), (1, 3), (1, 2)))


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _run(layer: NDC, x: torch.Tensor, gy: torch.Tensor, impl: str) -> dict[str, torch.Tensor]:
    layer.impl = impl
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(gy)
    out = {"output": y.detach(), "x": x.grad}
    out.update({name: p.grad for name, p in layer.named_parameters()})
    return out


def _case(dims, groups, ratio, kernel, batch, iters, dtype, seed=0):
    torch.manual_seed(seed)
    layer = NDC(8, kernel, ratio=ratio, groups=groups, num_iters=iters, spatial_dims=dims).to(dtype)
    with torch.no_grad():  # a well-conditioned draw: dense positive filter, mostly positive source
        layer.h0.abs_().add_(0.02)
        layer.proj.bias.add_(0.5)
    x = torch.rand(batch, 8, *SIZES[dims], dtype=dtype)
    gy = torch.randn(batch, layer.out_channels, *SIZES[dims], dtype=dtype)
    return layer, x, gy


@pytest.mark.parametrize("dims,groups,ratio,kernel,batch,iters", GRID)
def test_lean_matches_reference(dims, groups, ratio, kernel, batch, iters):
    """Forward within 1e-6 and every gradient within 1e-4 (float32); all within 1e-10 (float64)."""
    for dtype, tol_out, tol_grad in ((torch.float32, 1e-6, 1e-4), (torch.float64, 1e-10, 1e-10)):
        layer, x, gy = _case(dims, groups, ratio, kernel, batch, iters, dtype)
        lean, ref = _run(layer, x, gy, "lean"), _run(layer, x, gy, "reference")
        assert set(lean) == {"output", "x", "h0", "proj.weight", "proj.bias"}
        assert _rel(lean["output"], ref["output"]) <= tol_out, dtype
        for name in ("x", "h0", "proj.weight", "proj.bias"):
            assert lean[name] is not None and ref[name] is not None, name
            assert _rel(lean[name], ref[name]) <= tol_grad, (name, dtype, _rel(lean[name], ref[name]))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_state_dicts_are_interchangeable(dims):
    torch.manual_seed(4)
    lean = NDC(8, 3, groups=2, ratio=2, spatial_dims=dims, impl="lean")
    ref = NDC(8, 3, groups=2, ratio=2, spatial_dims=dims, impl="reference")
    assert lean.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(lean.state_dict())
    x = torch.rand(2, 8, *SIZES[dims])
    assert _rel(lean(x), ref(x)) <= 1e-6
    lean.load_state_dict(ref.state_dict())  # and back
    assert _rel(lean(x), ref(x)) <= 1e-6


@pytest.mark.parametrize("impl", ["lean", "reference"])
def test_no_grad_forward_matches_grad_forward(impl):
    torch.manual_seed(5)
    layer = NDC(8, 3, groups=4, num_iters=2, spatial_dims=3, impl=impl)
    x = torch.rand(2, 8, 4, 3, 5)
    with torch.no_grad():
        a = layer(x)
    assert torch.equal(a, layer(x).detach())


def _saved_bytes(layer: NDC, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward during ``layer(x)``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


def test_lean_keeps_only_x_projection_and_ks_for_backward():
    """Saved for backward: x, z (pre-activation projection), K(s) and the small filter/weights."""
    torch.manual_seed(6)
    b, c, size = 2, 8, (6, 6, 6)
    layer = NDC(c, 3, spatial_dims=3)  # depth-wise, ratio 4: G*sc = 4C
    x = torch.rand(b, c, *size, requires_grad=True)
    unit = 4 * b * c * 216  # bytes of one (B, C, *S) float32 tensor
    small = 4 * sum(p.numel() for p in layer.parameters())
    lean = _saved_bytes(layer, x)
    assert lean <= unit * (1 + 4 + 1) + 2 * small  # x, z (4 units), K(s)
    layer.impl = "reference"
    assert _saved_bytes(layer, x) >= 2 * lean


def test_double_backward_is_refused():
    torch.manual_seed(7)
    layer = NDC(4, 3, spatial_dims=1)
    x = torch.rand(1, 4, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="twice differentiable"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    layer.impl = "reference"  # the reference formulation is plain autograd: twice differentiable
    (g,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    g.sum().backward()


def test_update_function_skips_unneeded_gradients():
    torch.manual_seed(8)
    x = torch.rand(1, 4, 6)
    z = torch.randn(1, 8, 6, requires_grad=True)
    h = torch.rand(4, 2, 3)
    out = NDCUpdate.apply(x, z, h, 4, 1e-16, True)
    (gz,) = torch.autograd.grad(out.sum(), z)
    assert gz.shape == z.shape and x.grad is None


@pytest.mark.parametrize("dims", [2, 3])
def test_lean_computes_channels_last_on_cpu(dims):
    torch.manual_seed(9)
    layer = NDC(8, 3, spatial_dims=dims)
    x = torch.rand(2, 8, *SIZES[dims])
    y = layer(x)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    assert y.is_contiguous(memory_format=fmt)
    layer.impl = "reference"
    assert _rel(y, layer(x)) <= 1e-6


@pytest.mark.parametrize("slabs", [True, False])
@pytest.mark.parametrize(
    "dims,size,sc,kernel", [(3, (20, 6, 5), 4, 3), (3, (17, 4, 4), 3, 5), (3, (2, 4, 4), 3, 5), (2, (9, 7), 2, 3)]
)
def test_depthwise_k_by_slabs_matches_grouped_convolution(dims, size, sc, kernel, slabs, monkeypatch):
    """The CPU channels-last K (depth-wise convolution + sum, in slabs) equals the grouped one."""
    import deconver.nn.ndc_ops as ndc_ops
    from deconver.nn.ndc_ops import _k_op, ndc_forward_op

    monkeypatch.setattr(ndc_ops, "_SLAB_BYTES", 0 if slabs else 2**40)
    torch.manual_seed(10)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    s = torch.rand(2, 6 * sc, *size, dtype=torch.float64).contiguous(memory_format=fmt)
    h = torch.rand(6, sc, *[kernel] * dims, dtype=torch.float64)
    out = _k_op(s, h, 6)
    assert out.is_contiguous(memory_format=fmt)
    assert torch.allclose(out, ndc_forward_op(s.contiguous(), h, 6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shift", [0.0, 0.3])
@pytest.mark.parametrize("num_iters", [1, 2])
@pytest.mark.parametrize("dims,size,kernel", [(3, (7, 5, 4), 3), (3, (4, 3, 5), 5), (2, (9, 6), 3)])
def test_update_by_slabs_matches_reference(dims, size, kernel, num_iters, shift, monkeypatch):
    """The CPU channels-last update, forward and backward, computed slab by slab (one-row slabs here, a
    batch of two: inner slabs without padding, border slabs padded) gives the reference's output and
    gradients, with a nonnegative input (the backward from the output) and a signed one (from z)."""
    import deconver.nn.ndc_ops as ndc_ops

    monkeypatch.setattr(ndc_ops, "_SLAB_BYTES", 0)
    torch.manual_seed(13)
    layer = NDC(6, kernel, ratio=2, num_iters=num_iters, spatial_dims=dims).double()
    x = (torch.rand(2, 6, *size, dtype=torch.float64) - shift).requires_grad_()
    y = layer(x)
    gy = torch.randn_like(y)
    lean = (y, *torch.autograd.grad(y, [x, *layer.parameters()], gy))
    layer.impl = "reference"
    y = layer(x)
    ref = (y, *torch.autograd.grad(y, [x, *layer.parameters()], gy))
    for a, b in zip(lean, ref):
        assert ((a - b).norm() / b.norm()).item() <= 1e-10


@pytest.mark.parametrize("groups,m,sc", [(8, 1, 4), (8, 1, 1), (4, 2, 3), (16, 1, 2), (2, 4, 4)])
def test_merged_filter_gradient_matches_autograd(groups, m, sc):
    """Filter gradients taken with merged (block-diagonal) groups equal autograd's."""
    from deconver.nn.ndc_ops import _adjoint_filter_grad, _wgrad_merge

    torch.manual_seed(11)
    c = groups * m
    x = torch.rand(2, c, 5, 6, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    gy = torch.randn(2, groups * sc, 5, 6, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    wa = torch.rand(groups * sc, m, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.conv3d(x, wa, padding=1, groups=groups).backward(gy)
    assert _wgrad_merge(groups, m, sc) > 1  # the merged path is the one exercised
    assert torch.allclose(_adjoint_filter_grad(x, gy, wa.detach(), groups), wa.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("num_iters", [1, 2])
def test_backward_from_output_or_projection_matches_reference(nonnegative, num_iters, monkeypatch):
    """With x >= 0 the node keeps its output instead of z and recovers s = out * D / N in backward
    (one source-sized tensor less); with a negative input (N may vanish) it keeps z. Both give the
    float64 reference's gradients."""
    import deconver.nn.ndc_update as ndc_update

    calls = []
    original = ndc_update._lean_backward
    monkeypatch.setattr(ndc_update, "_lean_backward", lambda *a: calls.append(a[8]) or original(*a))
    torch.manual_seed(12)
    layer = NDC(6, 3, ratio=2, num_iters=num_iters, spatial_dims=3).double()
    x = torch.rand(2, 6, 5, 4, 6, dtype=torch.float64)
    x = (x if nonnegative else x - 0.3).requires_grad_()
    gy = torch.randn_like(layer(x))
    lean = torch.autograd.grad(layer(x), [x, *layer.parameters()], gy)
    assert calls == [nonnegative] * num_iters  # from_output: the output kept instead of z
    layer.impl = "reference"
    ref = torch.autograd.grad(layer(x), [x, *layer.parameters()], gy)
    for a, b in zip(lean, ref):
        assert ((a - b).norm() / b.norm()).item() <= 1e-10


def test_update_overwrites_the_callers_projection_when_allowed():
    """``own_z=True`` (the layer's first update, whose ``z`` is its own projection): with ``x >= 0`` on the
    CPU slab path the update is computed in ``z``'s memory and returned as ``z`` — no new source-sized
    tensor — with the same output and gradients as without it; with a negative ``x`` (``z`` needed in
    backward) ``z`` is left alone."""
    from deconver.nn.ndc_update import NDCUpdate

    torch.manual_seed(14)
    h = torch.rand(6, 2, 3, 3, 3, dtype=torch.float64)
    for shift in (0.0, 0.3):
        x = (torch.rand(2, 6, 5, 4, 3, dtype=torch.float64) - shift).contiguous(memory_format=torch.channels_last_3d)
        w = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
        gy = torch.randn(2, 12, 5, 4, 3, dtype=torch.float64)
        runs = []
        for own in (False, True):
            z = torch.einsum("oc,bcdhw->bodhw", w, x).contiguous(memory_format=torch.channels_last_3d)
            ptr = z.data_ptr()
            out = NDCUpdate.apply(x, z, h, 6, 1e-16, True, own)
            runs.append((out.detach().clone(), torch.autograd.grad(out, w, gy)[0], out.data_ptr() == ptr))
        assert torch.allclose(runs[0][0], runs[1][0], rtol=1e-12, atol=1e-14)
        assert torch.allclose(runs[0][1], runs[1][1], rtol=1e-10, atol=1e-12)
        assert not runs[0][2] and runs[1][2] == (shift == 0.0)
