"""Activation checkpointing (`checkpointing: true` in a study's model_overrides): Deconver's own, MONAI's
SwinUNETR ``use_checkpoint`` and MONAI's CheckpointUNet. The option must not change the computation
(same outputs and gradients as without it) and must really keep fewer tensors for backward."""

from __future__ import annotations

import pytest
import torch

from deconver import registry
from deconver.nn import Deconver

pytestmark = pytest.mark.usefixtures("one_thread")

# (model, spatial dims, roi, in, out, kwargs, most bytes saved for backward with checkpointing as a
# fraction of those without): small configurations of the registered models. SwinUNETR checkpoints its
# Swin blocks only (its convolutional encoder and decoder are not), hence its higher fraction.
CASES = [
    ("deconver", 3, (16, 16, 16), 2, 3, dict(channels=[8, 16, 32], dropout=0.2), 0.5),
    ("deconver", 2, (32, 32), 3, 1, dict(channels=[8, 16, 32], kernel_size=5), 0.5),
    ("swin_unetr", 2, (32, 64), 2, 2, dict(feature_size=12, depths=[1, 1, 1, 1]), 0.8),
    ("unet", 3, (16, 16, 16), 1, 2, dict(channels=[4, 8, 16], strides=[2, 2]), 0.5),
]


def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs outside checkpointed regions
    (a checkpointed region packs its own tensors with its own hooks: they are recomputed, not kept)."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(total)


def _run(model, dims, roi, cin, cout, kwargs, checkpointing):
    torch.manual_seed(0)
    net = registry.create_model(model, in_channels=cin, out_channels=cout, spatial_dims=dims, roi_size=roi,
                                checkpointing=checkpointing, **kwargs)
    net.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, cin, *roi, generator=gen, requires_grad=True)
    torch.manual_seed(2)  # dropout inside the network: the same mask in both runs (and in the recomputation)
    y, saved = _saved_bytes(lambda: net(x))
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy)
    grads = [x.grad] + [p.grad for p in net.parameters()]
    return y.detach(), grads, saved


@pytest.mark.parametrize("model,dims,roi,cin,cout,kwargs,fraction", CASES, ids=[f"{c[0]}-{c[1]}d" for c in CASES])
def test_checkpointing_keeps_outputs_and_gradients(model, dims, roi, cin, cout, kwargs, fraction):
    """With and without checkpointing: identical forward, gradients within 1e-6 relative (float32), and
    with it at most ``fraction`` of the bytes saved for backward."""
    y0, g0, saved0 = _run(model, dims, roi, cin, cout, kwargs, False)
    y1, g1, saved1 = _run(model, dims, roi, cin, cout, kwargs, True)
    assert torch.equal(y0, y1)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        assert a is not None and b is not None
        assert ((a - b).norm() / a.norm().clamp_min(1e-30)).item() <= 1e-6
    assert saved1 <= fraction * saved0, (saved0, saved1)


def test_deconver_checkpointing_is_a_switch():
    """`checkpointing` is checked and can be switched on a built network; the network checkpoints whole
    stages (its blocks are not checkpointed once more inside them), so that what stays saved for backward
    is the stages' inputs and outputs only; without gradients (inference) nothing is checkpointed."""
    net = Deconver(3, 1, 1, channels=(4, 8), checkpointing=True)
    blocks = [m for m in net.modules() if type(m).__name__ == "DeconverBlock"]
    assert net.checkpointing and blocks and not any(b.checkpointing for b in blocks)
    x = torch.rand(1, 1, 8, 8, 8)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        net(x)
    # the stages' inputs (image; stage-0 output as stage-1 input and as skip; stage-1 output as the
    # decoder's input) and the head's input and weight: nothing from inside a block
    expected = [(1, 1, 8, 8, 8), (1, 4, 8, 8, 8), (1, 4, 8, 8, 8), (1, 8, 4, 4, 4), (1, 4, 8, 8, 8), (1, 4, 1, 1, 1)]
    assert sorted(kept) == sorted(expected), kept
    net.checkpointing = False
    assert not net.checkpointing
    with pytest.raises(ValueError, match="checkpointing should be True or False"):
        Deconver(3, 1, 1, channels=(4, 8), checkpointing="yes")
    net.checkpointing = True
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        _, saved = _saved_bytes(lambda: net(x))
    assert saved == 0


def test_checkpointing_elsewhere_is_refused_naming_the_key():
    """A model whose library offers no checkpointing refuses the key before anything is built."""
    with pytest.raises(registry.ModelError, match="checkpointing"):
        registry.check_model("dynunet", 3, (32, 32, 32), {"checkpointing": True})
    with pytest.raises(registry.ModelError, match="checkpointing"):
        registry.create_model("swin_unetr", in_channels=1, out_channels=1, spatial_dims=2, roi_size=(32, 64),
                              use_checkpoint=True)
