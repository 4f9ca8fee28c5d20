"""`deconver complexity`: parameters, FLOPs (two counters + the paper's convention), latency, memory.

Three forms::

    deconver complexity --model NAME --dataset PRESET [--json] [--roi ...] [--device cpu|cuda|auto]
                        [--repeats N] [--no-runtime] [--set KEY=VALUE ...] [--out FILE.json] [--csv FILE.csv]
    deconver complexity --config STUDY.yaml --dataset D --model M [--force]
        -> <results>/<study>/complexity/<D>/<M>.json (atomic; a rerun with the same inputs is a no-op)
    deconver complexity --config STUDY.yaml --every-pair [--force]
        -> the same record for every (dataset, model) pair of the study plan, in one process (the
           workflow's complexity job: one interpreter start instead of one per pair)
    deconver complexity --dataset PRESET --all-models [--pattern GLOB] [--json | --csv FILE.csv]
        -> one row per registered model that fits the preset

The roi defaults to the preset's (the study's, in study mode); FLOPs and the forward latency are
at batch 1, the training step at the model's ``min_batch`` (1 for most). Conventions:
docs/complexity.md. A flagged model (counters disagree, an operator could not be counted, a runtime
step failed) is reported in the record's ``flags`` and printed; exit status 0 (1 with ``--strict``),
2 on an invalid request.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from deconver.steps import UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="study config: measure (dataset, model) of the study and write "
                        "<results>/<study>/complexity/<dataset>/<model>.json")
    parser.add_argument("--dataset", help="dataset preset name or path (with --config: the study's dataset)")
    parser.add_argument("--every-pair", action="store_true", help="with --config: every (dataset, model) pair of the "
                        "study plan, one after the other in this process (no --dataset, --model)")
    parser.add_argument("--model", help="registered model name (`deconver models`)")
    parser.add_argument("--all-models", action="store_true", help="one row per registered model that fits the dataset")
    parser.add_argument("--pattern", help="with --all-models: only models matching this shell wildcard (e.g. 'smp_*')")
    parser.add_argument("--roi", type=int, nargs="+", help="counting roi (default: the preset's protocol.roi_size)")
    parser.add_argument("--runtime-roi", type=int, nargs="+", help="roi of the latency/memory runs (default: --roi)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device of fvcore and of the runtime "
                        "measurement (default: the study's complexity.device, else auto)")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement, median reported "
                        "(default: the study's complexity.latency_repeats, else 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    parser.add_argument("--no-runtime", action="store_true", help="count only: no latency or memory measurement")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (torch.set_num_threads; recorded in the device)")
    parser.add_argument("--no-train-step", action="store_true", help="time the forward pass only")
    parser.add_argument("--grad", action="store_true", help="count with autograd on (custom autograd functions "
                        "then appear to fvcore as prim::PythonOp)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model keyword argument (value read as YAML), e.g. --set variant=isles22-bundle")
    parser.add_argument("--json", action="store_true", help="print the JSON record(s) instead of a summary")
    parser.add_argument("--out", help="also write the JSON record (or list of records) to this file")
    parser.add_argument("--csv", help="also write the flat row(s) to this CSV file")
    parser.add_argument("--force", action="store_true", help="study mode: recompute even if the result is up to date")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a model is flagged")


class ComplexityError(UsageError):
    """An invalid complexity request (unknown dataset/model, model that does not fit the roi)."""


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ComplexityError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _build(registry, name: str, preset, roi: list[int], kwargs: dict):
    """create_model (which validates first) with the preset's channels and dims; errors name the model."""
    try:
        return registry.create_model(name, in_channels=preset.in_channels, out_channels=preset.out_channels,
                                     spatial_dims=preset.spatial_dims, roi_size=tuple(roi), dataset=preset.name, **kwargs)
    except (KeyError, ValueError, TypeError) as err:
        raise ComplexityError(f"model {name!r} on {preset.name} at roi {tuple(roi)}: {err}") from None


def _at_roi(preset, roi: list[int] | None):
    """The preset with protocol.roi_size replaced by `roi` (the counting roi of a hand request)."""
    if not roi:
        return preset
    return preset.model_copy(update={"protocol": preset.protocol.model_copy(update={"roi_size": list(roi)})})


