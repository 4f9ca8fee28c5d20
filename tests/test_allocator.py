"""deconver.engine.allocator: glibc told to keep freed memory in a CPU training process, observed through
glibc's own accounting (mallinfo2) in fresh processes, against the default allocator as the control."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from deconver.engine.allocator import training_allocator

GLIBC = platform.libc_ver()[0] == "glibc" and tuple(map(int, platform.libc_ver()[1].split(".")[:2])) >= (2, 33)

# A 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB) is allocated, filled and freed; mallinfo2
# says how many bytes were in mmapped blocks while it lived and how many freed bytes the heap kept after.
_PROBE = """
import ctypes, json, sys
import torch
from deconver.engine.allocator import training_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
record = training_allocator(sys.argv[1] == "keep", "cpu")
t = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB
live = libc.mallinfo2()
del t
freed = libc.mallinfo2()
print(json.dumps({"record": record, "mmapped_live": live.hblkhd, "heap_live": live.uordblks,
                  "kept_free": freed.fordblks}))
"""


def _probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="Linux with glibc >= 2.33 (mallinfo2) only")
def test_keep_freed_memory_serves_large_tensors_from_the_heap_and_keeps_them():
    size = 64 * 2**20
    default, keep = _probe("default"), _probe("keep")
    # control: the default allocator maps the large tensor on its own and returns it on free
    assert default["record"] == {"keep_freed_memory": False, "reason": "trainer.keep_freed_memory: false"}
    assert default["mmapped_live"] >= size and default["kept_free"] < size
    # kept: the tensor comes from the heap, and its memory stays there, free for the next allocation
    assert keep["record"]["keep_freed_memory"] is True and keep["record"]["allocator"].startswith("glibc ")
    assert keep["record"]["mallopt"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}
    assert keep["mmapped_live"] < size <= keep["heap_live"]
    assert keep["kept_free"] >= size


def test_training_allocator_applies_to_cpu_training_only():
    assert training_allocator(True, "gpu") == {"keep_freed_memory": False, "reason": "device gpu"}
    assert training_allocator(False, "cpu")["keep_freed_memory"] is False
