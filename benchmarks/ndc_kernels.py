#!/usr/bin/env python
"""Static report of the fused NDC Triton kernels, compiled for a GPU architecture without a GPU.

Compiles every kernel of ``deconver/nn/ndc_triton.py`` with the constants the launchers use for a
given layer geometry (default: the BraTS preset's stage 0, depth-wise, ratio 4, k3) to SASS with the
``ptxas`` that ships with Triton, and reports per kernel: registers per thread, stack (local memory:
spills), static shared memory, and the static counts of the instructions that decide the speed of a
stencil kernel -- global loads/stores, FFMA, warp shuffles and block barriers -- for the whole kernel
and per voxel, counting each loop body as many times as the launcher's constants make it run.
Per-voxel figures divide the per-program count by the voxels one program handles, so variants with
different block sizes compare directly.

This is what can be measured on a machine without a GPU; time on a GPU is for benchmarks/ndc.py.

Usage::

    python benchmarks/ndc_kernels.py                     # sm_90 (H100/H200) -> results/benchmarks/ndc_kernels.json
    python benchmarks/ndc_kernels.py --arch 80 --sc 2 --kernel 5
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret (read when the kernels are defined)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from deconver.nn import ndc_triton as kt  # noqa: E402
from ndc import write_json_atomically  # noqa: E402

COUNTED = ("LDG", "STG", "FFMA", "SHFL", "BAR", "STS", "LDS")
_INSTR = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.M)


def _signature(fn, consts: dict) -> dict:
    """Triton type of every argument: ``*_ptr`` float32 pointers, ``eps`` float32, constants as given,
    the rest (sizes) int32 -- the types the launchers pass."""
    sig = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            if name not in consts:
                raise KeyError(f"{fn.__name__}: no value for the constant {name}")
            sig[name] = "constexpr"
        else:
            sig[name] = "*fp32" if name.endswith("_ptr") else "fp32" if name == "eps" else "i32"
    return sig


def _loops(sass: str) -> list[list[str]]:
    """Bodies of the kernel's loops (code between a label and a branch back to it), innermost first."""
    lines = sass.splitlines()
    labels = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"^\.L_x_\d+:", line)}
    bodies = {}
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            start = labels[m.group(1)]
            bodies[start] = lines[start:i + 1] if len(lines[start:i + 1]) > len(bodies.get(start, [])) else bodies[start]
    real = [b for b in bodies.values() if any(op != "BRA" for line in b for op in _INSTR.findall(line))]
    return sorted(real, key=len)  # (the end of every kernel is a one-branch trap loop: not counted)


def _counts(lines) -> dict:
    ops = Counter(op.split(".")[0] for line in lines for op in _INSTR.findall(line))
    return dict(instructions=sum(ops.values()), **{op: ops[op] for op in COUNTED})


def compile_report(fn, consts: dict, num_warps: int, arch: int) -> dict:
    """Compile ``fn`` for ``sm_<arch>`` and read its resources and static instruction counts."""
    src = ASTSource(fn=fn, signature=_signature(fn, consts), constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"ndc_kernels_{os.getpid()}.cubin"
    try:
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tools / "nvdisasm", cubin], capture_output=True, text=True, check=True).stdout
    finally:
        cubin.unlink(missing_ok=True)
    res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return dict(registers=int(res["REG"]), stack_bytes=int(res["STACK"]), shared_bytes=int(res["SHARED"]),
                num_warps=num_warps, kernel=_counts(sass.splitlines()), loops=[_counts(b) for b in _loops(sass)])


