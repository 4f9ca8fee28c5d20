"""Engine building blocks: label coding, loss, schedule, sampling, augmentation determinism, atomic
checkpoints, and configuration errors that must stop a run before training."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.optimizers import WarmupCosineSchedule

from deconver.config import ConfigError, load_preset
from deconver.engine.callbacks import AtomicCheckpointIO
from deconver.engine.datamodule import CaseStore, EpochSampler, TrainDataset, train_transforms
from deconver.engine.labels import LabelCodec
from deconver.engine.losses import SigmoidDiceBCELoss, build_loss
from deconver.engine.module import lr_factor


# --------------------------------------------------------------------------- labels
def test_multiclass_codec_roundtrip():
    codec = LabelCodec.from_preset(load_preset("hippocampus"))
    assert codec.out_channels == 3 and not codec.sigmoid
    label = torch.tensor([0, 1, 2, 2, 0]).view(1, 1, 5)
    assert codec.encode(label).view(-1).tolist() == [0, 1, 2, 2, 0]
    logits = torch.nn.functional.one_hot(label.view(-1), 3).T.float()[None] * 5  # (1, 3, 5)
    masks = codec.discretize(codec.activate(logits))
    assert masks.shape == (1, 2, 5)
    assert masks[0, 0].tolist() == [False, True, False, False, False]
    assert codec.to_label_map(codec.activate(logits)[0]).tolist() == [0, 1, 2, 2, 0]


def test_regions_codec_brats():
    codec = LabelCodec.from_preset(load_preset("brats23"))
    assert codec.names == ("ET", "TC", "WT") and codec.out_channels == 3 and codec.sigmoid
    label = torch.tensor([0, 1, 2, 3]).view(1, 1, 4)
    target = codec.encode(label)[0]  # (3, 4): ET={3}, TC={1,3}, WT={1,2,3}
    assert target.tolist() == [[0, 0, 0, 1], [0, 1, 0, 1], [0, 1, 1, 1]]
    # decoding: ET+TC+WT -> 3, TC+WT -> 1, WT -> 2, nothing -> 0 (ARCHITECTURE.md "Runs")
    probs = np.array([[0.9, 0.1, 0.2, 0.1], [0.9, 0.8, 0.1, 0.2], [0.9, 0.9, 0.7, 0.3]], dtype=np.float32)
    assert codec.to_label_map(probs).tolist() == [3, 1, 2, 0]
    # an inconsistent pattern (TC without WT) is decoded to the most likely consistent one
    assert codec.to_label_map(np.array([[0.1], [0.9], [0.45]], dtype=np.float32)).tolist() == [1]


def test_binary_codec_uses_label_value():
    preset = load_preset("isles22", {"labels": {"lesion": [4]}})
    codec = LabelCodec.from_preset(preset)
    assert codec.encode(torch.tensor([0, 4, 1]).view(1, 1, 3)).view(-1).tolist() == [0.0, 1.0, 0.0]
    assert codec.to_label_map(np.array([[0.2, 0.7, 0.5]])).tolist() == [0, 4, 0]


# --------------------------------------------------------------------------- loss
def test_region_loss_is_dice_plus_per_channel_bce():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6)
    target = (torch.rand(2, 3, 6, 6, 6) > 0.6).float()
    loss = build_loss("dicece", "regions")
    assert isinstance(loss, SigmoidDiceBCELoss)
    p = torch.sigmoid(logits)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    expected = DiceLoss(sigmoid=True, squared_pred=True)(logits, target) + bce
    assert torch.allclose(loss(logits, target), expected, atol=1e-5)
    # MONAI's DiceCELoss(sigmoid=True) uses a softmax CE across the 3 channels: not what we train with
    monai_value = DiceCELoss(sigmoid=True, squared_pred=True)(logits, target)
    assert not torch.allclose(monai_value, expected, atol=1e-3)


def test_multiclass_loss_is_softmax_dice_ce():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, 5)
    target = torch.randint(0, 3, (2, 1, 5, 5, 5))
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0])
    dice = DiceLoss(to_onehot_y=True, softmax=True, squared_pred=True)(logits, target)
    assert torch.allclose(build_loss("dicece", "multiclass")(logits, target), dice + ce, atol=1e-5)


def test_unknown_loss_names_the_key():
    with pytest.raises(ConfigError, match=r"protocol\.loss.*'focal'"):
        build_loss("focal", "binary")


# --------------------------------------------------------------------------- schedule
def test_lr_schedule_is_monai_warmup_cosine_per_epoch():
    protocol = load_preset("isles22").protocol  # 500 epochs, 5 warm-up from 0.1
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=protocol.lr)
    sched = WarmupCosineSchedule(opt, warmup_steps=5, t_total=501, warmup_multiplier=0.1)
    for epoch in range(500):
        assert math.isclose(opt.param_groups[0]["lr"], protocol.lr * lr_factor(epoch, protocol), rel_tol=1e-9)
        opt.step()
        sched.step()
    assert lr_factor(0, protocol) == pytest.approx(0.1)
    assert lr_factor(5, protocol) == pytest.approx(1.0)
    assert lr_factor(499, protocol) < 1e-4


# --------------------------------------------------------------------------- sampling
def test_sampler_splits_global_batches_across_ranks():
    one = list(EpochSampler(10, 4, seed=7, steps=5, epoch=3))
    r0 = list(EpochSampler(10, 2, seed=7, steps=5, rank=0, world_size=2, epoch=3))
    r1 = list(EpochSampler(10, 2, seed=7, steps=5, rank=1, world_size=2, epoch=3))
    for k in range(5):
        assert sorted(one[4 * k:4 * k + 4]) == sorted(r0[2 * k:2 * k + 2] + r1[2 * k:2 * k + 2])
    assert list(EpochSampler(10, 4, seed=7, steps=5, epoch=3)) == one  # a function of (seed, epoch)
    assert [k[2] for k in EpochSampler(10, 4, seed=7, steps=5, epoch=4)] != [k[2] for k in one]
    # one pass over the cases by default, every case once per pass
    epoch = list(EpochSampler(10, 4, seed=1))
    assert len(epoch) == 12 and sorted(k[2] for k in epoch[:10]) == list(range(10))
    # resuming mid-epoch skips the batches already done, once
    sampler = EpochSampler(10, 4, seed=7, steps=5, epoch=3, skip_batches=2)
    assert list(sampler) == one[8:] and list(sampler) == one


class _Arrays:
    """In-memory cases (the `load(id)` interface of PreparedDataset) for sampling tests."""

    def __init__(self, n: int, shape=(20, 28, 18)):
        rng = np.random.default_rng(0)
        self.data = {}
        for i in range(n):
            label = np.zeros((1, *shape), np.uint8)
            label[0, 8:12, 10:16, 6:10] = 1 + (i % 2)
            self.data[f"c{i}"] = (rng.normal(size=(1, *shape)).astype(np.float32), label)

    def load(self, case_id):
        return self.data[case_id]


def test_training_samples_depend_only_on_their_key():
    protocol = load_preset("hippocampus", {"protocol": {"roi_size": [16, 24, 16], "crop": "posneg",
                                                        "pos_neg_ratio": 1000.0, "augmentation": {"affine_prob": 1.0, "noise_prob": 1.0}}}).protocol
    source = _Arrays(4)
    store = CaseStore(source, list(source.data))
    a = TrainDataset(store, protocol, 3, seed=5)
    b = TrainDataset(store, protocol, 3, seed=5)
    keys = list(EpochSampler(4, 2, seed=5, steps=3, epoch=2))
    first = [a[k] for k in keys]
    for k, ref in zip(reversed(keys), reversed(first)):  # another order, another dataset object
        s = b[k]
        assert torch.equal(s["image"], ref["image"]) and torch.equal(s["label"], ref["label"])
    for s in first:
        assert s["image"].shape == (1, 16, 24, 16) and s["image"].dtype == torch.float32
        assert set(s["label"].unique().tolist()) <= {0, 1, 2}
        assert s["label"].sum() > 0  # pos:neg 1000:1 centres crops on the foreground
    other = TrainDataset(store, protocol, 3, seed=6)[keys[0]]
    assert not torch.equal(other["image"], first[0]["image"])


def test_paper_presets_crop_uniformly_and_pad_affines_with_the_border():
    """The authors' bundles: RandSpatialCropd (one uniform crop) and RandAffined(padding_mode='border')."""
    from monai.transforms import RandAffined, RandCropByPosNegLabeld, RandSpatialCropd

    for name in ("isles22", "brats23", "fives"):
        preset = load_preset(name)
        assert preset.protocol.crop == "uniform" and preset.protocol.augmentation.padding_mode == "border"
        chain = train_transforms(preset.protocol, preset.spatial_dims).transforms
        assert any(isinstance(t, RandSpatialCropd) for t in chain)
        assert not any(isinstance(t, RandCropByPosNegLabeld) for t in chain)
    source = _Arrays(1, shape=(40, 40, 40))

    def samples(crop, padding):
        protocol = load_preset("hippocampus", {"protocol": {
            "roi_size": [16, 16, 16], "crop": crop, "pos_neg_ratio": 1000.0,
            "augmentation": {"affine_prob": 1.0, "rotate_range": 0.5, "scale_range": 0.0, "noise_prob": 0.0,
                             "smooth_prob": 0.0, "intensity_scale_prob": 0.0, "intensity_shift_prob": 0.0,
                             "flip_prob": 0.0, "padding_mode": padding}}}).protocol
        ds = TrainDataset(CaseStore(source, ["c0"]), protocol, 3, seed=1)
        return [ds[(0, i, 0)] for i in range(24)]

    # uniform crops ignore the label: most 16^3 crops of a 40^3 case miss its 4x6x4 lesion; posneg 1000:1 never does
    assert sum(int(s["label"].sum() == 0) for s in samples("uniform", "border")) >= 8
    assert all(s["label"].sum() > 0 for s in samples("posneg", "border"))
    # border padding repeats edge voxels where the rotation reaches outside the crop; zeros padding writes 0
    source.data["c0"] = (np.ones_like(source.data["c0"][0]), source.data["c0"][1])
    assert all((s["image"] != 0).all() for s in samples("uniform", "border"))
    assert any((s["image"] == 0).any() for s in samples("uniform", "zeros"))


def test_small_images_are_padded_to_the_roi():
    protocol = load_preset("hippocampus", {"protocol": {"roi_size": [32, 32, 32]}}).protocol
    source = _Arrays(1, shape=(20, 28, 18))
    sample = TrainDataset(CaseStore(source, ["c0"]), protocol, 3, seed=0)[(0, 0, 0)]
    assert sample["image"].shape == (1, 32, 32, 32)


# --------------------------------------------------------------------------- checkpoints
def test_atomic_checkpoint_keeps_the_old_file_when_a_save_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"w": torch.zeros(3), "bad": lambda: None}, path)  # not picklable
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
