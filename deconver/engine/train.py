"""`deconver train`: one (study, dataset, model, fold) run on Lightning, resumable and requeue-safe.

Run folder (docs/ARCHITECTURE.md, "Runs"): ``run.json`` (resolved config + provenance), ``model.json``,
``protocol.json`` (the recipe of `deconver protocol`), ``cost.json`` (wall time and memory per attempt),
``train_log.csv``, ``checkpoints/{last,best}.ckpt`` and ``final.ckpt``, written last: its presence means
the run is finished. run.json records the run's fingerprint in parts (configuration incl. the CPU thread
count, data, split) and its case lists: a rerun whose parts match does nothing (finished) or resumes from
the newest of ``checkpoints/last.ckpt`` and Lightning's SLURM ``hpc_ckpt_*.ckpt``; a folder trained with
another configuration is refused, one trained on other data or another split is cleared and the run
starts over (never resumed, never kept as finished). On SLURM, Lightning's
`SLURMEnvironment(auto_requeue=True)` checkpoints and requeues the job before its time limit.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

from deconver.config import ConfigError, Study
from deconver.engine.run import (
    RunSpec,
    RunStateError,
    check_roi_fits_images,
    open_prepared,
    read_fold,
    resolve_run,
    stale_reason,
)


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _resume_checkpoint(spec: RunSpec) -> Path | None:
    """The newest checkpoint of an unfinished run (last.ckpt or a SLURM hpc checkpoint)."""
    candidates = [spec.folder.last, *spec.run_dir.glob("hpc_ckpt_*.ckpt")]
    candidates = [p for p in candidates if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def _check_readable(checkpoint: Path) -> None:
    """A checkpoint to resume from must be a complete torch file (a zip archive whose directory, at its
    end, is intact); a truncated one is named with what to do, not left to a traceback inside Lightning."""
    import zipfile

    try:
        with zipfile.ZipFile(checkpoint) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile) as err:
        raise RunStateError(f"{checkpoint}: the checkpoint is truncated or unreadable ({err}); delete it to restart "
                          f"the run from scratch (rm {checkpoint}), or put back a complete copy") from None


def _clear_run(spec: RunSpec) -> None:
    """Remove everything a stale run produced (checkpoints, log, predictions, evaluation), keeping the folder."""
    import shutil

    folder = spec.folder
    for path in [folder.final, folder.train_log, folder.evaluation, folder.evaluation.with_suffix(".json"),
                 *spec.run_dir.glob("hpc_ckpt_*.ckpt")]:
        path.unlink(missing_ok=True)
    for sub in (folder.checkpoints, spec.run_dir / "tensorboard", folder.predictions):
        shutil.rmtree(sub, ignore_errors=True)


def _accelerator(spec: RunSpec) -> str:
    import torch

    wanted = spec.study.trainer.accelerator
    if wanted == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if wanted == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator: 'gpu' requested but no CUDA device is available")
    return wanted


def _check_precision(spec: RunSpec, accelerator: str) -> None:
    if accelerator == "cpu" and spec.protocol.precision == "16-mixed":
        raise ConfigError(f"{spec.where}.precision: '16-mixed' needs a GPU; use '32' or 'bf16-mixed' on CPU")


def _settle_run_folder(spec: RunSpec, parts: dict[str, str]) -> bool:
    """True when the run folder already holds this finished run. A folder whose run was trained with
    another configuration is refused (ConfigError with the reason); one trained on other data or another
    split is cleared, with the reason printed, so the run starts over — never resumed or kept."""
    if not spec.final.is_file() and _resume_checkpoint(spec) is None:
        return False
    stale = stale_reason(spec, parts)
    if stale is None:
        return spec.final.is_file()
    kind, why = stale
    if kind == "config":
        raise ConfigError(f"{spec.run_dir}: {why}; delete the folder to start over, or give the changed study a "
                          "new `study` name")
    if _is_rank_zero():
        print(f"{spec.run_dir}: {why}; starting over from scratch", file=sys.stderr)
        _clear_run(spec)
    return False


def _write_records(spec: RunSpec, train_ids: list[str], val_ids: list[str], accelerator: str,
                   parts: dict[str, str], allocator: dict) -> None:
    from deconver.io import provenance, write_json_atomic

    prov = provenance("cuda" if accelerator == "gpu" else "cpu")
    write_json_atomic(spec.folder.model_record, {**spec.model_record(), "provenance": prov})
    from deconver.protocol import resolve_protocol

    write_json_atomic(spec.folder.protocol,
                      {**resolve_protocol(spec.study, spec.dataset, spec.model, paths=spec.paths,
                                          preset=spec.preset), "provenance": prov})
    write_json_atomic(spec.folder.run_record, {
        "study": spec.study.study, "dataset": spec.dataset, "model": spec.model, "fold": spec.fold,
        "seed": spec.study.seed, "fingerprint": spec.fingerprint(), "fingerprint_parts": parts,
        "threads": spec.study.trainer.threads,
        "preset": spec.preset.model_dump(mode="json"), "model_kwargs": spec.model_kwargs,
        "trainer": spec.study.trainer.model_dump(mode="json"),
        "prepared": str(spec.paths.prepared(spec.dataset)), "split": str(spec.paths.split(spec.dataset)),
        "train_cases": len(train_ids), "val_cases": len(val_ids),
        "train_ids": list(train_ids), "val_ids": list(val_ids),
        "provenance": {**prov, "allocator": allocator},
    })


def _write_final(spec: RunSpec) -> dict | None:
    """final.ckpt from last.ckpt when last.ckpt holds the last epoch: weights, hyper-parameters, model record.

    Returns the run recorder's state (best score, log rows), or None when the run is not complete."""
    import torch

    from deconver.io import atomic_path

    last = spec.folder.last
    if not last.is_file():
        return None
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    if int(ckpt.get("epoch", -1)) < spec.protocol.epochs - 1:
        return None
    final = {key: ckpt[key] for key in ("state_dict", "hyper_parameters", "epoch", "global_step",
                                        "pytorch-lightning_version") if key in ckpt}
    final["model"] = spec.model_record()
    with atomic_path(spec.final) as tmp:
        torch.save(final, tmp)
    for stale in spec.run_dir.glob("hpc_ckpt_*.ckpt"):
        stale.unlink(missing_ok=True)
    states = ckpt.get("callbacks", {})
    return next((v for k, v in states.items() if k.startswith("RunRecorder")), {})


