"""Data benchmark: prepare time for the real MSD Hippocampus (260 cases), and loader throughput
against the training step of a small 3D model.

The loader must deliver samples at least 5x faster than a training step consumes them, so training
is never input-bound. Measured on this machine (CPU), separately for the loader (PreparedDataset.load
plus the training augmentation, in a torch DataLoader) and for the step (MONAI UNet, DiceCE, AdamW,
forward + backward + update on a batch of the preset's size and roi).

    python benchmarks/data.py [--data data/Task04_Hippocampus] [--out results/benchmarks/data.json]

Writes the numbers (and provenance) as JSON and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deconver.config import load_preset
from deconver.data import PreparedDataset
from deconver.data.prepare import prepare_dataset
from deconver.io import provenance, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "Task04_Hippocampus"  # the studies' documented place (docs/datasets.md)


def augmentation(preset):
    """The training transforms: the engine's when it is there, else the same MONAI recipe built here."""
    try:
        from deconver.engine.datamodule import train_transforms

        return train_transforms(preset.protocol, preset.spatial_dims), "deconver.engine.datamodule.train_transforms"
    except ImportError:
        pass
    from monai.transforms import (Compose, RandAffined, RandCropByPosNegLabeld, RandFlipd, RandGaussianNoised,
                                  RandGaussianSmoothd, RandScaleIntensityd, RandShiftIntensityd, SpatialPadd)

    roi, aug, keys = list(preset.protocol.roi_size), preset.protocol.augmentation, ["image", "label"]
    sigma = tuple(aug.smooth_sigma)
    return Compose([
        SpatialPadd(keys, spatial_size=roi),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=roi, pos=preset.protocol.pos_neg_ratio, neg=1.0,
                               num_samples=1),
        RandAffined(keys, prob=aug.affine_prob, rotate_range=(aug.rotate_range,) * 3,
                    scale_range=(aug.scale_range,) * 3, mode=("bilinear", "nearest"), spatial_size=roi),
        RandGaussianNoised("image", prob=aug.noise_prob, std=aug.noise_std),
        RandGaussianSmoothd("image", prob=aug.smooth_prob, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma),
        RandScaleIntensityd("image", factors=aug.intensity_scale, prob=aug.intensity_scale_prob),
        RandShiftIntensityd("image", offsets=aug.intensity_shift, prob=aug.intensity_shift_prob),
        *[RandFlipd(keys, prob=aug.flip_prob, spatial_axis=a) for a in range(3)],
    ]), "benchmarks/data.py MONAI recipe"


class Samples(torch.utils.data.Dataset):
    """Augmented training samples drawn from the prepared cache."""

    def __init__(self, directory: Path, transforms):
        self.ds = PreparedDataset(directory)
        self.ids = self.ds.case_ids
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        image, label = self.ds.load(self.ids[i])
        out = self.transforms({"image": torch.from_numpy(image), "label": torch.from_numpy(label)})
        out = out[0] if isinstance(out, list) else out
        image, label = out["image"], out["label"]
        plain = lambda t: t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)  # noqa: E731
        return plain(image), plain(label)


def loader_throughput(directory: Path, preset, transforms, workers: int, samples: int) -> float:
    """Samples per second delivered by a DataLoader (after one warm-up batch)."""
    from monai.utils import set_determinism

    set_determinism(0)
    loader = torch.utils.data.DataLoader(Samples(directory, transforms), batch_size=preset.protocol.batch_size,
                                         shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                                         drop_last=True)
    threads = torch.get_num_threads()
    if workers == 0:  # as in a DataLoader worker: one intra-op thread (small tensors; threads only contend)
        torch.set_num_threads(1)
    try:
        it = iter(loader)
        next(it)
        n, t0 = 0, time.perf_counter()
        while n < samples:
            try:
                x, _ = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            n += x.shape[0]
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def step_time(preset, steps: int) -> float:
    """Seconds per training step of a small MONAI UNet on a batch of the preset's roi."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=preset.in_channels, out_channels=preset.out_channels,
               channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
    x = torch.randn(preset.protocol.batch_size, preset.in_channels, *preset.protocol.roi_size)
    y = torch.randint(0, preset.out_channels, (preset.protocol.batch_size, 1, *preset.protocol.roi_size))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="MSD Task04_Hippocampus folder")
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "data.json"))
    parser.add_argument("--samples", type=int, default=320, help="samples to draw per loader measurement")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the preset's)")
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not (data / "dataset.json").is_file():
        print(f"benchmarks/data.py: {data} is not an MSD task folder", file=sys.stderr)
        return 2
    preset = load_preset("hippocampus")
    workers = preset.protocol.num_workers if args.workers is None else args.workers
    with tempfile.TemporaryDirectory(prefix="deconver-bench-") as tmp:
        cache = Path(tmp) / "prepared"
        t0 = time.perf_counter()
        first = prepare_dataset(preset, data, cache, progress=True)
        prepare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = prepare_dataset(preset, data, cache, progress=False)
        rerun_s = time.perf_counter() - t0
        assert again["status"] == "up-to-date"
        transforms, pipeline = augmentation(preset)
        throughput = {w: loader_throughput(cache, preset, transforms, w, args.samples)
                      for w in sorted({0, workers})}
    step_s = step_time(preset, args.steps)
    consumed = preset.protocol.batch_size / step_s
    best = max(throughput.values())
    result = {
        "benchmark": "data",
        "dataset": "MSD Task04_Hippocampus (real)",
        "cases": first["cases"],
        "prepare_seconds": round(prepare_s, 2),
        "prepare_seconds_per_case": round(prepare_s / first["cases"], 4),
        "prepare_rerun_seconds": round(rerun_s, 3),
        "loader_pipeline": pipeline,
        "roi": preset.protocol.roi_size,
        "batch_size": preset.protocol.batch_size,
        "loader_samples_per_s": {f"workers={w}": round(v, 1) for w, v in throughput.items()},
        "model": "monai UNet 3D, channels (16, 32, 64, 128), strides (2, 2, 2), 2 residual units; DiceCE; AdamW",
        "train_step_seconds": round(step_s, 4),
        "train_samples_per_s": round(consumed, 2),
        "loader_over_step_ratio": round(best / consumed, 2),
        "loader_over_step_ratio_single_process": round(throughput[0] / consumed, 2),
        "requirement": "loader >= 5x what the step consumes",
        "passed": bool(best / consumed >= 5),
        "torch_threads": torch.get_num_threads(),
        "provenance": provenance("cpu"),
    }
    write_json_atomic(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
