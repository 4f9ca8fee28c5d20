"""The NDC layer against its definition (PAPER.md section 1): adjoint, update rule, monotonicity,
gradients, argument checks, determinism. Both implementations are tested; their mutual equivalence
over a large grid is in tests/test_ndc_lean.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from deconver.nn import NDC, NDCUpdate
from deconver.nn.ndc import _batched_conv
from deconver.nn.ndc_ops import (
    adjoint_weight,
    ndc_adjoint,
    ndc_forward_op,
    ndc_update_macs,
)

IMPLS = ("lean", "reference")


pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = {1: (7,), 2: (5, 4), 3: (3, 4, 3)}


def _seed(n: int = 0) -> torch.Generator:
    torch.manual_seed(n)
    return torch.Generator().manual_seed(n)


# ---------------------------------------------------------------------------------------------
# a slow, plainly written reference straight from the formula
# ---------------------------------------------------------------------------------------------
def plain_K(s: torch.Tensor, h: torch.Tensor, groups: int) -> torch.Tensor:
    """K(s)[b, g*m+o, p] = sum_i sum_tap s[b, g*sc+i, p + tap - k//2] * h[g*m+o, i, tap] (zero outside)."""
    b, _, *size = s.shape
    c, sc, *ks = h.shape
    m = c // groups
    out = torch.zeros(b, c, *size, dtype=s.dtype)
    for g, o, i in itertools.product(range(groups), range(m), range(sc)):
        for tap in itertools.product(*(range(k) for k in ks)):
            dst, src = [], []
            for t, k, n in zip(tap, ks, size):
                off = t - k // 2
                lo, hi = max(0, -off), min(n, n - off)
                if lo >= hi:
                    break
                dst.append(slice(lo, hi))
                src.append(slice(lo + off, hi + off))
            else:
                out[(slice(None), g * m + o, *dst)] += s[(slice(None), g * sc + i, *src)] * h[(g * m + o, i, *tap)]
    return out


def dense_K(h: torch.Tensor, groups: int, size) -> torch.Tensor:
    """The matrix of K (for one sample), column j = K(e_j)."""
    n_src = groups * h.shape[1]
    numel = n_src * int(torch.tensor(size).prod())
    basis = torch.eye(numel, dtype=h.dtype).reshape(numel, n_src, *size)
    return plain_K(basis, h, groups).reshape(numel, -1).T  # (C*P, G*sc*P)


def plain_layer(layer: NDC, x: torch.Tensor) -> torch.Tensor:
    """s0 = relu(W x + b); s <- s * (K^T x + eps) / (K^T K s + eps), with K^T the matrix transpose."""
    w, bias = layer.proj.weight, layer.proj.bias
    s = torch.relu(torch.einsum("oc,bc...->bo...", w.flatten(1), x) + bias.view(1, -1, *[1] * (x.dim() - 2)))
    h = torch.relu(layer.h0)
    out = []
    for xb, sb in zip(x, s):
        k_mat = dense_K(h, layer.groups, x.shape[2:])
        xv, sv = xb.reshape(-1), sb.reshape(-1)
        for _ in range(layer.num_iters):
            sv = sv * (k_mat.T @ xv + layer.eps) / (k_mat.T @ (k_mat @ sv) + layer.eps)
        out.append(sv.reshape(sb.shape))
    return torch.stack(out)


def _layer(impl="lean", dtype=torch.float64, **kw) -> NDC:
    layer = NDC(**kw, impl=impl).to(dtype)
    with torch.no_grad():  # a well-conditioned draw: dense positive filter, mostly positive source
        layer.h0.abs_().add_(0.02)
        layer.proj.bias.add_(0.5)
    return layer


# ---------------------------------------------------------------------------------------------
# the operators
# ---------------------------------------------------------------------------------------------
ADJ_CASES = [  # dims, channels, groups, sc, kernel
    (1, 4, -1, 1, 3), (1, 6, 2, 3, 5), (1, 4, 1, 2, 3),
    (2, 4, -1, 4, 3), (2, 8, 2, 1, 3), (2, 6, 3, 2, 5), (2, 4, 1, 3, 3),
    (3, 4, -1, 2, 3), (3, 8, 4, 3, 3), (3, 4, 2, 2, 5),
]


@pytest.mark.parametrize("dims,channels,groups,sc,kernel", ADJ_CASES)
def test_adjoint_is_exact(dims, channels, groups, sc, kernel):
    """<K s, y> = <s, A y> to 1e-10 in float64, for the lean operators and the official ones."""
    gen = _seed(dims * 100 + channels)
    g = channels if groups == -1 else groups
    size = (6, 5, 4)[:dims]
    h = torch.rand(channels, sc, *[kernel] * dims, generator=gen, dtype=torch.float64)
    s = torch.randn(2, g * sc, *size, generator=gen, dtype=torch.float64)
    y = torch.randn(2, channels, *size, generator=gen, dtype=torch.float64)
    lhs = (ndc_forward_op(s, h, g) * y).sum()
    assert torch.allclose(lhs, (s * ndc_adjoint(y, h, g)).sum(), rtol=1e-10, atol=1e-10)
    # the official formulation: per-sample filter, batch folded into B*G groups, A via t(flip(h))
    b, m = 2, channels // g
    hb = h.expand(b, *h.shape).reshape(b * g, m, sc, *h.shape[2:])
    ht = torch.flip(hb, dims=tuple(range(3 - hb.dim(), 0))).transpose(1, 2)
    pad = (kernel // 2,) * dims
    k_ref = _batched_conv(s.reshape(b * g, sc, *size), hb, pad).reshape(b, channels, *size)
    a_ref = _batched_conv(y.reshape(b * g, m, *size), ht, pad).reshape(b, g * sc, *size)
    assert torch.allclose((k_ref * y).sum(), (s * a_ref).sum(), rtol=1e-10, atol=1e-10)
    assert torch.allclose(k_ref, ndc_forward_op(s, h, g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims,channels,groups,sc,kernel", [c for c in ADJ_CASES if c[0] < 3])
def test_operators_match_plain_formula(dims, channels, groups, sc, kernel):
    """K equals the explicit loop formula and A equals the transpose of K's dense matrix."""
    gen = _seed(7)
    g = channels if groups == -1 else groups
    size = (5, 4)[:dims]
    h = torch.rand(channels, sc, *[kernel] * dims, generator=gen, dtype=torch.float64)
    s = torch.randn(1, g * sc, *size, generator=gen, dtype=torch.float64)
    y = torch.randn(1, channels, *size, generator=gen, dtype=torch.float64)
    assert torch.allclose(ndc_forward_op(s, h, g), plain_K(s, h, g), atol=1e-12)
    k_mat = dense_K(h, g, size)
    assert torch.allclose(ndc_adjoint(y, h, g).reshape(-1), k_mat.T @ y.reshape(-1), atol=1e-12)
    assert adjoint_weight(h, g).shape == (g * sc, channels // g, *[kernel] * dims)


def test_macs_formula():
    assert ndc_update_macs((2, 32, 8, 8, 8), (32, 4, 3, 3, 3)) == 3 * 2 * 512 * 32 * 4 * 27


# ---------------------------------------------------------------------------------------------
# the layer against the formula
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dims,channels,groups,ratio,kernel,iters",
    [(1, 4, -1, 2, 3, 1), (1, 6, 2, 1, 5, 2), (2, 4, 2, 2, 3, 1), (2, 4, 1, 0.5, 3, 2), (2, 6, -1, 1, 5, 3)],
)
def test_layer_matches_plain_formula(impl, dims, channels, groups, ratio, kernel, iters):
    _seed(3)
    layer = _layer(impl, channels=channels, kernel_size=kernel, groups=groups, ratio=ratio,
                   num_iters=iters, spatial_dims=dims)
    x = torch.rand(2, channels, *SIZES[dims], dtype=torch.float64)
    with torch.no_grad():
        expected = plain_layer(layer, x)
    assert torch.allclose(layer(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_update_never_increases_reconstruction_error(impl):
    """One multiplicative update never increases ||x - K(s)||^2 (random nonnegative data)."""
    gen = _seed(11)
    worst = -float("inf")
    for draw in range(60):
        dims = 1 + draw % 3
        channels, groups = [(4, -1), (4, 2), (6, 3), (4, 1)][draw % 4]
        layer = NDC(channels, 3 + 2 * (draw % 2), ratio=1 + draw % 3, groups=groups, num_iters=0,
                    spatial_dims=dims, impl=impl).double()
        with torch.no_grad():
            layer.h0.uniform_(-0.5, 1.0, generator=gen)  # relu leaves a sparse nonnegative filter
            h = torch.relu(layer.h0)
            x = torch.rand(2, channels, *SIZES[dims], dtype=torch.float64, generator=gen) ** 2
            s = layer(x)  # s0
            losses = []
            for iters in range(4):
                layer.num_iters = layer.num_grad_iters = iters
                losses.append(((x - ndc_forward_op(layer(x), h, layer.groups)) ** 2).sum().item())
        for before, after in zip(losses, losses[1:]):
            assert after <= before * (1 + 1e-12), (draw, losses)
            worst = max(worst, after - before)
        assert torch.allclose(s, torch.relu(layer.proj(x)), rtol=1e-12, atol=1e-15)
    assert worst <= 0


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relu_input", [True, False])
@pytest.mark.parametrize("dims,channels,groups,sc", [(1, 4, 2, 3), (2, 4, 4, 2), (3, 2, 1, 2)])
def test_ndc_update_gradcheck(dims, channels, groups, sc, relu_input):
    gen = _seed(5)
    size = SIZES[dims]
    x = torch.rand(2, channels, *size, dtype=torch.float64, generator=gen).requires_grad_()
    z = torch.rand(2, groups * sc, *size, dtype=torch.float64, generator=gen) + 0.05
    if relu_input:  # keep away from the kink of relu: |z| >= 0.05
        z = z * torch.where(torch.rand(z.shape, generator=gen) < 0.3, -1.0, 1.0)
    z.requires_grad_()
    h = (torch.rand(channels, sc, *[3] * dims, dtype=torch.float64, generator=gen) + 0.01).requires_grad_()
    fn = lambda x, z, h: NDCUpdate.apply(x, z, h, groups, 1e-16, relu_input)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, z, h), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("iters", [1, 2])
def test_layer_gradcheck(impl, iters):
    """Gradients of the whole layer w.r.t. input and every parameter (float64 finite differences)."""
    _seed(9)
    layer = _layer(impl, channels=4, kernel_size=3, groups=2, ratio=1.5, num_iters=iters, spatial_dims=2)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.rand(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_num_grad_iters_follows_official_semantics(impl):
    """Only the last num_grad_iters updates carry gradients; earlier ones run under no_grad."""
    _seed(2)
    x = torch.rand(1, 4, 6, 5)
    ref = NDC(4, 3, groups=2, num_iters=3, spatial_dims=2, impl=impl)
    out_all = ref(x)
    for k in (0, 1, 2):
        layer = NDC(4, 3, groups=2, num_iters=3, num_grad_iters=k, spatial_dims=2, impl=impl)
        layer.load_state_dict(ref.state_dict())
        out = layer(x)
        assert torch.allclose(out, out_all, rtol=1e-6, atol=0)
        if k == 0:
            assert not out.requires_grad
            continue
        out.sum().backward()
        assert layer.proj.weight.grad is None  # s0 entered through a no_grad update
        assert layer.h0.grad is not None and layer.h0.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# construction and input checks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(channels=4, kernel_size=2), "kernel_size"),
        (dict(channels=4, kernel_size=(3, 4), spatial_dims=2), "kernel_size"),
        (dict(channels=4, kernel_size=(3, 3), spatial_dims=3), "kernel_size"),
        (dict(channels=4, kernel_size=0), "kernel_size"),
        (dict(channels=6, kernel_size=3, groups=4), "groups"),
        (dict(channels=6, kernel_size=3, groups=0), "groups"),
        (dict(channels=6, kernel_size=3, groups=-2), "groups"),
        (dict(channels=4, kernel_size=3, ratio=0), "ratio"),
        (dict(channels=4, kernel_size=3, ratio=-1), "ratio"),
        (dict(channels=4, kernel_size=3, ratio=0.1), "ratio"),
        (dict(channels=4, kernel_size=3, source_channels=0), "source_channels"),
        (dict(channels=0, kernel_size=3), "channels"),
        (dict(channels=4, kernel_size=3, spatial_dims=4), "spatial_dims"),
        (dict(channels=4, kernel_size=3, num_iters=-1), "num_iters"),
        (dict(channels=4, kernel_size=3, num_iters=1, num_grad_iters=2), "num_grad_iters"),
        (dict(channels=4, kernel_size=3, eps=-1.0), "eps"),
        (dict(channels=4, kernel_size=3, impl="fast"), "impl"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NDC(**kwargs)


def test_impl_is_validated_on_assignment():
    layer = NDC(4, 3, spatial_dims=1)
    with pytest.raises(ValueError, match="impl"):
        layer.impl = "triton"


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_names_the_problem(impl):
    layer = NDC(4, 3, spatial_dims=2, impl=impl)
    with pytest.raises(ValueError, match="dimensions"):
        layer(torch.rand(1, 4, 5))
    with pytest.raises(ValueError, match="channels=4"):
        layer(torch.rand(1, 3, 5, 5))


def test_shapes_and_derived_sizes():
    layer = NDC(12, 3, groups=3, ratio=2, spatial_dims=3)
    assert (layer.groups, layer.source_channels, layer.out_channels) == (3, 8, 24)
    assert layer.h0.shape == (12, 8, 3, 3, 3) and layer.proj.weight.shape == (24, 12, 1, 1, 1)
    assert NDC(8, 3, spatial_dims=1).out_channels == 32  # depth-wise, ratio 4 by default
    assert NDC(8, (3, 5), source_channels=3, groups=2, spatial_dims=2).out_channels == 6
    assert NDC(8, 3, spatial_dims=1)(torch.rand(2, 8, 9)).shape == (2, 32, 9)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_is_deterministic_on_cpu(impl):
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        layer = NDC(8, 3, groups=4, spatial_dims=3, impl=impl)
        x = torch.rand(2, 8, 6, 5, 4)
        outs.append(layer(x))
        outs.append(layer(x))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_runs_in_float32(impl):
    _seed(1)
    layer = NDC(4, 3, spatial_dims=2, impl=impl)
    x = torch.rand(1, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, layer(x.bfloat16().float()), rtol=1e-6, atol=0)


def test_traced_graph_names_the_update_node():
    """FLOP counters (fvcore) see the lean update as prim::PythonOp named NDCUpdate."""
    layer = NDC(4, 3, spatial_dims=2, num_iters=2).eval()
    x = torch.rand(1, 4, 6, 6)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            traced = torch.jit.trace(layer, (x,), check_trace=False)
        nodes = [n for n in traced.inlined_graph.nodes() if n.kind() == "prim::PythonOp"]
        assert [n.pyname() for n in nodes] == ["NDCUpdate", "NDCUpdate"]


def test_fvcore_counts_the_update_with_a_handle():
    """The documented handle key and cost formula give the expected total (fvcore: 1 MAC = 1 flop)."""
    fvcore_nn = pytest.importorskip("fvcore.nn")
    layer = NDC(8, 3, spatial_dims=3, num_iters=2)  # depth-wise, ratio 4: sc = 4
    x = torch.rand(1, 8, 6, 6, 6)

    def handle(inputs, outputs):
        return ndc_update_macs(inputs[0].type().sizes(), inputs[2].type().sizes())

    analysis = fvcore_nn.FlopCountAnalysis(layer, (x,)).set_op_handle("prim::PythonOp.NDCUpdate", handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    per_update = 216 * 8 * 4 * 27 * 3  # voxels * C * sc * k^3 * (K, A(x), A(K(s)))
    projection = 216 * 8 * 32  # C -> G*sc, one MAC per weight and voxel
    assert analysis.by_operator()["PythonOp.NDCUpdate"] == 2 * per_update
    assert analysis.total() == 2 * per_update + projection
