#!/usr/bin/env python
"""The NDC's native CPU kernels (deconver/nn/ndc_cpu.py) against the convolution path they replace.

    python benchmarks/ndc_cpu.py [--channels 64] [--size 64] [--sc 4] [--kernel 3] [--threads 1]
                                 [--repeats 3] [--out results/benchmarks/ndc_cpu.json]

For one depth-wise layer geometry (default: stage 0 of the ISLES'22 preset, C = 64 at 64³, sc = 4,
3³ filter, batch 1, channels-last float32), each step of the lean update's forward and backward in
both forms, in this process, alternating: ``K(s)``; the forward update ``s * (A(x) + eps) / (A(K(s)) +
eps)``; the backward's ratios ``R = N / D`` and ``w = g * s / D``; ``dL/dz = (g * R + A(gt1)) * relu'``;
one filter gradient. Each time is the median of ``--repeats`` calls after one warm-up; every call
allocates the outputs the training step allocates (``K``'s, the ratios' two: their page faults are part
of the time) and writes the others over existing tensors, as the step does. Prints a
table with the speed-up and the multiply-accumulates per second of each, and writes them (atomically)
to ``--out`` with the machine's load and provenance. Refuses to run where the kernels are not built.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=64, help="C (a multiple of 8)")
    parser.add_argument("--size", type=int, default=64, help="edge of the cubic image")
    parser.add_argument("--sc", type=int, default=4, help="source channels per channel")
    parser.add_argument("--kernel", type=int, default=3, help="odd filter size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the kernels use as many)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per step and path")
    parser.add_argument("--out", default="results/benchmarks/ndc_cpu.json")
    args = parser.parse_args(argv)

    import torch

    from deconver.complexity.runtime import _timed
    from deconver.io import provenance, write_json_atomic
    from deconver.nn import ndc_cpu
    from deconver.nn.ndc_ops import _adjoint_filter_grad, _k_op, adjoint_weight
    from deconver.nn.ndc_update import _slab_grad_z, _slab_ratios, _slab_update

    torch.set_num_threads(args.threads)

    def median_seconds(fn) -> float:  # one warm-up call, then the median of --repeats
        return statistics.median(_timed(fn, torch.device("cpu"), args.repeats, 1)) / 1e3
    c, sc, k, n = args.channels, args.sc, args.kernel, args.size
    h = torch.rand(c, sc, k, k, k)

    def cl(t):
        return t.contiguous(memory_format=torch.channels_last_3d)

    x, s, g = cl(torch.rand(1, c, n, n, n)), cl(torch.rand(1, c * sc, n, n, n)), cl(torch.randn(1, c * sc, n, n, n))
    if not ndc_cpu.supported(x, s, h, c):
        print("the native kernels do not take this geometry here (not built, or C / sc unsupported)", file=sys.stderr)
        return 1
    wa, eps = adjoint_weight(h, c).contiguous(), 1e-16
    t1 = _k_op(s, h, c)
    stencil = c * sc * k**3 * n**3 / 1e9  # GMAC of one stencil (K or A) over the image
    out, r = torch.empty_like(s), s.clone()  # written in place, as in the step (the update's output is s)
    steps = [  # (name, stencils, convolution path, native kernel)
        ("K(s)", 1, lambda: _k_op(s, h, c), lambda: ndc_cpu.k_op(s, h)),
        ("forward update", 2, lambda: _slab_update(x, out, s, t1, wa, c, eps),
         lambda: ndc_cpu.update(x, t1, s, wa, h, eps, out)),
        ("backward ratios", 2, lambda: _slab_ratios(x, t1, s, g, wa, c, eps, True, True),
         lambda: ndc_cpu.ratios(x, t1, s, g, wa, h, eps, True, True)),
        ("dL/dz", 1, lambda: _slab_grad_z(r, g, t1, s, wa, c, True),
         lambda: ndc_cpu.grad_z(r, g, t1, s, wa, h, True)),
        ("filter gradient", 1, lambda: _adjoint_filter_grad(x, g, wa, c), lambda: ndc_cpu.filter_grad(x, g, wa, h)),
    ]
    load_before, rows = os.getloadavg(), []
    print(f"C={c} sc={sc} k={k} {n}^3, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'step':18s} {'convolutions s':>15s} {'native s':>9s} {'speed-up':>9s} {'native GMAC/s':>14s}")
    for name, stencils, conv, native in steps:
        t_conv = median_seconds(conv)
        t_native = median_seconds(native)
        row = {"step": name, "convolutions_s": t_conv, "native_s": t_native, "speedup": t_conv / t_native,
               "gmac": stencils * stencil, "native_gmac_per_s": stencils * stencil / t_native}
        rows.append(row)
        print(f"{name:18s} {t_conv:15.3f} {t_native:9.3f} {row['speedup']:8.2f}x {row['native_gmac_per_s']:14.1f}")
    total_conv, total_native = sum(r["convolutions_s"] for r in rows), sum(r["native_s"] for r in rows)
    print(f"{'all':18s} {total_conv:15.3f} {total_native:9.3f} {total_conv / total_native:8.2f}x")
    write_json_atomic(args.out, {
        "benchmark": "ndc_cpu_kernels", "geometry": {"channels": c, "sc": sc, "kernel": k, "size": n, "batch": 1},
        "threads": args.threads, "repeats": args.repeats, "results": rows,
        "total": {"convolutions_s": total_conv, "native_s": total_native, "speedup": total_conv / total_native},
        "load_average": {"before": load_before, "after": os.getloadavg()}, "provenance": provenance("cpu")})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