def build_trainer(spec: RunSpec, recorder, *, progress: bool = True, has_validation: bool = True,
                  extra_callbacks: Sequence = ()):
    """The Lightning Trainer of a run, configured from the preset's protocol and the study's trainer block."""
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from deconver.engine.callbacks import AtomicCheckpointIO, ValidationSchedule

    p, t = spec.protocol, spec.study.trainer
    accelerator = _accelerator(spec)
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=True))
    callbacks: list = [recorder, ValidationSchedule(p.val_every), *extra_callbacks]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 10))
    logger = TensorBoardLogger(save_dir=str(spec.run_dir), name="tensorboard", version="") if t.tensorboard else False
    return L.Trainer(
        accelerator=accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=p.precision, max_epochs=p.epochs, check_val_every_n_epoch=p.val_every,
        limit_val_batches=None if has_validation else 0, num_sanity_val_steps=0,
        accumulate_grad_batches=p.accumulate_grad_batches,
        deterministic=(True if accelerator == "cpu" else "warn") if t.deterministic else False,
        benchmark=False if t.deterministic else None,
        use_distributed_sampler=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress, logger=logger, log_every_n_steps=1,
        callbacks=callbacks, plugins=plugins, default_root_dir=str(spec.run_dir),
    )


def train(study: Study | str | Path | dict, dataset: str, model: str, fold: int, *,
          max_epochs: int | None = None, base: str | Path = ".", progress: bool = True,
          callbacks: Sequence = ()) -> Path:
    """Train one run to completion (or continue it) and return the path of its ``final.ckpt``.

    A finished run with the same fingerprint returns at once; one trained on other data or another split
    starts over (module docstring). Configuration errors raise `ConfigError`
    before any training. `callbacks`: extra Lightning callbacks (monitoring, tests).
    """
    spec = resolve_run(study, dataset, model, fold, max_epochs=max_epochs, base=base)
    prepared = open_prepared(spec)
    train_ids, val_ids = read_fold(spec)
    missing = [c for c in train_ids + val_ids if c not in prepared]
    if missing:
        raise RunStateError(f"{spec.paths.split(dataset)}: cases {missing[:5]} are not in {prepared.directory}; "
                          f"rerun `deconver prepare` / `deconver split`")
    unlabelled = [c for c in train_ids + val_ids if not prepared.case(c)["files"].get("label")]
    if unlabelled:
        raise RunStateError(f"{prepared.directory}: cases {unlabelled[:5]} have no label and cannot be trained on")
    check_roi_fits_images(spec, [prepared.case(c)["image_shape"][1:] for c in train_ids + val_ids])
    parts = spec.fingerprint_parts(prepared, train_ids, val_ids)
    if _settle_run_folder(spec, parts):
        if _is_rank_zero():
            print(f"{spec.final}: run already finished, nothing to do", file=sys.stderr)
        return spec.final
    accelerator = _accelerator(spec)
    _check_precision(spec, accelerator)
    resume = _resume_checkpoint(spec)
    if resume is not None:
        _check_readable(resume)

    import lightning.pytorch as L
    import torch

    from deconver import registry
    from deconver.engine.allocator import training_allocator
    from deconver.cost.estimate import predicted_train_seconds
    from deconver.cost.record import CostRecorder
    from deconver.plan import Run
    from deconver.engine.callbacks import RunRecorder
    from deconver.engine.datamodule import SegmentationDataModule, derive_seed
    from deconver.engine.labels import LabelCodec
    from deconver.engine.module import SegmentationModule

    allocator = training_allocator(spec.study.trainer.keep_freed_memory, accelerator)
    if _is_rank_zero():
        _write_records(spec, train_ids, val_ids, accelerator, parts, allocator)
    torch.set_num_threads(spec.study.trainer.threads)  # part of the fingerprint: results depend on it on CPU
    codec = LabelCodec.from_preset(spec.preset)
    L.seed_everything(spec.study.seed, workers=True, verbose=False)
    net = registry.create_model(model, in_channels=spec.preset.in_channels, out_channels=spec.preset.out_channels,
                                spatial_dims=spec.preset.spatial_dims, roi_size=tuple(spec.protocol.roi_size),
                                dataset=spec.preset.name, **spec.model_kwargs)
    module = SegmentationModule(net, codec, spec.protocol, seed=derive_seed(spec.study.seed, fold),
                                epochs=spec.protocol.epochs)
    data = SegmentationDataModule(prepared, train_ids, val_ids, spec.protocol, spec.preset.spatial_dims,
                                  seed=derive_seed(spec.study.seed, fold))
    recorder = RunRecorder(spec.run_dir, list(codec.names))
    predicted = predicted_train_seconds(spec.study, Run(dataset, model, fold), spec.paths)
    if resume is not None and _is_rank_zero():
        print(f"resuming {spec.run_dir} from {resume.name}", file=sys.stderr)
    with warnings.catch_warnings():
        for message in (".*does not have many workers.*", ".*is not resumable.*", ".*`srun` command is available.*",
                        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"):
            warnings.filterwarnings("ignore", message=message)
        trainer = build_trainer(spec, recorder, progress=progress, has_validation=bool(val_ids),
                                extra_callbacks=[*callbacks, CostRecorder(spec.paths.cost(dataset, model, fold), predicted)])
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    if trainer.global_rank == 0 and _is_rank_zero():
        state = _write_final(spec)
        if state is not None:
            best = state.get("best_score")
            note = f"; best validation Dice {best:.4f} (epoch {state.get('best_epoch')})" if best is not None else ""
            print(f"{spec.final}: finished{note}", file=sys.stderr)
    return spec.final


# --------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="study config (YAML)")
    parser.add_argument("--dataset", required=True, help="dataset name in the study")
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--fold", required=True, type=int, help="fold index of the split file")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the protocol's epochs (schedule included)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from deconver.steps import DONE, FAILED

    final = train(args.config, args.dataset, args.model, args.fold, max_epochs=args.max_epochs,
                  progress=not args.no_progress)
    return DONE if final.is_file() or not _is_rank_zero() else FAILED
