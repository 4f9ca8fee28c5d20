#!/usr/bin/env python
"""Benchmark the two NDC implementations (``reference`` vs ``lean``): time and peak memory.

Measures, for the BraTS preset's layer geometries (depth-wise, ratio 4, k3; stage i has width
32 * 2**i at 64**3 / 2**i voxels on CPU) and for one training step of the whole ``brats23`` network,
the median forward, backward and forward+backward time and the peak memory, for both
implementations, and their ratios (always measured in the same run).

Method:
* every (configuration, implementation) runs in a fresh subprocess, alternating implementations;
* time: ``--repeats`` timed iterations after ``--warmup`` iterations, median reported; on CUDA the
  clock is read after ``torch.cuda.synchronize()``;
* CPU peak memory: a second fresh subprocess per configuration and implementation, with glibc told to
  serve every allocation of 64 KiB or more by mmap and to return it on free
  (``MALLOC_MMAP_THRESHOLD_=65536``, ``MALLOC_TRIM_THRESHOLD_=0``), so that the resident set follows the
  live tensors; after one warm-up iteration the kernel's high-water mark is reset
  (``/proc/self/clear_refs``) and the peak is ``VmHWM`` during one more iteration minus ``VmRSS``
  before it (model, optimizer state and inputs are in the baseline, the gradients are not);
* GPU peak memory: ``torch.cuda.max_memory_allocated()`` during one iteration minus the memory
  allocated before it;
* ``--lean-variant NAME:KEY=VALUE,...``: the lean implementation once more with these environment
  variables (e.g. the fused backward's filter-gradient strategy), with its own ratios to the reference;
* ``--profile``: one more subprocess per run that profiles one iteration after the warm-up with
  ``torch.profiler`` and records the top operators and kernels by self time (device time on CUDA).

Usage::

    python benchmarks/ndc.py                  # full CPU run -> results/benchmarks/ndc.json
    python benchmarks/ndc.py --quick          # small sizes, a minute or two
    python benchmarks/ndc.py --device cuda --out results/benchmarks/ndc_cuda.json
    python benchmarks/ndc.py --device cuda --only layer --stages 1 --profile \
        --lean-variant split:DECONVER_NDC_BACKWARD=split   # + per-kernel times, a variant
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("reference", "lean")
# glibc maps every allocation of 64 KiB or more and returns it on free: the RSS follows the live tensors
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# --------------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------------
def configurations(device: str, quick: bool, stages: int | None = None) -> list[dict]:
    """Layer geometries of the brats23 preset and the whole-network training step."""
    if device == "cpu":
        base, layer_batches, net_sizes = (32, 64), (1, 2), [(64, 1)]
        if quick:
            base, layer_batches, net_sizes = (32, 32), (1,), [(32, 1)]
    else:
        base, layer_batches, net_sizes = (32, 128), (1, 2), [(64, 1), (128, 1), (128, 2)]
        if quick:
            base, layer_batches, net_sizes = (32, 64), (1,), [(64, 1)]
    configs = []
    stages = stages or (2 if quick else 5)
    for stage in range(stages):
        channels, size = base[0] * 2**stage, base[1] // 2**stage
        for batch in layer_batches:
            configs.append(dict(kind="layer", stage=stage, channels=channels, size=size, batch=batch))
    for size, batch in net_sizes:
        configs.append(dict(kind="network", preset="brats23", size=size, batch=batch))
    return configs


def label(cfg: dict) -> str:
    if cfg["kind"] == "layer":
        return f"layer stage {cfg['stage']} C={cfg['channels']} {cfg['size']}^3 B={cfg['batch']}"
    return f"{cfg['preset']} train step {cfg['size']}^3 B={cfg['batch']}"


# --------------------------------------------------------------------------------------------------
# worker: one configuration, one implementation, one process
# --------------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_mib(step) -> float:
    """MiB the resident set grows by at its highest during ``step()`` over what it was before it (run the
    process with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` so it follows the live tensors)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - base) / 1024


def profile_top(step, dev, top: int = 15) -> list[dict]:
    """The ``top`` operators and kernels of one iteration by self time on the device (CPU: on the CPU),
    from ``torch.profiler``: name, calls, self milliseconds and share of the iteration's total."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    # on CUDA only the kernels themselves (an operator's self device time repeats its kernels')
    kind = torch.autograd.DeviceType.CUDA if dev.type == "cuda" else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if getattr(e, key) > 0 and e.device_type == kind]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [dict(name=e.key, calls=e.count, self_ms=round(getattr(e, key) / 1e3, 3),
                 share=round(getattr(e, key) / total, 4)) for e in events[:top]]


def worker(cfg: dict, impl: str, mode: str, device: str, warmup: int, repeats: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from deconver.nn import NDC, Deconver

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    if cfg["kind"] == "layer":
        c, s, b = cfg["channels"], cfg["size"], cfg["batch"]
        module = NDC(c, 3, ratio=4, groups=-1, spatial_dims=3, impl=impl).to(dev)
        x = torch.rand(b, c, s, s, s, device=dev, requires_grad=True)  # NDC inputs are >= 0
        with torch.no_grad():  # the incoming gradient, in the layout the layer answers in
            gy = torch.randn_like(module(x))
        optimizer = None

        def forward():
            return module(x)

        def backward(y):
            y.backward(gy)

        def zero():
            x.grad = None
            module.zero_grad(set_to_none=True)

    else:
        s, b = cfg["size"], cfg["batch"]
        module = Deconver.from_preset(cfg["preset"], ndc_impl=impl).to(dev)
        x = torch.randn(b, module.in_channels, s, s, s, device=dev)
        target = (torch.rand(b, module.out_channels, s, s, s, device=dev) > 0.5).float()
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=1e-5)

        def forward():
            return torch.nn.functional.binary_cross_entropy_with_logits(module(x), target)

        def backward(loss):
            loss.backward()
            optimizer.step()

        def zero():
            optimizer.zero_grad(set_to_none=True)

    def step():
        zero()
        sync()
        t0 = time.perf_counter()
        y = forward()
        sync()
        t1 = time.perf_counter()
        backward(y)
        sync()
        t2 = time.perf_counter()
        del y
        return t1 - t0, t2 - t1

    for _ in range(warmup):
        step()
    result = {}
    if mode == "profile":
        return dict(profile=profile_top(step, dev))
    if mode == "memory":
        zero()
        if dev.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            step()
            result["peak_mib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        else:
            result["peak_mib"] = cpu_peak_mib(step)
        return result
    times = [step() for _ in range(repeats)]
    result["forward_s"] = statistics.median(t[0] for t in times)
    result["backward_s"] = statistics.median(t[1] for t in times)
    result["total_s"] = statistics.median(t[0] + t[1] for t in times)
    result["all_s"] = [[round(a, 5), round(b_, 5)] for a, b_ in times]
    if dev.type == "cuda":  # cheap and exact on GPU: take the peak from the timing process
        zero()
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        result["peak_mib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    return result


def run_worker(cfg: dict, impl: str, mode: str, args, extra_env: dict | None = None) -> dict:
    env = dict(os.environ, **(extra_env or {}))
    if mode == "memory" and args.device == "cpu":
        env.update(MALLOC_ENV)
    payload = json.dumps(dict(cfg=cfg, impl=impl, mode=mode, device=args.device, warmup=args.warmup,
                              repeats=args.repeats if cfg["kind"] == "layer" else args.net_repeats,
                              threads=args.threads))
    proc = subprocess.run([sys.executable, __file__, "--worker", payload], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {label(cfg)} / {impl} {extra_env or ''} / {mode}:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def environment(args) -> dict:
    import torch

    info = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        threads=args.threads or torch.get_num_threads(),
        device=args.device,
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        # "0": the lean layer ran unfused (cuDNN) on CUDA; see deconver/nn/ndc_triton.py
        DECONVER_NDC_FUSED=os.environ.get("DECONVER_NDC_FUSED", "1"),
        DECONVER_NDC_BACKWARD=os.environ.get("DECONVER_NDC_BACKWARD", "inline"),  # lean runs; see --lean-variant
    )
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if args.device == "cuda":
        sys.path.insert(0, str(ROOT))
        from deconver.nn.ndc_update import _triton_kernels

        info["gpu"] = torch.cuda.get_device_name(0)
        info["ndc_fused"] = _triton_kernels() is not None and info["DECONVER_NDC_FUSED"] != "0"
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    return info


def write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _fmt(value, unit="", digits=3):
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:KEY=VALUE[,KEY=VALUE...]`` -> (NAME, {KEY: VALUE}); a clear error for anything else."""
    name, sep, assignments = text.partition(":")
    pairs = [item.partition("=") for item in assignments.split(",")] if sep else []
    if not name or name in IMPLS or not pairs or any(not k or not eq for k, eq, _ in pairs):
        raise argparse.ArgumentTypeError(
            f"--lean-variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...] with a NAME other than "
            f"{' or '.join(IMPLS)}, e.g. split:DECONVER_NDC_BACKWARD=split")
    return name, {k: v for k, _, v in pairs}


def _ratios(ref: dict, other: dict) -> dict:
    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    return dict(
        forward_speedup=ratio(ref["forward_s"], other["forward_s"]),
        backward_speedup=ratio(ref["backward_s"], other["backward_s"]),
        total_speedup=ratio(ref["total_s"], other["total_s"]),
        memory_ratio=ratio(other.get("peak_mib"), ref.get("peak_mib")),
    )


def print_table(rows: list[dict]) -> None:
    head = f"{'configuration':<36} {'impl':<12} {'fwd s':>8} {'bwd s':>8} {'f+b s':>8} {'peak MiB':>9}"
    print(head)
    print("-" * len(head))
    for row in rows:
        measured = [("reference", row["reference"], None), ("lean", row["lean"], row["ratios"])]
        measured += [(name, v, v["ratios"]) for name, v in row.get("variants", {}).items()]
        for name, r, q in measured:
            print(f"{row['label']:<36} {name:<12} {_fmt(r.get('forward_s')):>8} {_fmt(r.get('backward_s')):>8} "
                  f"{_fmt(r.get('total_s')):>8} {_fmt(r.get('peak_mib'), digits=0):>9}")
            if q:
                print(f"{'':<36} {'  speedup':<12} {_fmt(q['forward_speedup'], 'x', 2):>8} "
                      f"{_fmt(q['backward_speedup'], 'x', 2):>8} {_fmt(q['total_speedup'], 'x', 2):>8} "
                      f"{_fmt(q['memory_ratio'], 'x', 2):>9}")
            for p in r.get("profile", [])[:8]:
                print(f"{'':<36} {'':<12} {p['self_ms']:>10.3f} ms {100 * p['share']:5.1f} % x{p['calls']:<4} {p['name'][:70]}")
    print("speedup = reference time / this time; memory = this peak / reference peak")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and fewer repeats")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "ndc.json",
                        help="JSON output (written atomically); default results/benchmarks/ndc.json")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations per layer config")
    parser.add_argument("--net-repeats", type=int, default=None, help="timed iterations per network config")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: default)")
    parser.add_argument("--only", choices=("layer", "network"), default=None)
    parser.add_argument("--stages", type=int, default=None, help="layer stages to run, from stage 0 (default 5; 2 with --quick)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument("--lean-variant", type=parse_variant, action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="also run the lean implementation with these environment variables (repeatable), "
                             "e.g. split:DECONVER_NDC_BACKWARD=split")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one iteration of every implementation (torch.profiler; top operators "
                             "and kernels by self time, in the table and the JSON)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        p = json.loads(args.worker)
        res = worker(p["cfg"], p["impl"], p["mode"], p["device"], p["warmup"], p["repeats"], p["threads"])
        print(json.dumps(res))
        return 0

    args.repeats = args.repeats or (3 if args.quick else 5)
    args.net_repeats = args.net_repeats or (2 if args.quick else 3)
    configs = [c for c in configurations(args.device, args.quick, args.stages) if args.only in (None, c["kind"])]
    info = environment(args)
    # (name, implementation, extra environment) of every measured run; ratios are against "reference"
    runs = [(impl, impl, {}) for impl in IMPLS] + [(name, "lean", env) for name, env in args.lean_variant]
    rows = []
    for cfg in configs:
        load_before = os.getloadavg()
        res = {}
        for name, impl, env in runs:
            res[name] = run_worker(cfg, impl, "time", args, env)
            print(f"  {label(cfg)} {name}: {res[name]['total_s']:.3f} s", file=sys.stderr, flush=True)
        for name, impl, env in runs:
            if args.device == "cpu" and not args.no_memory:
                res[name].update(run_worker(cfg, impl, "memory", args, env))
            if args.profile:
                res[name].update(run_worker(cfg, impl, "profile", args, env))
        ref = res["reference"]
        rows.append(dict(
            label=label(cfg), config=cfg, reference=ref, lean=res["lean"], ratios=_ratios(ref, res["lean"]),
            variants={name: dict(env=env, **res[name], ratios=_ratios(ref, res[name]))
                      for name, _, env in runs[len(IMPLS):]},
            loadavg_before=load_before, loadavg_after=os.getloadavg(),
        ))
    print_table(rows)
    write_json_atomically(args.out, dict(environment=info, quick=args.quick, results=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
