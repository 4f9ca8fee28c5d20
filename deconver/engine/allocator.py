"""The C allocator of a CPU training process told to keep freed memory for reuse (glibc ``mallopt``).

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and unmaps it on free, so each large activation of a training step (a
256 MiB tensor at the ISLES'22 roi) is page-faulted in afresh, page by page, before any arithmetic:
seconds of system time per step (docs/engine.md, "CPU time per FLOP"). :func:`keep_freed_memory`
turns that off for the calling process — large blocks come from the heap (``M_MMAP_MAX = 0``) and
freed memory at its top is kept (``M_TRIM_THRESHOLD``) — so the next step reuses pages that are
already mapped. It changes no value a computation produces, only where its memory comes from; the
resident set then stays near the step's peak between steps instead of falling back, and the peak itself
grows with the heap's fragmentation (measured at the ISLES'22 roi: Deconver +22-50 %, DynUNet +4-9 %),
which is why it is off by default.

Linux with glibc only; elsewhere (macOS, Windows, musl) a no-op that says why. Settings are process-wide
and inherited by forked children (data-loader workers), not by spawned ones. Applied by `deconver
train` on the CPU with ``trainer.keep_freed_memory: true``, by `deconver calibrate` the same way and by
``benchmarks/train.py --keep-freed-memory``; the record goes into the run's provenance (run.json).
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["MALLOPT", "keep_freed_memory", "training_allocator"]

# glibc's <malloc.h> parameter numbers, and the values set
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
MALLOPT = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}
_PARAMS = {"M_MMAP_MAX": _M_MMAP_MAX, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD}


def _glibc() -> tuple[ctypes.CDLL | None, str]:
    """(the C library, its glibc version), or (None, why not)."""
    if not sys.platform.startswith("linux"):
        return None, f"not Linux ({sys.platform})"
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None, "the C library is not glibc"
    version.restype = ctypes.c_char_p
    return libc, version().decode()


def keep_freed_memory() -> dict:
    """Tell glibc's malloc (this process) to serve large blocks from the heap and keep freed memory.

    Returns the record for a run's provenance: ``{"keep_freed_memory": True, "allocator": "glibc 2.36",
    "mallopt": {...}}`` when applied, else ``{"keep_freed_memory": False, "reason": ...}``.
    """
    libc, version = _glibc()
    if libc is None:
        return {"keep_freed_memory": False, "reason": version}
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    failed = [name for name, value in MALLOPT.items() if libc.mallopt(_PARAMS[name], value) != 1]
    if failed:
        return {"keep_freed_memory": False, "allocator": f"glibc {version}", "reason": f"mallopt refused {failed}"}
    return {"keep_freed_memory": True, "allocator": f"glibc {version}", "mallopt": dict(MALLOPT)}


def training_allocator(enabled: bool, device: str) -> dict:
    """:func:`keep_freed_memory` for a process that trains on ``device`` (``cpu``, ``gpu``, ``cuda``…) when
    ``enabled`` (``trainer.keep_freed_memory``) and the device is the CPU; the record says what was done."""
    if device != "cpu":
        return {"keep_freed_memory": False, "reason": f"device {device}"}
    if not enabled:
        return {"keep_freed_memory": False, "reason": "trainer.keep_freed_memory: false"}
    return keep_freed_memory()
