"""`deconver prepare`: apply a preset's deterministic preprocessing once, into an on-disk cache.

Per case: load and check (`loading.load_case`), then the preset's steps in order (`preprocess.py`:
reorient, crop to the foreground, resample, z-score), the geometry recorded so `to_native` can invert it.

Cache layout (`cache.py`): ``cases/<id>_image.npy``, ``cases/<id>_label.npy``, ``cases/<id>.json`` (the
case's manifest entry, written last: its presence means the case is complete), and ``manifest.json``
written last of all. Idempotent: a rerun whose preprocessing fingerprint and input files (sizes, mtimes)
match the manifest does nothing. Resumable: after an interruption or an error the cases whose entry
matches are kept and only the rest is computed. Every file is written atomically, and a stale manifest
is removed before any case is rewritten, so nothing half-written is ever trusted.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deconver.data.cache import CACHE_FORMAT, CASES_DIR, MANIFEST
from deconver.data.records import Case, DatasetError
from deconver.io import atomic_path, provenance, read_record, write_json_atomic


# --------------------------------------------------------------------------- fingerprints
def config_fingerprint(preset) -> str:
    """Hash of everything in the preset that changes the cache's content."""
    relevant = {
        "format": CACHE_FORMAT,
        "reader": preset.reader,
        "reader_options": preset.reader_options,
        "spatial_dims": preset.spatial_dims,
        "channels": preset.channels,
        "labels": preset.labels,
        "preprocessing": preset.preprocessing.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def input_stats(case: Case) -> list[dict[str, Any]]:
    """Path, size and mtime of each input file of a case (what decides whether it must be redone)."""
    out = []
    for path in [*dict.fromkeys(case.images), *([case.label] if case.label else [])]:
        try:
            st = Path(path).stat()
        except OSError as err:
            raise DatasetError(f"{path}: cannot stat input file ({err})") from None
        out.append({"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


# --------------------------------------------------------------------------- one case
def _sha256(path: Path) -> str:
    """Checksum of a cached array: what a run's data fingerprint is made of (paths and mtimes are not)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_case(case: Case, preset, out_dir: Path, fingerprint: str, dataset: str) -> dict:
    """Preprocess one case into ``out_dir/cases`` and return its manifest entry (written last)."""
    from deconver.data.instances import instance_warnings
    from deconver.data.loading import allowed_label_values, load_case

    from deconver.data.preprocess import preprocess

    inputs = input_stats(case)
    loaded = load_case(case, preset)
    warnings = degenerate_warnings(loaded) + instance_warnings(loaded.instances, case.label)
    image, label, geometry = preprocess(loaded, preset)
    cases_dir = out_dir / CASES_DIR
    files = {"image": f"{CASES_DIR}/{case.id}_image.npy", "label": None}
    with atomic_path(out_dir / files["image"]) as tmp:
        np.save(tmp, image)
    if label is not None:
        files["label"] = f"{CASES_DIR}/{case.id}_label.npy"
        with atomic_path(out_dir / files["label"]) as tmp:
            np.save(tmp, label)
    foreground = int(np.count_nonzero(loaded.label)) if loaded.label is not None else 0
    entry = {
        "id": case.id,
        "subset": case.subset,
        "dataset": dataset,
        "preset": preset.name,
        "spatial_dims": preset.spatial_dims,
        "channels": list(preset.channels),
        "labels": {k: list(v) for k, v in preset.labels.items()},
        "label_values": allowed_label_values(preset),
        "label_encoding": case.meta.get("label_encoding", "values"),
        "image_shape": list(image.shape),
        "strata": float(foreground),
        "foreground_voxels": foreground,
        "synthetic": bool(case.meta.get("synthetic", False)),
        "meta": json.loads(json.dumps(case.meta, default=str)),
        "source": {"images": [str(Path(p).resolve()) for p in case.images],
                   "label": str(Path(case.label).resolve()) if case.label else None},
        "geometry": geometry,
        "files": files,
        "file_sizes": {k: (out_dir / v).stat().st_size for k, v in files.items() if v},
        "checksums": {k: _sha256(out_dir / v) for k, v in files.items() if v},
        "fingerprint": fingerprint,
        "inputs": inputs,
        "warnings": warnings,
    }
    write_json_atomic(cases_dir / f"{case.id}.json", entry)
    return entry


def degenerate_warnings(loaded) -> list[str]:
    """What is suspicious but not wrong about a loaded case (kept, reported per case and counted):
    an image whose channels are all constant (e.g. all zero) while its label marks foreground."""
    if loaded.label is None or not np.any(loaded.label):
        return []
    image = loaded.image.as_tensor().numpy() if hasattr(loaded.image, "as_tensor") else np.asarray(loaded.image)
    flat = image.reshape(image.shape[0], -1)
    if (flat.max(1) == flat.min(1)).all():
        return [f"{loaded.source}: the image is constant ({float(flat.flat[0]):g} everywhere) but its label has "
                f"{int(np.count_nonzero(loaded.label))} foreground voxels; check the file (the case is kept)"]
    return []


def _trusted_entry(out_dir: Path, case: Case, fingerprint: str, inputs: list[dict]) -> dict | None:
    """The case's entry if it is complete and matches the current config and inputs, else None."""
    entry = read_record(out_dir / CASES_DIR / f"{case.id}.json")
    if entry is None or entry.get("fingerprint") != fingerprint or entry.get("inputs") != inputs:
        return None
    return entry if _cache_files_intact(out_dir, entry) else None


# --------------------------------------------------------------------------- a dataset
def _manifest_matches(manifest_path: Path, fingerprint: str, cases: list[Case], stats: dict[str, list]) -> bool:
    manifest = read_record(manifest_path)
    if manifest is None or manifest.get("format") != CACHE_FORMAT or manifest.get("fingerprint") != fingerprint:
        return False
    entries = manifest.get("cases", [])
    if [e["id"] for e in entries] != [c.id for c in cases]:
        return False
    out_dir = manifest_path.parent
    for e in entries:
        if e.get("inputs") != stats[e["id"]]:
            return False
        if not _cache_files_intact(out_dir, e):
            return False
    return True


def _cache_files_intact(out_dir: Path, entry: dict) -> bool:
    """Every cached array of a case entry is there with the size it was written with (a truncated or
    replaced .npy is redone, never trusted)."""
    for key, rel in entry.get("files", {}).items():
        if rel is None:
            continue
        f = out_dir / rel
        if not f.is_file() or f.stat().st_size != entry.get("file_sizes", {}).get(key):
            return False
    return True


def prepare_dataset(preset, root: str | Path, out_dir: str | Path, *, dataset: str | None = None,
                    progress: bool = True, on_case: Callable[[str], None] | None = None,
                    require_labels: bool = True) -> dict:
    """Prepare every case of `root` into `out_dir`; returns {"status", "cases", "written", "reused", "seconds"}.

    status is "up-to-date" when the manifest already matched (nothing was touched), else "prepared".
    `on_case(id)` is called after each case is complete (used by progress reporting and tests).
    require_labels=False also prepares cases without a label file (their label is None).
    """
    from tqdm import tqdm

    from deconver.data.readers import read_dataset

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    dataset = dataset or preset.name
    cases = read_dataset(preset, root, require_labels=require_labels)
    fingerprint = config_fingerprint(preset)
    stats = {c.id: input_stats(c) for c in cases}
    manifest_path = out_dir / MANIFEST
    if _manifest_matches(manifest_path, fingerprint, cases, stats):
        warned = json.loads(manifest_path.read_text()).get("warnings", [])
        return {"status": "up-to-date", "cases": len(cases), "written": 0, "reused": len(cases),
                "warnings": warned, "seconds": time.perf_counter() - t0}
    manifest_path.unlink(missing_ok=True)  # from here on the folder is not a trusted cache until the end
    entries, written, reused, refused = [], 0, 0, []
    bar = tqdm(cases, desc=f"prepare {dataset}", unit="case", disable=not progress, file=sys.stderr)
    with _single_thread():
        for case in bar:
            entry = _trusted_entry(out_dir, case, fingerprint, stats[case.id])
            if entry is None:
                try:
                    entry = prepare_case(case, preset, out_dir, fingerprint, dataset)
                except DatasetError as err:  # go on: every bad case is named, not only the first
                    refused.append(f"{case.id}: {err}")
                    continue
                written += 1
            else:
                reused += 1
            entries.append(entry)
            if on_case is not None:
                on_case(case.id)
    bar.close()
    if refused:
        raise DatasetError(f"{len(refused)} of {len(cases)} cases of {root} refused (the other cases are "
                           "cached and kept; fix or remove these, then rerun):\n  " + "\n  ".join(refused))
    warned = [w for e in entries for w in e.get("warnings", [])]
    _remove_stale(out_dir, {c.id for c in cases})
    manifest = {
        "format": CACHE_FORMAT,
        "dataset": dataset,
        "preset_name": preset.name,
        "preset": preset.model_dump(mode="json"),
        "fingerprint": fingerprint,
        "root": str(Path(root).resolve()),
        "spatial_dims": preset.spatial_dims,
        "channels": list(preset.channels),
        "labels": {k: list(v) for k, v in preset.labels.items()},
        "synthetic": any(e["synthetic"] for e in entries),
        "num_cases": len(entries),
        "warnings": warned,
        "provenance": provenance("cpu"),
        "cases": entries,
    }
    write_json_atomic(manifest_path, manifest)
    return {"status": "prepared", "cases": len(cases), "written": written, "reused": reused,
            "warnings": warned, "seconds": time.perf_counter() - t0}


@contextlib.contextmanager
def _single_thread():
    """Torch on one thread while preparing: per-case arrays are small, and intra-op threads only add
    synchronisation (8x slower on a busy 2-core machine, measured)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _remove_stale(out_dir: Path, ids: set[str]) -> None:
    """Delete case files of cases no longer in the dataset, and temporaries of interrupted writes."""
    cases_dir = out_dir / CASES_DIR
    if not cases_dir.is_dir():
        return
    for f in cases_dir.iterdir():
        name = f.name
        if name.startswith(".") and ".tmp" in name:
            f.unlink(missing_ok=True)
            continue
        for suffix in ("_image.npy", "_label.npy", ".json"):
            if name.endswith(suffix) and name[: -len(suffix)] not in ids:
                f.unlink(missing_ok=True)


# --------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="study config (YAML); with --dataset, resolves preset, root and output")
    parser.add_argument("--dataset", help="dataset name in the study")
    parser.add_argument("--preset", help="hand use: preset name or path (instead of --config)")
    parser.add_argument("--root", help="hand use: dataset root in its official layout")
    parser.add_argument("--out", help="hand use: output folder of the cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from deconver.config import load_preset, load_study
    from deconver.paths import StudyPaths
    from deconver.steps import UsageError, named_input, pipeline_mode

    if pipeline_mode(args, pipeline=["dataset"], by_hand=["preset", "root", "out"]):
        study = load_study(args.config)
        preset = study.preset(args.dataset)
        root = Path(study.datasets[args.dataset].root)
        out = Path(args.out) if args.out else StudyPaths.of(study).prepared(args.dataset)
        dataset = args.dataset
        if not root.exists():
            first = (f": write the synthetic stand-in first with `deconver synth --config {args.config} "
                     f"--dataset {args.dataset}`" if study.datasets[args.dataset].synthetic else "")
            raise UsageError(f"datasets.{args.dataset}.root: dataset root {root} does not exist{first}")
    else:
        preset = load_preset(args.preset)
        root, out, dataset = named_input(args.root, "--root"), Path(args.out), args.dataset or preset.name
    result = prepare_dataset(preset, root, out, dataset=dataset, progress=not args.no_progress)
    for warning in result["warnings"]:
        print(f"deconver prepare: warning: {warning}", file=sys.stderr)
    if result["warnings"]:
        print(f"deconver prepare: {len(result['warnings'])} of {result['cases']} cases with warnings",
              file=sys.stderr)
    if result["status"] == "up-to-date":
        print(f"{out}: up to date ({result['cases']} cases), nothing to do")
    else:
        print(f"{out}: prepared {result['cases']} cases ({result['written']} written, {result['reused']} kept) "
              f"in {result['seconds']:.1f} s")
    return 0