def kernel_specs(sc: int, k: int, dims: int, size: int) -> list[tuple]:
    """(label, kernel, constants, warps, voxels per program, trips of each loop per program, innermost
    first) as the launchers run them for one depth-wise layer with ``sc`` source channels per group and
    a ``k^dims`` filter on ``size^dims``."""
    shape = (1, 1, *[size] * dims)
    x = torch.empty(shape, device="meta")
    h = torch.empty((1, sc, *[k] * dims), device="meta")
    _, _, meta = kt._geometry(x, h)
    block = meta["BLOCK"]
    warps = 4  # Triton's default, used by every launcher
    out = dict(FROM_OUT=True)  # backward from the saved output: what runs behind the mixer's ReLU (x >= 0)
    fg = kt.filter_grad_launch(x, h)
    specs = [
        ("forward: K", kt._k_kernel, dict(RELU=True, **meta), warps, block, ()),
        ("forward: update", kt._update_kernel, dict(RELU=True, **meta), warps, block, ()),
        ("inline: K (x2: of w, of gd)", kt._k_kernel, dict(RELU=False, **meta), warps, block, ()),
        ("inline: grad_a", kt._grad_a_kernel, dict(RELU=True, NEED_H=True, STORE_R=False, **out, **meta), warps,
         block, ()),
        ("inline: grad_s", kt._grad_s_kernel,
         dict(RELU=True, NEED_Z=True, NEED_H=True, R_SAVED=False, **out, **meta), warps, block, ()),
        ("split: grad_a", kt._grad_a_kernel, dict(RELU=True, NEED_H=False, STORE_R=True, **out, **meta), warps,
         block, ()),
        ("split: K pair", kt._k_pair_kernel, dict(meta, NEED_X=True, BLOCK=kt._K_PAIR_BLOCK), warps,
         kt._K_PAIR_BLOCK, ()),
        ("split: grad_s", kt._grad_s_kernel,
         dict(RELU=True, NEED_Z=True, NEED_H=False, R_SAVED=True, **out, **meta), warps, block, ()),
    ]
    for pair in (True, False):  # the K term divides the saved output by R (s = out / R)
        specs.append((f"split: filter grad ({'A terms' if pair else 'K term'})", kt._filter_grad_kernel,
                      dict(RELU=False, PAIR=pair, DIV=not pair, **fg["meta"]), fg["num_warps"], fg["rows"] * size,
                      (fg["rows"] * -(-size // fg["meta"]["BV"]), fg["rows"])))
    return specs


def resident_warps(registers: int, warps: int) -> int:
    """Warps per SM that the register file allows (64 K registers, allocated per warp in units of 256,
    at most 64 warps and 32 blocks per SM: Hopper and Ampere A100)."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(32, 65536 // (per_warp * warps))
    return min(64, blocks * warps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90,
                        help="compute capability x10 (90: H100/H200, 80: A100; read back for 75, 80, 89 and 90)")
    parser.add_argument("--sc", type=int, default=4, help="source channels per group (the NDC ratio)")
    parser.add_argument("--kernel", type=int, default=3, help="filter size k")
    parser.add_argument("--dims", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--size", type=int, default=128, help="volume edge (sets the launch constants)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "ndc_kernels.json")
    args = parser.parse_args(argv)

    rows = []
    head = (f"{'kernel':<34} {'regs':>4} {'stack':>5} {'warps/SM':>8} {'vox/prog':>8} | per voxel: {'instr':>6} "
            f"{'LDG':>5} {'FFMA':>5} {'SHFL':>5} {'BAR':>6}")
    print(head)
    print("-" * len(head))
    for label, fn, consts, warps, voxels, trips in kernel_specs(args.sc, args.kernel, args.dims, args.size):
        rep = compile_report(fn, consts, warps, args.arch)
        threads = 32 * warps
        if len(rep["loops"]) != len(trips):
            raise RuntimeError(f"{label}: {len(rep['loops'])} loops in the SASS, {len(trips)} expected")
        # dynamic count per program: the code once, then each loop's own body (without the loops inside
        # it) as many more times as it runs
        per_voxel = {}
        for key in ("instructions", *COUNTED):
            count, inner = rep["kernel"][key], 0
            for body, n in zip(rep["loops"], trips):
                count += (n - 1) * (body[key] - inner)
                inner = body[key]
            per_voxel[key] = threads * count / voxels
        per_voxel["BAR"] /= threads  # a barrier is one per block, not per thread
        occupancy = resident_warps(rep["registers"], warps)
        rows.append(dict(label=label, constants=consts, voxels_per_program=voxels, resident_warps=occupancy, **rep,
                         per_voxel=per_voxel))
        pv = per_voxel
        print(f"{label:<34} {rep['registers']:>4} {rep['stack_bytes']:>5} {occupancy:>8} {voxels:>8} |            "
              f"{pv['instructions']:>6.0f} {pv['LDG']:>5.1f} {pv['FFMA']:>5.1f} {pv['SHFL']:>5.1f} {pv['BAR']:>6.3f}")
    totals = {}
    for strategy, repeats in (("forward", {}), ("inline", {"inline: K (x2: of w, of gd)": 2}), ("split", {})):
        mine = [r for r in rows if r["label"].startswith(strategy + ":")]
        totals[strategy] = {key: sum(repeats.get(r["label"], 1) * r["per_voxel"][key] for r in mine)
                            for key in ("instructions", "LDG", "FFMA", "SHFL", "BAR")}
        t = totals[strategy]
        print(f"{'total ' + strategy:<34} {'':>4} {'':>5} {'':>8} {'':>8} |            {t['instructions']:>6.0f} "
              f"{t['LDG']:>5.1f} {t['FFMA']:>5.1f} {t['SHFL']:>5.1f} {t['BAR']:>6.3f}")
    print("per voxel: thread-instructions per voxel of one (sample, channel) row; BAR: barriers per voxel;\n"
          "warps/SM: resident warps the registers allow (of 64); stack: bytes of local memory (spills)")

    write_json_atomically(args.out, dict(arch=f"sm_{args.arch}", triton=triton.__version__, sc=args.sc,
                                         kernel=args.kernel, dims=args.dims, size=args.size, kernels=rows,
                                         totals_per_voxel=totals))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
