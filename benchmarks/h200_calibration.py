"""Build a calibration file for an H200 from the recorded train-step runs, for a GPU-less session.

    python benchmarks/h200_calibration.py [--config config/paper.yaml]
        [--runs benchmarks/results/train_cuda_h200.json] [--out benchmarks/results/calibration_nvidia-h200.json]

`deconver calibrate` measures on the device it runs on; no GPU was lent to the session that needed the
paper study's GPU-hours, so this script derives the same file format from what an H200 did measure
(benchmarks/results/train_cuda_h200.json: BraTS preset, 128³, batch 2, fp32, six 3D models) and says
so in every row (`derived`):

* a (dataset, model) pair recorded there: its seconds per step and peak memory as measured;
* any other pair of the study whose model was recorded: the recorded step time × the ratio of forward
  FLOPs (torch.utils.flop_counter on shape-only tensors, at each preset's roi and per-device batch),
  and the peak memory × the ratio of input voxels × batch — both first-order scalings, not measurements;
* the seconds per sliding-window batch: the step time × sw_batch_size / batch / 3 (a forward pass is about
  a third of a training step); start-up: the recorded warm-up step.

Pairs whose model was not recorded (MedNeXt, Attention U-Net, the 2D smp nets) stay out: `deconver plan`
names them as missing. Rerun `deconver calibrate` on a real GPU to replace the whole file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def forward_flops(study, dataset: str, model: str, batch: int) -> float:
    from deconver import registry
    from deconver.complexity import flop_counter_count

    preset = study.preset(dataset)
    roi = tuple(preset.protocol.roi_size)
    net = registry.create_model(model, in_channels=preset.in_channels, out_channels=preset.out_channels,
                                spatial_dims=preset.spatial_dims, roi_size=roi, dataset=preset.name,
                                **study.model_kwargs(dataset, model))
    return float(flop_counter_count(net, (batch, preset.in_channels, *roi), fake=True).flops)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "config" / "paper.yaml"))
    parser.add_argument("--runs", default=str(REPO / "benchmarks" / "results" / "train_cuda_h200.json"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "calibration_nvidia-h200.json"))
    args = parser.parse_args()

    from deconver.config import load_study
    from deconver.engine.distributed import per_device_batch, world_size
    from deconver.io import provenance, write_json_atomic
    from deconver.plan import plan_study

    study = load_study(args.config)
    runs = json.loads(Path(args.runs).read_text())
    recorded = {(r["preset"], r["model"]): r for r in runs["results"] if r.get("status") == "ok"}
    base = {model: (preset, r) for (preset, model), r in recorded.items()}
    pairs = []
    for dataset, model in plan_study(study).pairs():
        preset = study.preset(dataset)
        p = preset.protocol
        batch = per_device_batch(p.batch_size, world_size(study.trainer))
        if model not in base:
            print(f"{dataset} {model}: not recorded on the H200, left out", file=sys.stderr)
            continue
        ref_preset, ref = base[model]
        if (preset.name, model) in recorded and ref["batch_size"] == batch:
            step, peak, derived = ref["seconds_per_step"], ref["peak_memory_mb"], "measured (train_cuda_h200.json)"
        else:
            ref_study_preset = study.preset(ref_preset) if ref_preset in study.datasets else None
            ref_flops = forward_flops(study, ref_preset, model, ref["batch_size"]) if ref_study_preset else None
            flops = forward_flops(study, dataset, model, batch)
            if not ref_flops:
                continue
            step = ref["seconds_per_step"] * flops / ref_flops
            vox = lambda roi, b: b * __import__("math").prod(roi)  # noqa: E731
            peak = ref["peak_memory_mb"] * vox(p.roi_size, batch) / vox(ref["roi"], ref["batch_size"])
            derived = (f"scaled from {ref_preset}: step time by forward FLOPs ({flops:.3g} / {ref_flops:.3g}), "
                       "memory by input voxels x batch")
        pairs.append({"dataset": dataset, "model": model, "roi": list(p.roi_size), "batch_per_device": batch,
                      "sw_batch_size": p.sw_batch_size, "startup_s": ref["warmup_s"], "seconds_per_step": step,
                      "seconds_per_window_batch": step * p.sw_batch_size / batch / 3, "peak_memory_mb": peak,
                      "host_peak_rss_mb": None, "status": "ok", "derived": derived})
        print(f"{dataset} {model}: {step:.3f} s/step, {peak:.0f} MB ({derived.split(':')[0]})", file=sys.stderr)
    write_json_atomic(Path(args.out), {
        "format": 1, "study": study.study, "device": "nvidia-h200", "device_kind": "cuda",
        "device_memory_mb": 143771.0, "steps": None, "created_from": str(Path(args.runs).relative_to(REPO)),
        "note": "derived from recorded H200 train-step runs, not measured by `deconver calibrate` (no GPU lent); "
                "see each pair's `derived`", "pairs": pairs, "loading_samples_per_s": {},
        "provenance": {**provenance("cpu"), "source_provenance": runs.get("provenance")}})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
