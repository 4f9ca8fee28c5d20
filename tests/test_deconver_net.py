"""The Deconver network: exact parameter counts of the presets, shapes, input and argument checks."""

from __future__ import annotations

import doctest

import pytest
import torch

import deconver
from deconver.nn import NDC, PRESETS, DeconvMixer, Deconver, DeconverBlock


pytestmark = pytest.mark.usefixtures("one_thread")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


EXPECTED = {  # PAPER.md section 2
    "isles22": 10_476_545,
    "brats23": 10_553_859,
    "glas": 20_794_785,
    "fives": 20_794_785,
    "isles22-bundle": 7_811_073,
    "brats23-bundle": 7_812_867,
    "fives-bundle": 6_449_953,
}


def test_presets_are_the_documented_ones():
    assert set(PRESETS) == set(EXPECTED)
    for name, entry in PRESETS.items():
        assert set(entry) == {"kwargs", "params", "note"}, name
        assert entry["params"] == EXPECTED[name] and entry["note"], name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parameter_counts_are_exact(name):
    assert _count(Deconver.from_preset(name)) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_output_shape_on_the_smallest_input(name):
    torch.manual_seed(0)
    net = Deconver.from_preset(name)
    kw = PRESETS[name]["kwargs"]
    # the smallest training input: one divisor per axis, two along the last (InstanceNorm needs
    # more than one voxel at the deepest stage)
    size = (net.divisor,) * (kw["spatial_dims"] - 1) + (2 * net.divisor,)
    x = torch.randn(1, kw["in_channels"], *size)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, kw["out_channels"], *size)
    assert torch.isfinite(y).all()


def test_divisor_and_non_divisible_input():
    net = Deconver(3, 1, 2, channels=(4, 8, 8))
    assert net.divisor == 4
    assert Deconver.from_preset("glas").divisor == 32
    with pytest.raises(ValueError, match=r"\(8, 6, 8\).*divisor 4"):
        net(torch.rand(1, 1, 8, 6, 8))
    with pytest.raises(ValueError, match="dimensions"):
        net(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="in_channels=1"):
        net(torch.rand(1, 3, 8, 8, 8))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(spatial_dims=4), "spatial_dims"),
        (dict(in_channels=0), "in_channels"),
        (dict(out_channels=-1), "out_channels"),
        (dict(channels=()), "channels"),
        (dict(channels=(8, 0)), "channels"),
        (dict(depths=(1, 1, 1)), "depths"),
        (dict(depths=-1), "depths"),
        (dict(decoder_depths=(1, 1)), "decoder_depths"),
        (dict(kernel_size=4), "kernel_size"),
        (dict(groups=3), "groups"),
        (dict(groups=0), "groups"),
        (dict(ratio=0), "ratio"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(dropout=1.0), "dropout"),
        (dict(ndc_impl="fast"), "ndc_impl"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    base = dict(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16))
    with pytest.raises(ValueError, match=name):
        Deconver(**{**base, **kwargs})


def test_unknown_preset_lists_the_names():
    with pytest.raises(KeyError, match="brats23"):
        Deconver.from_preset("brats")


def test_preset_overrides_win():
    net = Deconver.from_preset("brats23", channels=(8, 16), ndc_impl="reference", out_channels=2)
    assert net.channels == (8, 16) and net.ndc_impl == "reference" and net.out_channels == 2


def test_architecture_follows_the_paper():
    net = Deconver(3, 4, 3, channels=(8, 16, 32), depths=(1, 2, 1), kernel_size=3)
    assert net.stem.kernel_size == (3, 3, 3) and net.stem.bias is None
    assert isinstance(net.encoder[0].downsample, torch.nn.Identity)
    down = net.encoder[1].downsample
    assert (down.kernel_size, down.stride, down.bias is not None) == ((2, 2, 2), (2, 2, 2), True)
    assert len(net.encoder[1].blocks) == 2 and len(net.decoder[1].blocks) == 2  # decoder = depths[:-1]
    dec = net.decoder[0]
    assert (dec.upsample.in_channels, dec.upsample.out_channels, dec.upsample.stride) == (16, 8, (2, 2, 2))
    assert (dec.adapter.in_channels, dec.adapter.out_channels, dec.adapter.bias) == (16, 8, None)
    assert net.head.kernel_size == (1, 1, 1) and net.head.out_channels == 3
    block = net.encoder[0].blocks[0]
    assert isinstance(block, DeconverBlock) and isinstance(block.mixer, DeconvMixer)
    assert isinstance(block.norm1, torch.nn.InstanceNorm3d) and not block.norm1.affine
    mixer = block.mixer
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is not None
    assert isinstance(mixer.ndc, NDC) and mixer.ndc.groups == 8 and mixer.ndc.source_channels == 4
    assert mixer.out_proj.in_channels == 32  # G * sc
    assert block.mlp[0].out_channels == 32 and isinstance(block.mlp[1], torch.nn.GELU)


