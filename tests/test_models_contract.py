"""The model contract, run over the registry: every registered model × every dataset preset of its dims.

Each model is built with the preset's channels (and the preset's name, for builders that use it) at the
smallest roi its declared constraints allow, and must return logits (B, out_channels, *roi) in eval and
train mode, and a gradient must reach every parameter. A new model file is tested without writing a test.
"""
import pytest
import torch

from deconver.config import available_presets, load_preset
from deconver.registry import check_model, create_model, default_registry, list_models, model_info

PRESETS = {name: load_preset(name) for name in available_presets()}
CASES = [(model, preset) for model in list_models() for preset, p in PRESETS.items()
         if p.spatial_dims in model_info(model).dims]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_loaded_cleanly():
    assert default_registry().errors == []
    assert CASES, "no model registered"


@pytest.mark.parametrize("name,preset", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_model_contract(name, preset):
    p = PRESETS[preset]
    dims, cin, cout = p.spatial_dims, p.in_channels, p.out_channels
    constraints = model_info(name).constraints(dims, {}, p.name)
    roi = constraints.min_roi()
    batch = constraints.min_batch
    check_model(name, dims, roi, {}, dataset=p.name, batch_size=batch)  # the declared minimum is accepted
    torch.manual_seed(0)
    net = create_model(name, in_channels=cin, out_channels=cout, spatial_dims=dims, roi_size=roi, dataset=p.name)
    x = torch.randn(batch, cin, *roi)

    net.eval()
    with torch.no_grad():
        y_eval = net(x)
    assert isinstance(y_eval, torch.Tensor) and tuple(y_eval.shape) == (batch, cout, *roi)
    assert torch.isfinite(y_eval).all()

    net.train()
    y = net(x)
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (batch, cout, *roi)
    # a random projection of every output voxel, so that no part of the output is ignored by the loss
    (y * torch.randn_like(y)).sum().backward()
    params = dict(net.named_parameters())
    assert params, f"{name} has no parameters"
    dead = [n for n, q in params.items() if q.requires_grad and q.grad is None]
    assert not dead, f"{name} on {preset}: no gradient reaches {len(dead)} parameters, e.g. {dead[:5]}"
    bad = [n for n, q in params.items() if q.grad is not None and not torch.isfinite(q.grad).all()]
    assert not bad, f"{name} on {preset}: non-finite gradients in {bad[:5]}"
    # and it is not identically zero (a parameter whose output is discarded or multiplied by zero)
    # (except a bias that a batch norm in training mode subtracts again: its gradient is zero by design)
    normed = _biases_before_batch_norm(net)
    zero = [n for n, q in params.items() if q.grad is not None and not q.grad.any() and n not in normed]
    assert not zero, f"{name} on {preset}: the gradient of {zero[:5]} is exactly zero"


def _biases_before_batch_norm(net: torch.nn.Module) -> set[str]:
    """Names of conv biases directly followed by a BatchNorm in a Sequential (e.g. MONAI's attention gate
    psi = Conv -> BatchNorm -> Sigmoid): in training mode the norm removes them, so their gradient is 0."""
    from torch.nn.modules.batchnorm import _BatchNorm

    out = set()
    for prefix, module in net.named_modules():
        children = list(module.named_children())
        for (a_name, a), (_, b) in zip(children, children[1:]):
            if not isinstance(b, _BatchNorm):
                continue
            for sub_name, sub in [("", a), *a.named_modules()]:
                if getattr(sub, "bias", None) is not None and isinstance(sub, torch.nn.modules.conv._ConvNd):
                    out.add(".".join(x for x in (prefix, a_name, sub_name, "bias") if x))
    return out