def measure_model(name: str, preset, *, roi: list[int] | None = None, kwargs: dict | None = None, model_dirs=(),
                  device: str | None = "auto", runtime: bool = True, runtime_roi: list[int] | None = None,
                  repeats: int = 5, warmup: int = 2, train_step: bool = True, grad: bool = False,
                  progress: bool = False) -> dict[str, Any]:
    """The record of registered model ``name`` on ``preset`` (a DatasetPreset) at ``roi`` (default: the preset's)."""
    import torch

    from deconver import registry
    from deconver.complexity.record import measure
    from deconver.plan import load_registry

    load_registry(model_dirs)
    roi = list(roi or preset.protocol.roi_size)
    kwargs = dict(kwargs or {})
    torch.manual_seed(0)
    model = _build(registry, name, preset, roi, kwargs)
    train_batch = registry.model_info(name).min_batch  # BatchNorm on a 1 x 1 map cannot train at batch 1
    record = {"model": name, "dataset": preset.name, "model_kwargs": kwargs,
              "out_channels": preset.out_channels, "spatial_dims": preset.spatial_dims}
    record.update(measure(model, in_channels=preset.in_channels, roi=roi, device=device, runtime=runtime,
                          runtime_roi=runtime_roi, repeats=repeats, warmup=warmup, train_step=train_step,
                          train_batch=train_batch, grad=grad, progress=progress))
    return record


