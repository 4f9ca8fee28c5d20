"""`deconver calibrate`: measure each (dataset, model) of a study on this device, into one calibration file.

For every (dataset, model) pair of the study plan (deconver.plan), in its own process (so that peak
memory is that pair's alone): the seconds per training step at the preset's roi and per-device batch
(the engine's own step: loss, backward, AdamW; median of `--steps` after one warm-up step), the seconds
per sliding-window batch of validation (`sw_batch_size` windows, no gradients), the peak memory of the
training step (CUDA: max allocated; CPU: the process's peak resident set) and the process's start-up
seconds (imports and building the model). Per dataset, when its cache is prepared, a data-loading rate:
training samples per second through the engine's own dataset (load, crop, augment).

Written atomically to ``<results>/<study>/calibration/<device>.json`` (`StudyPaths.calibration`), with
the device's name and memory and the machine's load, for `deconver plan` and the workflow's SLURM
requests (docs/cost.md).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from deconver.config import Study, load_study

FORMAT = 1  # calibration file format


def device_name(device: str) -> str:
    """A file-name-safe name of the device: the GPU model (e.g. nvidia-h200) or cpu-<N>core."""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{len(os.sched_getaffinity(0))}core"
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def device_memory_mb(device: str) -> float | None:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(0).total_memory / 2**20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError):
        return None


def measure_pair(study: Study, dataset: str, model: str, *, device: str, steps: int,
                 threads: int | None = None) -> dict:
    """One pair's measurements, in this process (the driver runs it in a child process)."""
    t_start = time.perf_counter()
    import torch

    if threads:
        torch.set_num_threads(threads)
    from deconver.cost.measure import median, median_time, peak_rss_mb, train_step_fn, window_batch_fn
    from deconver.engine.allocator import training_allocator
    from deconver.engine.distributed import per_device_batch, world_size

    allocator = training_allocator(study.trainer.keep_freed_memory, device.split(":")[0])  # as `deconver train`

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    preset = study.preset(dataset)
    batch = per_device_batch(preset.protocol.batch_size, world_size(study.trainer))
    train = train_step_fn(model, preset, study.model_kwargs(dataset, model), batch=batch, device=device,
                          precision=preset.protocol.precision if device.startswith("cuda") else "32")
    startup = time.perf_counter() - t_start
    warmup, times = median_time(train.step, steps)
    window = window_batch_fn(train.net, preset, device=device)
    _, window_times = median_time(window, max(1, steps // 2))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mb()
    return {"dataset": dataset, "model": model, "roi": list(preset.protocol.roi_size), "batch_per_device": batch,
            "sw_batch_size": preset.protocol.sw_batch_size, "startup_s": startup, "warmup_s": warmup,
            "seconds_per_step": median(times), "step_times_s": times,
            "seconds_per_window_batch": median(window_times), "peak_memory_mb": peak,
            "host_peak_rss_mb": peak_rss_mb(), "allocator": allocator, "status": "ok"}


def loading_rate(study: Study, dataset: str, *, seconds: float = 3.0) -> float | None:
    """Training samples per second through the engine's dataset (load, crop, augment), from the prepared
    cache; None when the dataset is not prepared yet."""
    from deconver.data import PreparedDataset
    from deconver.engine.datamodule import CaseStore, TrainDataset
    from deconver.paths import StudyPaths

    directory = StudyPaths.of(study).prepared(dataset)
    if not (directory / "manifest.json").is_file():
        return None
    prepared = PreparedDataset(directory)
    preset = study.preset(dataset)
    ids = list(prepared.case_ids)[:8]
    store = CaseStore(prepared, ids, cache_bytes=0)
    data = TrainDataset(store, preset.protocol, preset.spatial_dims, seed=0)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        data[(0, n, n % len(ids))]
        n += 1
    return n / (time.perf_counter() - t0)


def calibrate(study_file: str | Path, *, device: str, steps: int = 3, timeout: float = 600,
              threads: int | None = None, progress: bool = True) -> dict:
    """Measure every pair of the study's plan (each in a child process) and return the calibration."""
    from deconver.plan import plan_study

    study = load_study(study_file)
    pairs = plan_study(study).pairs()
    results = []
    for i, (dataset, model) in enumerate(pairs, 1):
        cmd = [sys.executable, "-m", "deconver", "calibrate", "--config", str(study_file), "--one",
               f"{dataset}:{model}", "--device", device, "--steps", str(steps)]
        if threads:
            cmd += ["--threads", str(threads)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                "dataset": dataset, "model": model, "status": "failed", "error": proc.stderr.strip()[-2000:]}
        except subprocess.TimeoutExpired:
            row = {"dataset": dataset, "model": model, "status": "timeout", "error": f"over {timeout:.0f} s"}
        results.append(row)
        if progress:
            took = time.perf_counter() - t0
            what = (f"{row['seconds_per_step']:.3f} s/step, {row['peak_memory_mb']:.0f} MB"
                    if row["status"] == "ok" else row["status"])
            print(f"[{i}/{len(pairs)}] {dataset} {model}: {what} ({took:.1f} s)", file=sys.stderr, flush=True)
    loading = {}
    for dataset in study.datasets:
        try:
            loading[dataset] = loading_rate(study, dataset)
        except Exception as err:  # noqa: BLE001 - a loading problem must not lose the timings
            loading[dataset] = None
            print(f"{dataset}: no data-loading rate ({err})", file=sys.stderr)
    from deconver.io import provenance

    return {"format": FORMAT, "study": study.study, "device": device_name(device), "device_kind": device.split(":")[0],
            "device_memory_mb": device_memory_mb(device), "steps": steps, "threads": threads,
            "load_average": os.getloadavg(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pairs": results, "loading_samples_per_s": loading, "provenance": provenance(device.split(":")[0])}


# --------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="study config (YAML)")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu or cuda")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per pair after one warm-up")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per measurement (as the study's jobs get them; default: torch's)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pair before it counts as failed")
    parser.add_argument("--out", default=None, help="calibration file (default: <results>/<study>/calibration/<device>.json)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # DATASET:MODEL, the child process


def run(args: argparse.Namespace) -> int:
    from deconver.io import write_json_atomic
    from deconver.paths import StudyPaths

    study = load_study(args.config)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        dataset, _, model = args.one.partition(":")
        print(json.dumps(measure_pair(study, dataset, model, device=device, steps=args.steps, threads=args.threads)))
        return 0
    calibration = calibrate(args.config, device=device, steps=args.steps, timeout=args.timeout, threads=args.threads)
    out = Path(args.out) if args.out else StudyPaths.of(study).calibration(calibration["device"])
    write_json_atomic(out, calibration)
    failed = [f"{r['dataset']}:{r['model']}" for r in calibration["pairs"] if r["status"] != "ok"]
    print(f"{out}: {len(calibration['pairs']) - len(failed)} pairs measured"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
