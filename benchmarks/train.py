"""Training-step benchmark: seconds per step and peak memory of every registered model at each dataset
preset's roi, through the engine's own training step (`SegmentationModule.training_step`: the preset's
loss on the model's logits, backward, AdamW update).

    python benchmarks/train.py [--models unet,dynunet] [--presets hippocampus,isles22] [--steps 2]
                               [--batch-size 1|preset] [--device cpu|cuda] [--timeout 600]
                               [--precisions 32,bf16-mixed] [--variant deconver:checkpointing=true]
                               [--reference dynunet] [--profile] [--child-env KEY=VALUE]
                               [--keep-freed-memory] [--out results/benchmarks/train.json]

Each (model, preset) runs in its own process, so peak memory is that pair's alone: on a GPU, CUDA's
max allocated bytes; on the CPU, the process's peak RSS and its increase over the RSS before the first
step (model, optimizer and batch already allocated). On CPU the batch is 1 by default (paper batches at
paper rois do not fit a small machine); on a GPU the preset's batch; never below the model's registered
``min_batch``. One warm-up step, then the median of
`--steps` timed steps. Pairs the registry refuses (dims, roi) are listed as skipped with the reason.

* FLOPs: every run counts its model's forward FLOPs at the roi and batch (``torch.utils.flop_counter``
  on shape-only tensors, deconver.complexity) and reports seconds per forward TFLOP of the step and
  that figure's ratio to the ``--reference`` model's (default dynunet) at the same preset and precision.
* ``--precisions``: every run once per precision (``32``; ``bf16-mixed``: forward and loss under
  ``torch.autocast(bfloat16)``, as Lightning's ``bf16-mixed`` does); ratios against ``32``.
* ``--variant MODEL:KEY=VALUE[,...]`` (repeatable): one more run of MODEL with these keyword
  arguments (as a study's ``model_overrides``; values parsed as YAML); its time and memory ratios
  against the plain MODEL at the same preset and precision, measured in the same run.
* ``--profile``: one more step per run under ``torch.profiler``: the top operators by self time
  (device time on CUDA), with their share of the step, in the JSON and printed.
* CPU memory: a second process per run, with glibc told to return every allocation of 64 KiB or more
  to the system on free (benchmarks/ndc.py's ``MALLOC_ENV``), so that the resident set follows the live
  tensors: after one warm-up step, the peak is the resident set's high-water mark during one step minus
  the resident set before it (model, optimizer state and batch). The timing process runs with the
  allocator settings the engine uses by default (``--keep-freed-memory``: glibc keeps freed memory for
  reuse, deconver.engine.allocator, as `deconver train` does with ``trainer.keep_freed_memory: true``;
  each run records which); it also
  records process CPU seconds and their system part per step (less sensitive than wall time to a shared
  machine's load). The machine's load average is recorded before and after.
* ``--child-env KEY=VALUE`` (repeatable): environment variables of every timing process, e.g. glibc's
  ``MALLOC_MMAP_MAX_=0`` (large tensors then come from the heap and are reused instead of being mapped
  afresh, page by page, at every allocation); recorded in the JSON. The memory process keeps its own.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("hippocampus", "isles22", "brats23", "glas", "fives")


PRECISIONS = ("32", "bf16-mixed")  # bf16-mixed: forward and loss under autocast (deconver.cost.measure.AUTOCAST)


def child(model: str, preset_name: str, steps: int, batch: str, device: str, kwargs: dict | None = None,
          precision: str = "32", profile: bool = False, mode: str = "time", threads: int | None = None,
          keep_memory: bool = False) -> dict:
    """One (model, preset, kwargs, precision) measurement, in this process: ``mode="time"`` (time per
    step, FLOPs, profile) or ``"memory"`` (CPU: peak resident-set growth over one step after a warm-up).
    ``keep_memory``: a CPU timing process applies the engine's allocator setting first."""
    import torch

    from deconver.engine.allocator import training_allocator

    if mode == "time":  # the memory process keeps MALLOC_ENV, which returns every large block
        allocator = training_allocator(keep_memory, device.split(":")[0])

    from deconver import registry
    from deconver.complexity import flop_counter_count
    from deconver.config import load_preset
    from deconver.cost.measure import peak_rss_mb, train_step_fn

    kwargs = kwargs or {}
    allocated_before = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    if threads:
        torch.set_num_threads(threads)
    preset = load_preset(preset_name)
    roi = tuple(preset.protocol.roi_size)
    b = preset.protocol.batch_size if batch == "preset" else int(batch)
    b = max(b, registry.model_info(model).min_batch)  # e.g. BatchNorm on a 1 x 1 map needs 2
    # the engine's own training step (the preset's loss, backward, AdamW), as `deconver calibrate` times it
    step, net, _, optimizer = train_step_fn(model, preset, kwargs, batch=b, device=device, precision=precision)
    out = {"model": model, "preset": preset_name, "kwargs": kwargs, "precision": precision, "roi": list(roi),
           "batch_size": b, "device": device, "threads": torch.get_num_threads(),
           "params": sum(x.numel() for x in net.parameters())}
    if mode == "time":
        out["allocator"] = allocator
    if mode == "memory":  # CPU: one warm-up step, then the resident set's growth over one step
        from ndc import cpu_peak_mib  # benchmarks/ndc.py, beside this file

        step()
        optimizer.zero_grad(set_to_none=True)
        return {**out, "peak_memory_mb": cpu_peak_mib(step)}
    flops = flop_counter_count(net, (b, preset.in_channels, *roi), fake=True, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_rss_mb()
    warmup = step()
    cpu0 = os.times()
    times = [step() for _ in range(steps)]
    cpu1 = os.times()
    out.update({"forward_flops": flops.flops, "flop_count_error": flops.error, "warmup_s": warmup,
                "seconds_per_step": statistics.median(times), "step_times_s": times,
                "cpu_seconds_per_step": (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / max(1, steps),
                "system_seconds_per_step": (cpu1.system - cpu0.system) / max(1, steps)})
    for key in ("seconds", "cpu_seconds"):
        out[f"{key}_per_tflop"] = out[f"{key}_per_step"] / (flops.flops / 1e12) if flops.flops else None
    if device.startswith("cuda"):  # (what earlier runs left allocated, in-process: reported, should be ~0)
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_allocated_before_mb"] = allocated_before / 2**20
    else:  # the driver replaces it with the memory child's figure
        out["peak_rss_mb"] = peak_rss_mb()
        out["peak_memory_mb"] = peak_rss_mb() - rss_before
    if profile:
        from ndc import profile_top  # benchmarks/ndc.py, beside this file

        out["profile"] = profile_top(step, torch.device(device), top=25)
    return out


def plan(models: list[str], presets: list[str]) -> tuple[list[tuple[str, str]], list[dict]]:
    """Pairs the study plan's check accepts at the preset's roi, and the skipped ones with the reason."""
    from deconver.config import load_preset
    from deconver.plan import fit_problem

    run, skipped = [], []
    for preset_name in presets:
        preset = load_preset(preset_name)
        for model in models:
            # the batch is raised to the model's min_batch in `child`: no reason to skip
            why = fit_problem(model, preset, batch_size=None)
            if why is None:
                run.append((model, preset_name))
            else:
                skipped.append({"model": model, "preset": preset_name, "status": "skipped", "reason": why})
    return run, skipped


def _run_child(cmd: list[str], env: dict, timeout: float) -> dict:
    """A child's JSON result with ``status`` ok, or status timeout/error and the reason."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    if proc.returncode != 0:
        err = proc.stderr.strip()
        return {"status": "error", "reason": err.splitlines()[-1] if err else f"rc {proc.returncode}"}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "status": "ok"}


def _in_process(*run) -> dict:
    """:func:`child` in this process (GPU), with the CUDA cache emptied afterwards; errors as a status."""
    import gc

    import torch

    try:
        return {**child(*run), "status": "ok"}
    except Exception as err:  # an out-of-memory run is a result, not the end of the benchmark
        return {"status": "error", "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def parse_variant(text: str) -> tuple[str, dict]:
    """``MODEL:KEY=VALUE[,KEY=VALUE...]`` -> (MODEL, {KEY: value parsed as YAML}); a clear error otherwise."""
    import yaml

    model, sep, assignments = text.partition(":")
    pairs = [item.partition("=") for item in assignments.split(",")] if sep else []
    if not model or not pairs or any(not k or not eq for k, eq, _ in pairs):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected MODEL:KEY=VALUE[,KEY=VALUE...], "
                                         "e.g. deconver:checkpointing=true")
    return model, {k.strip(): yaml.safe_load(v) for k, _, v in pairs}


def _ratio(a, b):
    return None if a is None or not b else a / b


def add_ratios(results: list[dict], reference: str) -> None:
    """Per ok result: ``vs_plain`` (a variant against the plain model), ``vs_fp32`` (another precision
    against ``32``) and ``per_flop_vs_reference`` (seconds per FLOP against the reference model's),
    all between runs of the same preset (and precision) in this benchmark run."""
    ok = {(r["model"], r["preset"], json.dumps(r.get("kwargs", {}), sort_keys=True), r.get("precision", "32")): r
          for r in results if r["status"] == "ok"}
    for (model, preset, kw, precision), r in ok.items():
        def against(other):
            return {"time": _ratio(r["seconds_per_step"], other["seconds_per_step"]),
                    "cpu_time": _ratio(r.get("cpu_seconds_per_step"), other.get("cpu_seconds_per_step")),
                    "memory": _ratio(r["peak_memory_mb"], other["peak_memory_mb"])}

        if kw != "{}" and (model, preset, "{}", precision) in ok:
            r["vs_plain"] = against(ok[model, preset, "{}", precision])
        if precision != "32" and (model, preset, kw, "32") in ok:
            r["vs_fp32"] = against(ok[model, preset, kw, "32"])
        ref = ok.get((reference, preset, "{}", precision))
        if ref is not None:
            r["per_flop_vs_reference"] = _ratio(r.get("seconds_per_tflop"), ref.get("seconds_per_tflop"))
            r["cpu_per_flop_vs_reference"] = _ratio(r.get("cpu_seconds_per_tflop"), ref.get("cpu_seconds_per_tflop"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated model names (default: every registered model)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated dataset presets")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--batch-size", default=None, help="an integer, or 'preset' (default: 1 on CPU, preset on GPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run (model, preset, variant, precision)")
    parser.add_argument("--precisions", default="32",
                        help=f"comma-separated precisions, each run once per precision: {', '.join(PRECISIONS)}")
    parser.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="MODEL:KEY=VALUE,...",
                        help="one more run of MODEL with these keyword arguments (repeatable), with ratios "
                        "against the plain MODEL; e.g. deconver:checkpointing=true")
    parser.add_argument("--reference", default="dynunet", help="model whose seconds per FLOP the others are "
                        "compared with, per preset (default: dynunet)")
    parser.add_argument("--profile", nargs="?", const="*", default="", metavar="MODELS",
                        help="profile one more step of every run (top operators); optionally only these "
                        "comma-separated models")
    parser.add_argument("--no-memory", action="store_true", help="CPU: skip the second (memory) process of "
                        "every run; peak memory is then the timing process's RSS growth, allocator cache included")
    parser.add_argument("--in-process", action="store_true",
                        help="GPU only: every run in this process, one after the other (CUDA's peak counters "
                        "are reset per run and the cache emptied between runs), saving a process start per run")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of every run (default: "
                        "torch's); 1 on a shared machine, where OpenMP threads waiting at barriers for a "
                        "descheduled partner inflate the time of some kernels many times")
    parser.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable of every timing process (repeatable), e.g. MALLOC_MMAP_MAX_=0")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU: the timing processes keep freed memory for reuse (glibc, deconver.engine.allocator), "
                        "as `deconver train` with trainer.keep_freed_memory: true; the memory processes never do")
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "train.json"))
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PRESET"), help=argparse.SUPPRESS)
    parser.add_argument("--child-kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", default="time", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    if any(pr not in PRECISIONS for pr in precisions):
        parser.error(f"--precisions {args.precisions!r}: each should be one of {', '.join(PRECISIONS)}")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch_size or ("1" if device == "cpu" else "preset")
    if args.child:
        print(json.dumps(child(*args.child, args.steps, batch, device, json.loads(args.child_kwargs),
                               precisions[0], bool(args.profile), args.child_mode, args.threads,
                               keep_memory=args.keep_freed_memory)))
        return 0
    if args.in_process and not device.startswith("cuda"):
        parser.error("--in-process needs --device cuda (the CPU peak is a process's resident set)")

    from tqdm import tqdm

    from ndc import MALLOC_ENV  # benchmarks/ndc.py, beside this file

    from deconver import registry

    models = args.models.split(",") if args.models else registry.list_models()
    pairs, results = plan(models, args.presets.split(","))
    runs = [(model, preset_name, kwargs, precision) for model, preset_name in pairs for precision in precisions
            for kwargs in [{}] + [kw for name, kw in args.variant if name == model]]
    if any("=" not in item for item in args.child_env):
        parser.error(f"--child-env {args.child_env!r}: expected KEY=VALUE")
    child_env = dict(os.environ, **dict(item.split("=", 1) for item in args.child_env))
    load_before = os.getloadavg()
    for model, preset_name, kwargs, precision in tqdm(runs, desc="train-step benchmark", unit="run", file=sys.stderr):
        cmd = [sys.executable, __file__, "--child", model, preset_name, "--steps", str(args.steps),
               "--batch-size", batch, "--device", device, "--precisions", precision,
               "--child-kwargs", json.dumps(kwargs)] + (["--threads", str(args.threads)] if args.threads else []) \
            + (["--keep-freed-memory"] if args.keep_freed_memory else [])
        what = {"model": model, "preset": preset_name, "kwargs": kwargs, "precision": precision}
        profile = args.profile == "*" or model in args.profile.split(",")
        if args.in_process:
            results.append({**what, **_in_process(model, preset_name, args.steps, batch, device, kwargs, precision,
                                                   profile, "time", args.threads)})
            continue
        timed = _run_child(cmd + (["--profile"] if profile else []), child_env, args.timeout)
        if timed.get("status") == "ok" and device == "cpu" and not args.no_memory:  # exact peak: see MALLOC_ENV
            mem = _run_child(cmd + ["--child-mode", "memory"], dict(os.environ, **MALLOC_ENV), args.timeout)
            timed["peak_memory_timing_process_mb"] = timed["peak_memory_mb"]
            timed["peak_memory_mb"] = mem.get("peak_memory_mb")
            if mem.get("status") != "ok":
                timed["memory_error"] = mem.get("reason", mem.get("status"))
        results.append({**what, **timed})
        report = write_report(args, device, batch, precisions, load_before, results)  # after every run
    report = write_report(args, device, batch, precisions, load_before, results)
    print(format_table(results, args.reference))
    print(f"load average (1, 5, 15 min) before {load_before}, after {report['load_average']['after']}", file=sys.stderr)
    print(f"written: {args.out}", file=sys.stderr)
    return 0


def write_report(args, device: str, batch: str, precisions: list[str], load_before, results: list[dict]) -> dict:
    """The JSON result with the ratios so far (written after every run: an interrupted benchmark keeps them)."""
    from deconver.io import provenance, write_json_atomic

    add_ratios(results, args.reference)
    report = {"benchmark": "train_step", "device": device, "batch_size": batch, "steps": args.steps,
              "threads": args.threads, "precisions": precisions, "reference": args.reference,
              "child_env": args.child_env, "keep_freed_memory": args.keep_freed_memory,
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "provenance": provenance(device), "results": results}
    write_json_atomic(args.out, report)
    return report


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_table(results: list[dict], reference: str = "dynunet") -> str:
    lines = [f"| model | preset | kwargs | precision | roi | batch | s/step | CPU s/step | peak MB | GFLOP fwd | "
             f"CPU s/TFLOP | per FLOP vs {reference} (wall, CPU) | vs plain (wall, CPU, mem) | "
             "vs fp32 (wall, CPU, mem) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["preset"], r["model"], json.dumps(r.get("kwargs", {})), r.get("precision", ""))):
        kw = ",".join(f"{k}={v}" for k, v in r.get("kwargs", {}).items())
        head = f"| {r['model']} | {r['preset']} | {kw} | {r.get('precision', '32')} |"
        if r["status"] != "ok":
            lines.append(head + " |" * 10 + f" {r['status']}: {r.get('reason', '')[:80]} |")
            continue
        pair = {k: ", ".join(_fmt(r[k][q], ".2f") + "x" for q in ("time", "cpu_time", "memory") if r[k][q] is not None)
                for k in ("vs_plain", "vs_fp32") if k in r}
        per_flop = ", ".join(_fmt(r.get(k), ".2f") for k in ("per_flop_vs_reference", "cpu_per_flop_vs_reference"))
        lines.append(f"{head} {'x'.join(map(str, r['roi']))} | {r['batch_size']} | {r['seconds_per_step']:.3f} | "
                     f"{_fmt(r.get('cpu_seconds_per_step'), '.3f')} | {_fmt(r.get('peak_memory_mb'), '.0f')} | "
                     f"{_fmt(r.get('forward_flops') and r['forward_flops'] / 1e9, '.1f')} | "
                     f"{_fmt(r.get('cpu_seconds_per_tflop'), '.2f')} | {per_flop} | "
                     f"{pair.get('vs_plain', '')} | {pair.get('vs_fp32', '')} | ok |")
    for r in results:
        for e in r.get("profile", [])[:12] if r["status"] == "ok" else []:
            lines.append(f"  profile {r['model']} {r['preset']} {r.get('kwargs') or ''} {r.get('precision')}: "
                         f"{e['name']} {e['self_ms']:.1f} ms ({100 * e['share']:.1f} %, {e['calls']} calls)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