def test_block_is_a_pre_norm_residual_pair():
    torch.manual_seed(1)
    block = DeconverBlock(4, spatial_dims=2, kernel_size=3)
    x = torch.randn(2, 4, 6, 6)
    y = x + block.mixer(block.norm1(x))
    assert torch.allclose(block(x), y + block.mlp(block.norm2(y)), atol=1e-6)


def test_impls_agree_on_the_whole_network_and_share_state_dicts():
    torch.manual_seed(2)
    net = Deconver(2, 2, 2, channels=(4, 8), kernel_size=5, groups=2, ratio=2).double()
    x = torch.randn(2, 2, 8, 12, dtype=torch.float64)
    outs, grads = {}, {}
    for impl in ("lean", "reference"):
        net.ndc_impl = impl
        net.zero_grad()
        outs[impl] = net(x)
        outs[impl].square().mean().backward()
        grads[impl] = [p.grad.clone() for p in net.parameters()]
    assert torch.allclose(outs["lean"], outs["reference"], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads["lean"], grads["reference"]):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    other = Deconver(2, 2, 2, channels=(4, 8), kernel_size=5, groups=2, ratio=2, ndc_impl="reference").double()
    other.load_state_dict(net.state_dict())
    assert torch.allclose(other(x), outs["lean"], rtol=1e-10, atol=1e-12)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(3)
    net = Deconver(3, 1, 2, channels=(4, 8), depths=(1, 1))
    net(torch.randn(1, 1, 4, 4, 4)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("impl", ["lean", "reference"])
def test_forward_is_deterministic_on_cpu(impl):
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        net = Deconver(3, 2, 1, channels=(4, 8), ndc_impl=impl)
        outs.append(net(torch.randn(1, 2, 8, 8, 8)))
    assert torch.equal(outs[0], outs[1])


def test_1d_network_and_package_export():
    assert deconver.Deconver is Deconver
    net = Deconver(1, 3, 2, channels=(4, 8, 16), depths=(1, 0, 1))
    assert net(torch.randn(2, 3, 16)).shape == (2, 2, 16)


def test_docstring_examples_run():
    for obj in (Deconver, Deconver.from_preset, NDC):
        finder = doctest.DocTestFinder(recurse=False)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        for test in finder.find(obj, globs={"torch": torch, "Deconver": Deconver, "NDC": NDC}):
            runner.run(test)
        assert runner.failures == 0 and runner.tries > 0, obj


@pytest.mark.parametrize("dims", [2, 3])
def test_block_keeps_no_normalised_input_nor_hidden_activation(dims):
    """The block recomputes its two normalisations and the MLP's GELU in backward instead of storing
    them: the same output and gradients (to float32 rounding) as the plain modules
    (``x + mixer(norm1(x))``, ``y + mlp(norm2(y))``), and two normalised inputs (``C`` channels each)
    plus one hidden activation (``mlp_ratio * C``) fewer elements kept for backward."""
    torch.manual_seed(0)
    block = DeconverBlock(8, spatial_dims=dims)
    x = torch.rand(2, 8, *[6] * dims, requires_grad=True)
    gy = torch.randn_like(x)

    def run(plain: bool):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            if plain:
                y = x + block.mixer(block.norm1(x))
                y = y + block.mlp(block.norm2(y))
            else:
                y = block(x)
        grads = torch.autograd.grad(y, [x, *block.parameters()], gy)
        return y, grads, sum(saved)

    y0, g0, n0 = run(plain=True)
    y1, g1, n1 = run(plain=False)
    assert torch.allclose(y0, y1, rtol=1e-5, atol=1e-6)  # (the block's 1x1 convolutions are GEMMs on the CPU)
    assert all((a - b).abs().max() < 1e-5 * b.abs().max() for a, b in zip(g0, g1))  # float32 rounding
    assert n0 - n1 >= (2 + 4) * 2 * 8 * 6 ** dims


def test_residual_stream_keeps_its_dtype_under_autocast():
    """Under bf16 autocast the block's residual sums stay float32, as ``x + branch`` gives (a branch's
    output is bf16 there, so it is not summed in place), in training and without gradients alike; and
    the backward of a float32 input runs (the recomputed norm's gradient through autocast's cast)."""
    torch.manual_seed(2)
    block = DeconverBlock(8, spatial_dims=3)
    x = torch.rand(1, 8, 4, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    y.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y_eval = block(x)
    assert y.dtype == y_eval.dtype == x.grad.dtype == torch.float32