def _summary(record: dict[str, Any]) -> str:
    p, lat, mem = record["params"], record.get("latency_ms"), record.get("peak_memory_mb")
    lines = [
        f"{record['model']} on {record['dataset']} at roi {'x'.join(map(str, record['roi']))} (batch 1)",
        f"  parameters        {p['total']:,} ({p['trainable']:,} trainable)",
        f"  fvcore MACs       {record['macs']:,}",
        f"  flop_counter      {record['flops']:,} FLOPs (ratio to 2 x MACs: "
        f"{record['cross_check']['ratio'] if record['cross_check']['ratio'] is None else format(record['cross_check']['ratio'], '.4f')})",
        f"  FLOPs / voxel     {record['flops_per_voxel_k']:.1f}K (2 per MAC, every contraction)",
        f"  paper convention  {record['paper_flops_per_voxel_k']:.1f}K (DeepSpeed: + element-wise, NDC convs excluded)",
    ]
    if lat:
        def fmt(v, unit):
            return "n/a" if v is None else f"{v:.1f} {unit}"

        rt = record["runtime"]
        lines.append(f"  latency           forward {fmt(lat['forward'], 'ms')}, train step {fmt(lat['train_step'], 'ms')} "
                     f"(batch {rt['train_batch']}) "
                     f"(median of {rt['repeats']} after {rt['warmup']} warm-up, roi {'x'.join(map(str, rt['roi']))})")
        lines.append(f"  peak memory       forward {fmt(mem['forward'], 'MB')}, train step {fmt(mem['train_step'], 'MB')} "
                     f"({mem['method']})")
    lines.append(f"  device            {record['device']}")
    v = record["versions"]
    lines.append(f"  versions          deconver {v.get('deconver')}, torch {v.get('torch')}, fvcore {v.get('fvcore')}")
    for flag in record.get("flags") or []:
        lines.append(f"  FLAG: {flag}")
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [("model", "model"), ("params_total", "params"), ("flops_per_voxel_k", "FLOPs/vox (K)"),
            ("paper_flops_per_voxel_k", "paper conv. (K)"), ("ratio", "fc/2xfv"), ("latency_forward_ms", "fwd ms"),
            ("latency_train_step_ms", "train ms"), ("peak_memory_forward_mb", "fwd MB"),
            ("peak_memory_train_step_mb", "train MB"), ("flags", "flags")]

    def cell(key, value):
        if value is None or value == "":
            return "-"
        if key == "params_total":
            return f"{value / 1e6:.2f}M"
        if key == "ratio":
            return f"{value:.4f}"
        if isinstance(value, float):
            return f"{value:.1f}"
        return str(value)

    table = [[title for _, title in cols]] + [[cell(k, r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in table[:]) if i < len(cols) - 1 else 0 for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def _write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    from deconver.complexity.record import ROW_COLUMNS
    from deconver.io import write_text_atomic

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ROW_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _emit(args, records: list[dict[str, Any]], table: bool) -> None:
    from deconver.complexity.record import flat_row
    from deconver.io import write_json_atomic

    payload: Any = records if table else records[0]
    if args.out:
        write_json_atomic(args.out, payload)
    if args.csv:
        _write_csv(args.csv, [flat_row(r) for r in records])
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    elif table:
        print(_table([flat_row(r) for r in records]))
    else:
        print(_summary(records[0]))


def _run_study(args) -> int:
    from deconver.config import load_study
    from deconver.plan import check_pair

    study = load_study(args.config)
    check_pair(study, args.dataset, args.model)  # only the pairs of the study plan (deconver.plan)
    return _measure_pair(study, args.dataset, args.model, args)


def _run_every_pair(args) -> int:
    from deconver.config import load_study
    from deconver.plan import plan_study

    study = load_study(args.config)
    pairs = plan_study(study).pairs()
    status = 0
    for k, (dataset, model) in enumerate(pairs, 1):
        print(f"[{k}/{len(pairs)}] {dataset} {model}", flush=True)
        status = max(status, _measure_pair(study, dataset, model, args))
    return status


def _measure_pair(study, dataset: str, model: str, args) -> int:
    """Measure one (dataset, model) pair of a study into its record, unless that is up to date."""
    from deconver.io import provenance, read_record, write_json_atomic
    from deconver.paths import StudyPaths
    from deconver.plan import complexity_inputs

    preset = study.preset(dataset)
    wanted = complexity_inputs(study, dataset, model, roi=args.roi, runtime_roi=args.runtime_roi,
                                repeats=args.repeats, warmup=args.warmup, runtime=not args.no_runtime,
                                device=args.device, overrides=_parse_overrides(args.overrides))
    kwargs, roi, device = wanted["model_kwargs"], wanted["roi"], wanted["device_requested"]
    repeats = args.repeats or study.complexity.latency_repeats
    path = StudyPaths.of(study).complexity(dataset, model)
    if not args.force:
        done = (read_record(path) or {}).get("inputs")
        if json.loads(json.dumps(done, default=str)) == json.loads(json.dumps(wanted, default=str)):
            print(f"{path}: up to date (same inputs); --force recomputes")
            return 0
    record = measure_model(model, preset, roi=roi, kwargs=kwargs, model_dirs=study.model_dirs, device=device,
                           runtime=not args.no_runtime, runtime_roi=args.runtime_roi, repeats=repeats,
                           warmup=args.warmup, train_step=not args.no_train_step, grad=args.grad,
                           progress=sys.stderr.isatty())
    record["dataset"] = dataset
    record["preset"] = preset.name
    record["study"] = study.study
    record["device_requested"] = device
    record["inputs"] = wanted
    record["provenance"] = {**provenance(record["counting_device"]), "fvcore_version": record["versions"].get("fvcore")}
    write_json_atomic(path, record)
    print(_summary(record))
    print(f"wrote {path}")
    return 1 if args.strict and record["flags"] else 0


def _run_preset(args) -> int:
    from deconver.config import load_preset
    from deconver.io import provenance

    preset = load_preset(args.dataset)
    kwargs = _parse_overrides(args.overrides)
    common = dict(roi=args.roi, device=args.device or "auto", runtime=not args.no_runtime,
                  runtime_roi=args.runtime_roi, repeats=args.repeats or 5, warmup=args.warmup,
                  train_step=not args.no_train_step, grad=args.grad)
    if args.all_models:
        from tqdm import tqdm

        from deconver.plan import fit_problem, load_registry

        registry = load_registry()
        roi = list(args.roi or preset.protocol.roi_size)
        names = []
        for name in registry.names(args.pattern):
            # measured at batch 1 (training step at min_batch): the batch size is no reason to skip
            why = fit_problem(name, _at_roi(preset, roi), kwargs, batch_size=None, registry=registry)
            if why is None:
                names.append(name)
            else:
                print(f"skipping {name}: {why}".splitlines()[0], file=sys.stderr)
        records = []
        for name in tqdm(names, desc=f"complexity {preset.name}", unit="model", disable=None):
            try:
                records.append(measure_model(name, preset, kwargs=kwargs, **common))
            except (ComplexityError, RuntimeError) as err:
                records.append({"model": name, "dataset": preset.name, "roi": roi, "error": str(err).splitlines()[0],
                                "flags": [f"failed: {str(err).splitlines()[0]}"]})
        for r in records:
            r.setdefault("provenance", provenance(r.get("counting_device")))
        _emit(args, records, table=True)
        return 1 if args.strict and any(r.get("flags") for r in records) else 0
    if not args.model:
        raise ComplexityError("give --model NAME, or --all-models for every registered model")
    record = measure_model(args.model, preset, kwargs=kwargs, progress=sys.stderr.isatty() and not args.json, **common)
    record["provenance"] = {**provenance(record["counting_device"]), "fvcore_version": record["versions"].get("fvcore")}
    _emit(args, [record], table=False)
    return 1 if args.strict and record["flags"] else 0


def run(args) -> int:
    from deconver.steps import pipeline_mode

    if args.model and args.all_models:
        raise ComplexityError("--model and --all-models exclude each other")
    if args.every_pair:
        if not args.config:
            raise ComplexityError("--every-pair needs --config STUDY.yaml")
        if args.dataset or args.model or args.all_models:
            raise ComplexityError("--every-pair measures every (dataset, model) pair of the study: "
                                  "give no --dataset, --model or --all-models")
    elif not args.dataset:
        raise ComplexityError("give --dataset (or --config STUDY.yaml --every-pair)")
    study_mode = args.every_pair or pipeline_mode(args, pipeline=["model"], not_with_config=["all_models"])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.every_pair:
        return _run_every_pair(args)
    return _run_study(args) if study_mode else _run_preset(args)
