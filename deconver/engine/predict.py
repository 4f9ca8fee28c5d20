"""`deconver predict`: sliding-window inference of a finished run, written in the native grid and format.

For each case: sliding-window probabilities on the prepared grid → back onto the native grid
(`deconver.data.to_native`, linear) → a label map in the preset's label space (`LabelCodec.to_label_map`)
→ `deconver.data.save_native` (NIfTI with the source affine and header in 3D, the source's format for
MHA/NRRD sources, PNG in 2D or the nnU-Net source's PNG/BMP/TIF: `native_suffix`). With
``--probabilities`` also ``<case>_prob.nii.gz`` (3D, channels last, source affine) or ``<case>_prob.npy``
(2D, channels first). ``predictions.json`` (case list, checkpoint, provenance) is written last: when it
matches the checkpoint and the cases, a rerun does nothing.

By default the fold's validation cases are predicted from the prepared cache; ``--input-dir`` predicts
any folder in the preset's official layout instead (prepared on the fly into ``<output-dir>/.prepared``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from deconver.config import ConfigError, Study
from deconver.engine.run import RunSpec, RunStateError, open_prepared, read_fold, resolve_run, stale_reason
from deconver.paths import RunFolder

CHECKPOINTS = ("final", "best", "last")
MASKS_FORMAT = 1  # `mask_paths` written with each label map (a folder without them is predicted again)
MASKS_DIR = "masks"  # under predictions/: the masks the other metric conventions score (`mask_paths`)


def checkpoint_path(spec: RunSpec, which: str = "final") -> Path:
    if which not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint: {which!r} is not one of {list(CHECKPOINTS)}")
    path = getattr(spec.folder, which)
    if not path.is_file():
        raise RunStateError(f"{path} not found: train the run first (`deconver train --config ... --dataset "
                          f"{spec.dataset} --model {spec.model} --fold {spec.fold}`)")
    return path


def load_network(run_dir: Path, checkpoint: Path, device: str = "cpu"):
    """Rebuild the network from ``model.json`` and load the weights of a checkpoint (eval mode)."""
    import torch

    from deconver import registry

    record_path = RunFolder(run_dir).model_record
    if not record_path.is_file():
        raise RunStateError(f"{record_path} not found: the run folder is incomplete")
    record = json.loads(record_path.read_text())
    net = registry.create_model(record["name"], in_channels=record["in_channels"], out_channels=record["out_channels"],
                                spatial_dims=record["spatial_dims"], roi_size=tuple(record["roi_size"]),
                                dataset=record.get("dataset"), **record.get("kwargs", {}))
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.to(device).eval()


def _device(study: Study, device: str | None) -> str:
    import torch

    if device:
        return device
    if study.trainer.accelerator == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def _file_id(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def save_probabilities(probs: np.ndarray, entry: dict, path: Path) -> Path:
    """Probabilities (C, *native) as ``.npy`` (2D) or a 4D NIfTI, channels last, with the native affine (3D)."""
    from deconver.io import atomic_path

    if entry["spatial_dims"] == 2:
        with atomic_path(path) as tmp:
            np.save(tmp, probs.astype(np.float32))
        return path
    import nibabel as nib

    img = nib.Nifti1Image(np.moveaxis(probs.astype(np.float32), 0, -1),
                          np.asarray(entry["geometry"]["native_affine"], dtype=np.float64))
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def prediction_paths(out_dir: Path, case_id: str, spatial_dims: int, suffix: str | None = None) -> tuple[Path, Path]:
    """(label map, probabilities) files of a case; `suffix`: the label map's native ending (`native_suffix`)."""
    if spatial_dims == 2:
        return out_dir / f"{case_id}{suffix or '.png'}", out_dir / f"{case_id}_prob.npy"
    return out_dir / f"{case_id}{suffix or '.nii.gz'}", out_dir / f"{case_id}_prob.nii.gz"


def mask_paths(out_dir: Path, entry: dict) -> tuple[Path, Path]:
    """In ``predictions/masks/``: (thresholded output masks on the prepared grid, ``.npz`` with ``masks`` (K, *S) bool — what the
    ``authors`` metric convention scores; region channels on the native grid as a bitmask label image in the
    label map's format, bit k = output k — what ``metrics.region_source: channels`` scores)."""
    from deconver.data import native_suffix

    case_id, folder = entry["id"], out_dir / MASKS_DIR
    return folder / f"{case_id}_prepared.npz", folder / f"{case_id}_channels{native_suffix(entry)}"


