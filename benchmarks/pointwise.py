#!/usr/bin/env python
"""Deconver's 1x1 convolutions on the CPU: channels-last in oneDNN and the native weight-gradient kernel
(deconver/nn/pointwise.py) against BLAS on NC(D)HW tensors, the path the blocks took before.

    python benchmarks/pointwise.py [--channels 64] [--size 64] [--ratio 4] [--threads 1] [--repeats 3]
                                   [--out results/benchmarks/pointwise.json]

For the three shapes of a block's products at one geometry (default: stage 0 of the ISLES'22 preset,
C = 64 at 64³, batch 1, float32): ``C -> C`` (the mixer's input projection), ``C -> r C`` (the NDC
projection, the MLP's first layer) and ``r C -> C`` (the mixer's output projection, the MLP's second
layer), each part of the product's training step in both forms, in this process, alternating: the
forward product (with bias), the input's gradient, the weight's and bias's gradients. "BLAS" is
``deconver.nn.pointwise`` on NC(D)HW tensors (MKL's SGEMM in PyTorch's wheels); "channels-last" the
same functions on channels-last tensors: oneDNN's inner product for the first two, the native kernel
(deconver/nn/ndc_cpu.py) for the third. Each time is the median of ``--repeats`` calls after one
warm-up; every call allocates its output, as the step does (page faults included). Prints each speed-up
and the multiply-accumulates per second, and writes them (atomically) to ``--out`` with the machine's
load and provenance. Refuses to run where oneDNN's inner product or the native kernels are missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=64, help="C (a multiple of 16)")
    parser.add_argument("--size", type=int, default=64, help="edge of the cubic image")
    parser.add_argument("--ratio", type=int, default=4, help="expansion r of the wide products")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per part and path")
    parser.add_argument("--out", default="results/benchmarks/pointwise.json")
    args = parser.parse_args(argv)

    import torch

    from deconver.complexity.runtime import _timed
    from deconver.io import provenance, write_json_atomic
    from deconver.nn import ndc_cpu
    from deconver.nn import pointwise as pw

    torch.set_num_threads(args.threads)

    def median_seconds(fn) -> float:  # one warm-up call, then the median of --repeats
        return statistics.median(_timed(fn, torch.device("cpu"), args.repeats, 1)) / 1e3
    c, n, r = args.channels, args.size, args.ratio
    probe = torch.empty(1, c, 2, 2, 2, memory_format=torch.channels_last_3d)
    if not pw._onednn_ok(probe) or not ndc_cpu.weight_grad_supported(torch.empty(8, r * c), torch.empty(8, c)):
        print("oneDNN's inner product or the native kernels are not available here", file=sys.stderr)
        return 1

    def cl(t):
        return t.contiguous(memory_format=torch.channels_last_3d)

    load_before, rows = os.getloadavg(), []
    print(f"C={c} r={r} {n}^3, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'product':10s} {'part':16s} {'BLAS NC s':>10s} {'CL s':>8s} {'speed-up':>9s} {'CL GMAC/s':>10s}")
    for cin, cout in [(c, c), (c, r * c), (r * c, c)]:
        a, g = torch.randn(1, cin, n, n, n), torch.randn(1, cout, n, n, n)
        w, b = torch.randn(cout, cin, 1, 1, 1), torch.randn(cout)
        a_cl, g_cl = cl(a), cl(g)
        gmac = cin * cout * n**3 / 1e9
        parts = [
            ("forward", lambda: pw._gemm_forward(a, w, b, False), lambda: pw._gemm_forward(a_cl, w, b, True)),
            ("input gradient", lambda: pw._gemm_backward(g, a, w, True, False, False),
             lambda: pw._gemm_backward(g_cl, a_cl, w, True, False, False)),
            ("weight gradient", lambda: pw._gemm_backward(g, a, w, False, True, True),
             lambda: pw._gemm_backward(g_cl, a_cl, w, False, True, True)),
        ]
        for part, blas, fast in parts:
            t_blas, t_fast = median_seconds(blas), median_seconds(fast)
            row = {"product": f"{cin}->{cout}", "part": part, "blas_nc_s": t_blas, "channels_last_s": t_fast,
                   "speedup": t_blas / t_fast, "gmac": gmac, "channels_last_gmac_per_s": gmac / t_fast,
                   "blas_nc_gmac_per_s": gmac / t_blas}
            rows.append(row)
            print(f"{row['product']:10s} {part:16s} {t_blas:10.3f} {t_fast:8.3f} {row['speedup']:8.2f}x "
                  f"{row['channels_last_gmac_per_s']:10.1f}")
    total_blas, total_fast = sum(x["blas_nc_s"] for x in rows), sum(x["channels_last_s"] for x in rows)
    print(f"{'all':27s} {total_blas:10.3f} {total_fast:8.3f} {total_blas / total_fast:8.2f}x")
    write_json_atomic(args.out, {
        "benchmark": "pointwise_cpu", "geometry": {"channels": c, "ratio": r, "size": n, "batch": 1},
        "threads": args.threads, "repeats": args.repeats, "results": rows,
        "total": {"blas_nc_s": total_blas, "channels_last_s": total_fast, "speedup": total_blas / total_fast},
        "load_average": {"before": load_before, "after": os.getloadavg()}, "provenance": provenance("cpu")})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
