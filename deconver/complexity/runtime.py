"""Measured latency and peak memory of a forward pass and of a training step, on a named device.

* Latency: the median wall-clock time of ``repeats`` calls after ``warmup`` untimed calls
  (``torch.cuda.synchronize()`` around each timed call on CUDA). Forward: ``model.eval()`` under
  ``torch.no_grad()``. Training step: ``model.train()``, forward, ``loss = output.float().mean()``,
  backward and an AdamW step (lr 1e-4, weight decay 1e-5, the protocol's optimizer), gradients set to
  ``None`` before each step.
* Peak memory, CUDA: ``torch.cuda.max_memory_allocated`` over one call after the timed ones (peak
  statistics reset first): every live tensor, weights, input and optimizer state included.
* Peak memory, CPU: the same quantity measured by :class:`TensorMemoryTracker`, which follows every
  tensor storage created during the call (a dispatch mode; storages are found by their data pointer,
  so views and in-place results are not counted twice, and a storage is dropped as soon as Python
  frees it) and adds the storages alive when the call starts (parameters, buffers, input, gradients,
  optimizer state). Library scratch buffers that are never tensors (oneDNN workspaces) and allocator
  caching are not included, exactly as on CUDA. Measured in a separate, untimed call.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MB = 1024 ** 2


def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device (use --device cpu or auto)")
    return dev


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ memory (CPU)
def _storage_key(t: torch.Tensor) -> int | None:
    if not isinstance(t, torch.Tensor) or t.is_meta or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):
        return None


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages while active (CPU analogue of ``max_memory_allocated``).

    ``baseline`` tensors (parameters, inputs, optimizer state...) count from the start. Every operator
    output whose storage is new is added; storages whose last Python/autograd reference is gone are
    removed before the next operator, so the peak is the maximum over operator boundaries of the live
    bytes, as a caching-free allocator would see them.
    """

    def __init__(self, baseline: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        for t in baseline:
            self._add(t)
        self.baseline_bytes = self.current

    def _add(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key is None or key in self._live:
            return
        storage = t.untyped_storage()
        nbytes = int(storage.nbytes())
        self._live[key] = (StorageWeakRef(storage), nbytes)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _collect(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._collect()
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def _state_tensors(model: nn.Module, inputs: Sequence[torch.Tensor], optimizer=None) -> list[torch.Tensor]:
    tensors = [*model.parameters(), *model.buffers(), *inputs]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


# --------------------------------------------------------------------------------------- runtime
@dataclass
class RuntimeResult:
    """Latency (ms) and peak memory (MB) of a forward pass and a training step on ``device``."""

    device: str
    device_name: str
    roi: list[int]
    batch: int
    train_batch: int
    repeats: int
    warmup: int
    forward_ms: float | None = None
    train_step_ms: float | None = None
    forward_all_ms: list[float] = field(default_factory=list)
    train_step_all_ms: list[float] = field(default_factory=list)
    forward_peak_mb: float | None = None
    train_step_peak_mb: float | None = None
    memory_method: str = ""
    threads: int | None = None
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int, progress=None) -> list[float]:
    for _ in range(warmup):
        fn()
        if progress is not None:
            progress.update()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        if progress is not None:
            progress.update()
    return times


def _peak(fn: Callable[[], Any], device: torch.device, state: Callable[[], list[torch.Tensor]]) -> float:
    """Peak MB of one call of ``fn`` (every live tensor included)."""
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) / MB
    with TensorMemoryTracker(state()) as tracker:
        fn()
    return tracker.peak / MB


def measure_runtime(model: nn.Module, input_shape: Sequence[int], *, device: str | torch.device = "cpu", repeats: int = 5,
                    warmup: int = 2, train_step: bool = True, train_batch: int | None = None, lr: float = 1e-4,
                    weight_decay: float = 1e-5, progress: bool = False) -> RuntimeResult:
    """Latency (median of ``repeats`` after ``warmup``) and peak memory of forward and training step.

    The forward pass runs at ``input_shape``; the training step at batch ``train_batch`` (default: the
    batch of ``input_shape``; a model whose BatchNorm sees a 1 x 1 map needs 2). The model is moved to
    ``device`` (and left there). A step that fails (out of memory, a batch too small...) is recorded in
    ``errors`` and its numbers stay None.
    """
    from deconver.io import device_name

    dev = resolve_device(str(device))
    model.to(dev)
    x = torch.randn(tuple(input_shape), device=dev)
    train_batch = int(train_batch or input_shape[0])
    result = RuntimeResult(device=str(dev), device_name=device_name(str(dev)), roi=list(input_shape[2:]),
                           batch=int(input_shape[0]), train_batch=train_batch, repeats=repeats, warmup=warmup,
                           memory_method=("torch.cuda.max_memory_allocated" if dev.type == "cuda"
                                          else "TensorMemoryTracker (live tensor storages, CPU)"),
                           threads=torch.get_num_threads() if dev.type == "cpu" else None)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(repeats + warmup) * (2 if train_step else 1), desc="latency", unit="call", leave=False)

    def forward():
        with torch.no_grad():
            model(x)

    was_training = model.training
    try:
        model.eval()
        try:
            result.forward_all_ms = _timed(forward, dev, repeats, warmup, bar)
            result.forward_ms = statistics.median(result.forward_all_ms)
            result.forward_peak_mb = _peak(forward, dev, lambda: _state_tensors(model, [x]))
        except (RuntimeError, ValueError) as err:
            result.errors.append(f"forward: {err}".splitlines()[0])
        if train_step:
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if params else None
            xt = x if train_batch == x.shape[0] else torch.randn((train_batch, *x.shape[1:]), device=dev)

            def step():
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                out = model(xt)
                out = out[0] if isinstance(out, (list, tuple)) else out
                out.float().mean().backward()
                if optimizer is not None:
                    optimizer.step()

            try:
                result.train_step_all_ms = _timed(step, dev, repeats, warmup, bar)
                result.train_step_ms = statistics.median(result.train_step_all_ms)
                result.train_step_peak_mb = _peak(step, dev, lambda: _state_tensors(model, [xt], optimizer))
            except (RuntimeError, ValueError) as err:
                result.errors.append(f"train step: {err}".splitlines()[0])
            finally:
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return result
