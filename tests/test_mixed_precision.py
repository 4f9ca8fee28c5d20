"""`precision: bf16-mixed` trains Deconver on the CPU through Lightning's real precision plugin, with every
NDC update computed in float32 (the update is a ratio of sums: its eps = 1e-16 vanishes in bfloat16),
while the convolutions around it run in bfloat16."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from deconver import registry
from deconver.config import load_preset
from deconver.engine.labels import LabelCodec
from deconver.engine.module import SegmentationModule
from deconver.nn import NDC

pytestmark = pytest.mark.usefixtures("one_thread")

ROI = (16, 16, 16)


class _Batches(torch.utils.data.Dataset):
    """Random images with a blob label (ISLES'22 layout: 2 channels, binary lesion)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(i)
        image = torch.randn(2, *ROI, generator=gen)
        label = (image[:1] > 0.8).to(torch.uint8)
        return {"image": image, "label": label}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_mixed_trains_deconver_with_float32_ndc(tmp_path, checkpointing):
    preset = load_preset("isles22", {"protocol": {"roi_size": list(ROI), "batch_size": 2, "precision": "bf16-mixed",
                                                  "epochs": 1, "warmup_epochs": 0}})
    torch.manual_seed(0)
    net = registry.create_model("deconver", in_channels=2, out_channels=1, spatial_dims=3, roi_size=ROI,
                                dataset="isles22", channels=[8, 16], checkpointing=checkpointing)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = {"ndc": [], "conv": []}

    def ndc_hook(layer, args, out):
        if torch.is_grad_enabled():  # the forward of the step (and, checkpointed, its recomputation)
            (x,) = args
            with torch.autocast("cpu", enabled=False), torch.no_grad():  # the same layer in plain float32
                expected = layer._forward(x.float())
            seen["ndc"].append((x.dtype, out.dtype, torch.equal(out, expected), torch.is_autocast_enabled("cpu")))

    for m in net.modules():
        if isinstance(m, NDC):
            m.register_forward_hook(ndc_hook)
    for conv in (net.stem, net.head):
        conv.register_forward_hook(lambda mod, args, out: seen["conv"].append(out.dtype))
    module = SegmentationModule(net, LabelCodec.from_preset(preset), preset.protocol, epochs=1)
    losses = []
    module.log = lambda name, value, **kw: losses.append(float(value.detach())) if name == "train/loss" else None
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_Batches(), batch_size=2))

    assert trainer.global_step == 2 and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert seen["ndc"] and seen["conv"]
    # autocast was on around the layer; inside it, float32 in and out, equal to the plain float32 layer
    assert all(auto and out_dtype == torch.float32 and same for _, out_dtype, same, auto in seen["ndc"])
    assert any(in_dtype == torch.bfloat16 for in_dtype, *_ in seen["ndc"])  # it really received bf16
    assert set(seen["conv"]) == {torch.bfloat16}  # the convolutions around it ran in bfloat16
    after = net.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())  # float32 master weights
    ndc_keys = [k for k in after if k.endswith(".ndc.h0") or ".ndc.proj." in k]
    assert ndc_keys and all(not torch.equal(before[k], after[k]) for k in ndc_keys)  # the NDC layers learned
