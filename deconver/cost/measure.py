"""Time one model's training step and sliding-window batch on this device (calibration and benchmarks/train.py).

`train_step_fn` builds the network and the engine's own `SegmentationModule` for a preset and returns
(a `TrainStep` with the network, module and optimizer) a callable that runs one optimiser step (the preset's loss, backward, AdamW) on random data of the
preset's roi and the given batch, and returns its seconds (CUDA synchronised). `window_batch_fn` does
the same for one batch of `sw_batch_size` sliding windows at inference (no gradients). `median_time`
runs a callable once as warm-up and returns the warm-up and the median of the timed calls.
"""
from __future__ import annotations

import resource
import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable, NamedTuple

from deconver.config import DatasetPreset

AUTOCAST = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}  # Lightning's mixed precisions: autocast dtypes


def peak_rss_mb() -> float:
    """This process's peak resident set so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def build_module(model: str, preset: DatasetPreset, kwargs: dict | None, device: str):
    """The registry's network for `preset` wrapped in the engine's SegmentationModule, on `device`."""
    import torch

    from deconver import registry
    from deconver.engine.labels import LabelCodec
    from deconver.engine.module import SegmentationModule

    torch.manual_seed(0)
    net = registry.create_model(model, in_channels=preset.in_channels, out_channels=preset.out_channels,
                                spatial_dims=preset.spatial_dims, roi_size=tuple(preset.protocol.roi_size),
                                dataset=preset.name, **(kwargs or {}))
    module = SegmentationModule(net, LabelCodec.from_preset(preset), preset.protocol).to(device)
    module.log = lambda *a, **k: None  # no trainer attached: logging is a no-op here
    return net, module


class TrainStep(NamedTuple):
    """What `train_step_fn` returns: `step()` runs one training step and returns its seconds."""

    step: Callable[[], float]
    net: Any
    module: Any
    optimizer: Any


def train_step_fn(model: str, preset: DatasetPreset, kwargs: dict | None, *, batch: int, device: str,
                  precision: str = "32") -> TrainStep:
    """`step()` of one training step on random data of the preset's roi and `batch` (with the net, module, optimizer)."""
    import torch

    net, module = build_module(model, preset, kwargs, device)
    module.train()
    optimizer = module.configure_optimizers()
    roi = tuple(preset.protocol.roi_size)
    values = [v for vals in preset.labels.values() for v in vals]
    data = {"image": torch.randn(batch, preset.in_channels, *roi, device=device),
            "label": torch.tensor(values, dtype=torch.uint8)[torch.randint(0, len(values), (batch, 1, *roi))]
            .to(device) * (torch.rand(batch, 1, *roi, device=device) > 0.7)}
    dtype = AUTOCAST.get(precision)
    autocast = (lambda: torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype))) if dtype else nullcontext

    def step() -> float:
        _sync(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = module.training_step(data, 0)
        loss.backward()
        optimizer.step()
        _sync(device)
        return time.perf_counter() - t0

    return TrainStep(step, net, module, optimizer)


def window_batch_fn(net, preset: DatasetPreset, *, device: str) -> Callable[[], float]:
    """`call()` runs the network on one batch of `sw_batch_size` windows without gradients; its seconds."""
    import torch

    p = preset.protocol
    x = torch.randn(p.sw_batch_size, preset.in_channels, *p.roi_size, device=device)

    def call() -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            net.eval()
            net(x)
            net.train()
        _sync(device)
        return time.perf_counter() - t0

    return call


def median_time(fn: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    """(warm-up seconds, the timed calls' seconds) of `repeats` calls after one warm-up call."""
    warmup = fn()
    return warmup, [fn() for _ in range(max(1, repeats))]


def median(values: list[float]) -> float:
    return statistics.median(values)
