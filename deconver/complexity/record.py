"""One complexity record: everything `deconver complexity` measures for one model at one roi.

:func:`measure` runs the parameter count, both FLOP counters and their cross-check, the paper's
convention and (optionally) latency/memory, and returns the JSON-ready record described in
docs/complexity.md. :func:`flat_row` turns a record into one CSV/table row.
"""
from __future__ import annotations

import math
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Sequence

import torch
from torch import nn

from deconver.complexity.counters import (CROSS_CHECK_TOLERANCE, count_parameters, cross_check, flop_counter_count,
                                          fvcore_count)
from deconver.complexity.paper import paper_count
from deconver.complexity.runtime import measure_runtime, resolve_device

CONVENTIONS = {
    "flops": "torch.utils.flop_counter: 2 FLOPs per multiply-accumulate of every convolution, linear layer, "
             "matrix product and attention (NDC convolutions included); element-wise ops, norms, pooling "
             "and resampling not counted",
    "fvcore_macs": "fvcore FlopCountAnalysis with the suite's handles: 1 per multiply-accumulate of the same "
                   "operators (the lean NDC update through its analytic handle)",
    "flops_per_voxel_k": "flops / input voxels (pixels in 2D) / 1000, batch 1",
    "paper_flops_per_voxel_k": "the paper's convention (DeepSpeed FlopsProfiler): 2 FLOPs per MAC plus "
                               "element-wise work of patched functions, NDC K/A convolutions not counted; "
                               "/ input voxels / 1000",
}


def versions() -> dict[str, str | None]:
    """Versions of the packages that produced the numbers."""
    out: dict[str, str | None] = {}
    for pkg in ("deconver", "torch", "fvcore", "monai"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _per_voxel_k(value: float | None, voxels: int) -> float | None:
    return None if value is None else value / voxels / 1e3


def measure(model: nn.Module, *, in_channels: int, roi: Sequence[int], device: str | None = "auto", runtime: bool = True,
            runtime_roi: Sequence[int] | None = None, repeats: int = 5, warmup: int = 2, train_step: bool = True,
            train_batch: int = 1, grad: bool = False, progress: bool = False) -> dict[str, Any]:
    """Measure ``model`` on a batch-1 input ``(1, in_channels, *roi)``; returns the record (a dict).

    FLOPs are counted at ``roi``: flop_counter and the paper's convention on fake tensors (shapes only),
    fvcore by a real traced forward pass on ``device``. Latency and memory are measured on ``device``
    at ``runtime_roi`` (default ``roi``) unless ``runtime=False``: the forward pass at batch 1, the
    training step at batch ``train_batch`` (a model's registered ``min_batch``).
    """
    dev = resolve_device(device)
    roi = [int(r) for r in roi]
    shape = (1, int(in_channels), *roi)
    voxels = math.prod(roi)
    model.to(dev)
    params = count_parameters(model)
    fc = flop_counter_count(model, shape, device=dev, grad=grad)
    x = torch.randn(shape, device=dev)
    fv = fvcore_count(model, x, grad=grad)
    del x
    check = cross_check(fv, fc, CROSS_CHECK_TOLERANCE)
    try:
        paper = paper_count(model, shape, device=dev)
        paper_record = {**paper.as_dict(), "flops_per_voxel_k": _per_voxel_k(paper.flops, voxels),
                        # empirical: the paper's four figures equal this to 0.01 % (docs/complexity.md)
                        "doubled_nonmac_per_voxel_k": _per_voxel_k(paper.flops + paper.nonmac_flops, voxels)}
        paper_k = paper_record["flops_per_voxel_k"]
    except Exception as err:  # reported like a counter failure
        paper_record, paper_k = {"error": f"{type(err).__name__}: {err}"}, None
        check.flags.append(f"paper convention failed: {paper_record['error']}")
    record: dict[str, Any] = {
        "roi": roi,
        "batch": 1,
        "in_channels": int(in_channels),
        "voxels": voxels,
        "params": params,
        "flops": fc.flops,
        "macs": fv.macs,
        "flops_per_voxel_k": _per_voxel_k(fc.flops, voxels),
        "fvcore_flops_per_voxel_k": _per_voxel_k(2 * fv.macs, voxels),
        "paper_flops_per_voxel_k": paper_k,
        "flops_agree": check.agree,
        "flagged": bool(check.flags),
        "flags": check.flags,
        "cross_check": {"ratio": check.ratio, "tolerance": check.tolerance, "agree": check.agree},
        "flop_counter": fc.as_dict(),
        "fvcore": fv.as_dict(),
        "paper_convention": paper_record,
        "conventions": CONVENTIONS,
        "counting_device": str(dev),
        "latency_ms": None,
        "peak_memory_mb": None,
        "runtime": None,
        "device": None,
        "versions": versions(),
    }
    from deconver.io import device_name

    record["device"] = device_name(str(dev))
    if runtime:
        rroi = [int(r) for r in (runtime_roi or roi)]
        rt = measure_runtime(model, (1, int(in_channels), *rroi), device=dev, repeats=repeats, warmup=warmup,
                             train_step=train_step, train_batch=train_batch, progress=progress)
        record["runtime"] = rt.as_dict()
        record["latency_ms"] = {"forward": rt.forward_ms, "train_step": rt.train_step_ms}
        record["peak_memory_mb"] = {"forward": rt.forward_peak_mb, "train_step": rt.train_step_peak_mb,
                                    "method": rt.memory_method}
        record["device"] = rt.device_name
        if rt.errors:
            record["flags"] = record["flags"] + [f"runtime: {e}" for e in rt.errors]
    return record


ROW_COLUMNS = ["model", "dataset", "roi", "params_total", "params_trainable", "fvcore_macs", "flop_counter_flops",
               "ratio", "flops_agree", "flops_per_voxel_k", "paper_flops_per_voxel_k", "latency_forward_ms",
               "latency_train_step_ms", "peak_memory_forward_mb", "peak_memory_train_step_mb", "device",
               "deconver_version", "torch_version", "fvcore_version", "flags"]


def flat_row(record: dict[str, Any]) -> dict[str, Any]:
    """One flat row of a record (the CSV columns :data:`ROW_COLUMNS`)."""
    lat = record.get("latency_ms") or {}
    mem = record.get("peak_memory_mb") or {}
    ver = record.get("versions") or {}
    params = record.get("params") or {}
    return {
        "model": record.get("model"), "dataset": record.get("dataset"),
        "roi": "x".join(str(r) for r in record.get("roi") or []),
        "params_total": params.get("total"), "params_trainable": params.get("trainable"),
        "fvcore_macs": record.get("macs"), "flop_counter_flops": record.get("flops"),
        "ratio": (record.get("cross_check") or {}).get("ratio"), "flops_agree": record.get("flops_agree"),
        "flops_per_voxel_k": record.get("flops_per_voxel_k"),
        "paper_flops_per_voxel_k": record.get("paper_flops_per_voxel_k"),
        "latency_forward_ms": lat.get("forward"), "latency_train_step_ms": lat.get("train_step"),
        "peak_memory_forward_mb": mem.get("forward"), "peak_memory_train_step_mb": mem.get("train_step"),
        "device": record.get("device"), "deconver_version": ver.get("deconver"), "torch_version": ver.get("torch"),
        "fvcore_version": ver.get("fvcore"), "flags": "; ".join(record.get("flags") or []) or (record.get("error") or ""),
    }