def save_masks(probs: np.ndarray, native: np.ndarray, entry: dict, codec, out_dir: Path) -> None:
    """Write `mask_paths` of one case from its probabilities on the prepared and the native grid."""
    import torch

    from deconver.data import save_native
    from deconver.io import atomic_path

    prepared_path, channels_path = mask_paths(out_dir, entry)
    masks = codec.discretize(torch.from_numpy(np.ascontiguousarray(probs))[None])[0].numpy()
    with atomic_path(prepared_path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, masks=masks)
    if codec.task == "regions":
        bits = sum((native[k] > codec.threshold).astype(np.uint8) << k for k in range(len(codec.names)))
        save_native(np.asarray(bits, dtype=np.uint8), entry, channels_path)


def predict(study: Study | str | Path | dict, dataset: str, model: str, fold: int, *, base: str | Path = ".",
            probabilities: bool = False, input_dir: str | Path | None = None, output_dir: str | Path | None = None,
            checkpoint: str = "final", device: str | None = None, progress: bool = True) -> Path:
    """Predict a run's validation cases (or every case of `input_dir`) into the native grid; returns the folder."""
    import torch
    from tqdm import tqdm

    from deconver.data import native_suffix, save_native, to_native
    from deconver.engine.labels import LabelCodec
    from deconver.engine.module import sliding_window_logits
    from deconver.io import provenance, read_record, write_json_atomic

    spec = resolve_run(study, dataset, model, fold, base=base)
    ckpt = checkpoint_path(spec, checkpoint)
    if input_dir is not None:
        if output_dir is None:
            raise ConfigError("--input-dir needs --output-dir")
        from deconver.data import PreparedDataset, prepare_dataset

        out_dir = Path(output_dir)
        cache = out_dir / ".prepared"
        prepare_dataset(spec.preset, input_dir, cache, dataset=dataset, progress=progress)
        prepared = PreparedDataset(cache)
        case_ids = prepared.case_ids
    else:
        prepared = open_prepared(spec)
        train_ids, case_ids = read_fold(spec)
        stale = stale_reason(spec, spec.fingerprint_parts(prepared, train_ids, case_ids))
        if stale is not None and stale[0] == "data":  # e.g. the split changed: its "validation" cases may be the run's training cases
            raise RunStateError(f"{spec.run_dir}: {stale[1]}; train it again first (`deconver train` starts it over)")
        out_dir = Path(output_dir) if output_dir is not None else spec.paths.predictions(dataset, model, fold)
    record_path = out_dir / "predictions.json"
    wanted = {"checkpoint": _file_id(ckpt), "cases": list(case_ids), "probabilities": bool(probabilities),
              "masks": MASKS_FORMAT}
    if record_path.is_file():
        old = read_record(record_path) or {}
        if all(old.get(k) == v for k, v in wanted.items()):
            print(f"{out_dir}: predictions up to date, nothing to do", file=sys.stderr)
            return out_dir
        record_path.unlink()

    dev = _device(spec.study, device)
    net = load_network(spec.run_dir, ckpt, dev)
    codec = LabelCodec.from_preset(spec.preset)

    written = []
    for case_id in tqdm(case_ids, desc=f"predict {dataset}/{model}/fold{fold}", unit="case", disable=not progress,
                        file=sys.stderr):
        entry = prepared.case(case_id)
        image, _ = prepared.load(case_id)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(dev)
            logits = sliding_window_logits(net, x, spec.protocol)
            probs = codec.activate(logits.float())[0].cpu().numpy()
        native = to_native(probs, entry, mode="linear")
        label_path, prob_path = prediction_paths(out_dir, case_id, entry["spatial_dims"], native_suffix(entry))
        save_native(codec.to_label_map(native), entry, label_path)
        save_masks(probs, native, entry, codec, out_dir)
        if probabilities:
            save_probabilities(native, entry, prob_path)
        written.append(label_path.name)
    write_json_atomic(record_path, {**wanted, "files": written, "dataset": dataset, "model": model, "fold": fold,
                                    "study": spec.study.study, "provenance": provenance(dev)})
    return out_dir


# --------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="study config (YAML)")
    parser.add_argument("--dataset", required=True, help="dataset name in the study")
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--fold", required=True, type=int, help="fold index (its validation cases are predicted)")
    parser.add_argument("--probabilities", action="store_true", help="also write the probabilities")
    parser.add_argument("--checkpoint", default="final", choices=CHECKPOINTS, help="which weights (default: final)")
    parser.add_argument("--input-dir", help="predict every case of this folder (the preset's official layout)")
    parser.add_argument("--output-dir", help="where predictions go (default: the run's predictions/)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: from the study's trainer.accelerator)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from deconver.steps import named_input

    named_input(args.input_dir, "--input-dir")
    out = predict(args.config, args.dataset, args.model, args.fold, probabilities=args.probabilities,
                  input_dir=args.input_dir, output_dir=args.output_dir, checkpoint=args.checkpoint,
                  device=args.device, progress=not args.no_progress)
    print(out)
    return 0
