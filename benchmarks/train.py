"""Training-step benchmark: seconds per step and peak memory of every registered model at each dataset
preset's roi, through the engine's own training step (`SegmentationModule.training_step`: the preset's
loss on the model's logits, backward, AdamW update).

    python benchmarks/train.py [--models unet,dynunet] [--presets hippocampus,isles22] [--steps 2]
                               [--batch-size 1|preset] [--device cpu|cuda] [--timeout 600]
                               [--out results/benchmarks/train.json]

Each (model, preset) runs in its own process, so peak memory is that pair's alone: on a GPU, CUDA's
max allocated bytes; on the CPU, the process's peak RSS and its increase over the RSS before the first
step (model, optimizer and batch already allocated). On CPU the batch is 1 by default (paper batches at
paper rois do not fit a small machine); on a GPU the preset's batch; never below the model's registered
``min_batch``. One warm-up step, then the median of
`--steps` timed steps. Pairs the registry refuses (dims, roi) are listed as skipped with the reason.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("hippocampus", "isles22", "brats23", "glas", "fives")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model: str, preset_name: str, steps: int, batch: str, device: str) -> dict:
    """One (model, preset) measurement, in this process."""
    import torch

    from deconver import registry
    from deconver.config import load_preset
    from deconver.engine.labels import LabelCodec
    from deconver.engine.module import SegmentationModule

    preset = load_preset(preset_name)
    p = preset.protocol
    roi = tuple(p.roi_size)
    b = p.batch_size if batch == "preset" else int(batch)
    b = max(b, registry.model_info(model).min_batch)  # e.g. BatchNorm on a 1 x 1 map needs 2
    torch.manual_seed(0)
    net = registry.create_model(model, in_channels=preset.in_channels, out_channels=preset.out_channels,
                                spatial_dims=preset.spatial_dims, roi_size=roi, dataset=preset.name)
    module = SegmentationModule(net, LabelCodec.from_preset(preset), p).to(device)
    module.train()
    optimizer = module.configure_optimizers()
    values = [v for vals in preset.labels.values() for v in vals]
    batch_data = {"image": torch.randn(b, preset.in_channels, *roi, device=device),
                  "label": torch.tensor(values, dtype=torch.uint8)[torch.randint(0, len(values), (b, 1, *roi))]
                  .to(device) * (torch.rand(b, 1, *roi, device=device) > 0.7)}

    def step() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = module.training_step(batch_data, 0)
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    module.log = lambda *a, **k: None  # no trainer attached: logging is a no-op here
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    warmup = step()
    times = [step() for _ in range(steps)]
    out = {"model": model, "preset": preset_name, "roi": list(roi), "batch_size": b, "device": device,
           "params": sum(x.numel() for x in net.parameters()), "warmup_s": warmup,
           "seconds_per_step": statistics.median(times), "step_times_s": times}
    if device.startswith("cuda"):
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mb"] = _rss_mb()
        out["peak_memory_mb"] = _rss_mb() - rss_before
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated model names (default: every registered model)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated dataset presets")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--batch-size", default=None, help="an integer, or 'preset' (default: 1 on CPU, preset on GPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per (model, preset)")
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "train.json"))
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PRESET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch_size or ("1" if device == "cpu" else "preset")
    if args.child:
        print(json.dumps(child(*args.child, args.steps, batch, device)))
        return 0

    from tqdm import tqdm

    from deconver import registry
    from deconver.io import provenance, write_json_atomic

    models = args.models.split(",") if args.models else registry.list_models()
    pairs, results = plan(models, args.presets.split(","))
    for model, preset_name in tqdm(pairs, desc="train-step benchmark", unit="pair", file=sys.stderr):
        cmd = [sys.executable, __file__, "--child", model, preset_name, "--steps", str(args.steps),
               "--batch-size", batch, "--device", device]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results.append({"model": model, "preset": preset_name, "status": "timeout", "timeout_s": args.timeout})
            continue
        if proc.returncode != 0:
            results.append({"model": model, "preset": preset_name, "status": "error",
                            "reason": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"})
            continue
        results.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "status": "ok"})
    report = {"benchmark": "train_step", "device": device, "batch_size": batch, "steps": args.steps,
              "provenance": provenance(device), "results": results}
    write_json_atomic(args.out, report)
    print(format_table(results))
    print(f"written: {args.out}", file=sys.stderr)
    return 0


def format_table(results: list[dict]) -> str:
    lines = ["| model | preset | roi | batch | s/step | peak MB | status |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["preset"], r["model"])):
        if r["status"] == "ok":
            lines.append(f"| {r['model']} | {r['preset']} | {'x'.join(map(str, r['roi']))} | {r['batch_size']} | "
                         f"{r['seconds_per_step']:.3f} | {r['peak_memory_mb']:.0f} | ok |")
        else:
            lines.append(f"| {r['model']} | {r['preset']} | | | | | {r['status']}: {r.get('reason', '')[:80]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
