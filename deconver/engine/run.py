"""Resolving one (study, dataset, model, fold) run: config, inputs, checks that must pass before training.

Shared by `train` and `predict`. Every failure is a `ConfigError` (or `DatasetError`) naming the key,
flag or file, raised before any training starts; a run folder or an earlier step's output that stops the
run (a missing or truncated checkpoint, a cache prepared with other settings) is a `RunStateError`.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deconver.config import ConfigError, DatasetPreset, Study, _validate, deep_merge, load_study
from deconver.io import read_record
from deconver.paths import RunFolder, StudyPaths
from deconver.steps import StepError


class RunStateError(StepError, ConfigError):
    """The state of a run folder or of an earlier step's output stops the step (exit 1, not a usage error):
    a checkpoint that is missing or truncated, an incomplete or stale run folder, a cache or split that no
    longer matches the study. A ConfigError too, as before, for callers that catch a run's problems."""


@dataclass
class RunSpec:
    """Everything a run needs, resolved from the study config."""

    study: Study
    dataset: str
    model: str
    fold: int
    preset: DatasetPreset
    model_kwargs: dict[str, Any]
    paths: StudyPaths
    run_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def protocol(self):
        return self.preset.protocol

    @property
    def where(self) -> str:
        """The study key under which this dataset's protocol is overridden (for error messages)."""
        return f"datasets.{self.dataset}.overrides.protocol"

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    @property
    def checkpoints(self) -> Path:
        return self.folder.checkpoints

    @property
    def final(self) -> Path:
        return self.folder.final

    def fingerprint(self) -> str:
        """The configuration a resumed run must share with the run it resumes: preset and protocol, model
        and its kwargs, seed, fold and CPU thread count (not devices or workers)."""
        data = {"preset": self.preset.model_dump(mode="json", exclude={"protocol": {"num_workers"}}),
                "model": self.model, "model_kwargs": self.model_kwargs, "seed": self.study.seed, "fold": self.fold,
                "threads": self.study.trainer.threads}
        return config_digest(data)

    def fingerprint_parts(self, prepared, train_ids: list[str], val_ids: list[str]) -> dict[str, str]:
        """What decides whether a run folder holds this run: the configuration, the data it trains and
        validates on (the cached arrays' checksums) and the split (the fold's case lists)."""
        return {"config": self.fingerprint(), "data": prepared.content_key([*train_ids, *val_ids]),
                "split": config_digest({"train": sorted(train_ids), "val": sorted(val_ids)})}

    def model_record(self) -> dict[str, Any]:
        """model.json: what rebuilds the network from the run folder alone, with the resolved keyword
        arguments (the model's defaults under the study's; `overrides` the study's alone)."""
        from deconver.registry import model_info

        kwargs = json.loads(json.dumps(model_info(self.model).resolve(self.model_kwargs)))
        return {"name": self.model, "kwargs": kwargs, "overrides": self.model_kwargs, "in_channels": self.preset.in_channels,
                "out_channels": self.preset.out_channels, "spatial_dims": self.preset.spatial_dims,
                "roi_size": list(self.protocol.roi_size), "dataset": self.preset.name}


def config_digest(data) -> str:
    """A short stable digest of JSON-able configuration (sorted keys)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recorded_parts(run_dir: Path) -> dict | None:
    """The fingerprint parts recorded in a run folder's run.json ({} for a run.json without them, None
    when there is no readable run.json)."""
    record = read_record(RunFolder(run_dir).run_record)
    return None if record is None else record.get("fingerprint_parts") or {}


def changed_configurations(study: Study, runs, base: str | Path = ".") -> list[str]:
    """The run folders of `runs` (`deconver.plan.Run`s) that hold a run (finished or not) of another
    configuration than the study's now (`RunSpec.fingerprint`), each as 'folder: why'. The workflow asks
    before any job, so a study changed in place stops instead of reporting the old runs as the new ones."""
    changed, paths = [], StudyPaths.of(study, base)
    for run in runs:
        old = (recorded_parts(paths.run(run.dataset, run.model, run.fold)) or {}).get("config")
        if old is None:
            continue
        spec = resolve_run(study, run.dataset, run.model, run.fold, base=base)
        if old != spec.fingerprint():
            changed.append(f"{spec.run_dir}: trained with configuration {old}, the study's is now {spec.fingerprint()}")
    return changed


def stale_reason(spec: RunSpec, parts: dict[str, str]) -> tuple[str, str] | None:
    """Why the work in the run folder (final or resumable checkpoints) is not this run, or None when it is.

    ("config", why): the study's configuration changed — such a folder is refused (a changed study is a
    new study name); ("data", why): the data or the split changed under the run — it is redone from scratch.
    """
    old = recorded_parts(spec.run_dir)
    if old is None:
        return None
    if old.get("config") not in (None, parts["config"]):
        return "config", (f"holds a run with a different configuration (fingerprint {old['config']}, now "
                          f"{parts['config']}: protocol, model kwargs, seed or trainer.threads changed)")
    changed = [k for k in ("data", "split") if old.get(k) != parts[k]]
    if not old:
        return "data", "was trained before run folders recorded their data and split fingerprints"
    if changed:
        what = {"data": "the prepared data of its cases", "split": "the fold's training/validation cases"}
        return "data", f"was trained on other data: {' and '.join(what[k] for k in changed)} changed since"
    return None


def as_study(study: Study | str | Path | dict) -> Study:
    return study if isinstance(study, Study) else load_study(study)


def resolve_run(study: Study | str | Path | dict, dataset: str, model: str, fold: int, *,
                max_epochs: int | None = None, base: str | Path = ".") -> RunSpec:
    """Resolve and check a run's configuration (no data is read here)."""
    study = as_study(study)
    preset = study.preset(dataset)
    if not isinstance(fold, int) or not 0 <= fold < study.num_folds:
        raise ConfigError(f"--fold: fold {fold!r} out of range for num_folds={study.num_folds} of study {study.study!r}")
    if max_epochs is not None:
        merged = deep_merge(preset.model_dump(mode="json"), {"protocol": {"epochs": max_epochs}})
        preset = _validate(DatasetPreset, merged, where="--max-epochs")
    if isinstance(study.models, list) and model not in study.models:
        raise ConfigError(f"--model: {model!r} is not among the models of study {study.study!r}: {study.models}")
    kwargs = study.model_kwargs(dataset, model)
    paths = StudyPaths.of(study, base)
    spec = RunSpec(study=study, dataset=dataset, model=model, fold=fold, preset=preset, model_kwargs=kwargs,
                   paths=paths, run_dir=paths.run(dataset, model, fold))
    check_model_fits(spec)
    return spec


def check_model_fits(spec: RunSpec) -> None:
    """The study plan's check of the pair (dims, roi divisibility, fixed size, batch, kwargs) as a
    ConfigError naming the keys; keeps the model's divisor for `check_roi_fits_images`."""
    from deconver.plan import constraints, load_registry
    from deconver.registry import ModelError

    try:
        found = constraints(spec.model, spec.preset, spec.model_kwargs, registry=load_registry(spec.study.model_dirs))
    except ModelError as err:
        raise ConfigError(f"model {spec.model!r} on dataset {spec.dataset!r} "
                          f"({spec.where}.roi_size={list(spec.protocol.roi_size)}, "
                          f"model_overrides.{spec.model}={spec.model_kwargs}): {err}") from None
    spec.extra["divisor"] = tuple(int(d) for d in found.divisor)


def check_model_builds(study: Study, dataset: str, model: str) -> None:
    """Build the network once on the meta device (no memory, no initialisation), so keyword arguments
    the builder rejects (e.g. SegResNet `init_filters: 4` with 8 norm groups) stop a study before its
    first job, naming the key. A builder that cannot run on the meta device is built for real instead."""
    import torch

    from deconver import registry

    preset, kwargs = study.preset(dataset), study.model_kwargs(dataset, model)
    spec = dict(in_channels=preset.in_channels, out_channels=preset.out_channels, spatial_dims=preset.spatial_dims,
                roi_size=tuple(preset.protocol.roi_size), dataset=preset.name, **kwargs)
    try:
        try:
            with torch.device("meta"):
                registry.create_model(model, **spec)
        except registry.ModelBuildError as err:
            if not isinstance(err.__cause__, (ValueError, TypeError, AssertionError)):
                registry.create_model(model, **spec)  # e.g. a constructor that reads a tensor's value
            else:
                raise
    except registry.ModelError as err:
        raise ConfigError(f"model {model!r} on dataset {dataset!r} (model_overrides.{model}={kwargs}, "
                          f"datasets.{dataset}.model_overrides): the network cannot be built: {err}") from None


def check_roi_fits_images(spec: RunSpec, shapes: list[list[int]]) -> None:
    """The roi may exceed an image (it is padded), but not every image padded to the model's divisor:
    such a roi is a configuration mistake (most of every crop would be padding)."""
    if not shapes:
        return
    divisor = spec.extra.get("divisor") or (1,) * len(shapes[0])
    largest = [max(s[a] for s in shapes) for a in range(len(shapes[0]))]
    padded = [int(math.ceil(n / d) * d) for n, d in zip(largest, divisor)]
    roi = list(spec.protocol.roi_size)
    if any(r > p for r, p in zip(roi, padded)):
        raise ConfigError(f"{spec.where}.roi_size: {roi} is larger than every prepared image of {spec.dataset!r} "
                          f"(largest {largest}, padded to the divisor {list(divisor)} of {spec.model!r}: {padded}); "
                          f"use a roi_size of at most {padded}")


def read_fold(spec: RunSpec) -> tuple[list[str], list[str]]:
    """(train ids, val ids) of the run's fold from the split file `deconver split` wrote."""
    from deconver.data.split import fold_cases

    return fold_cases(spec.paths.split(spec.dataset), spec.fold)


def open_prepared(spec: RunSpec):
    """The prepared cache of the run's dataset, checked against the study's preset."""
    from deconver.data import PreparedDataset

    prepared = PreparedDataset(spec.paths.prepared(spec.dataset))
    cached = prepared.preset
    for key in ("spatial_dims", "channels", "labels", "preprocessing"):
        if getattr(cached, key) != getattr(spec.preset, key):
            raise RunStateError(f"{prepared.directory}: prepared with a different `{key}` than "
                              f"datasets.{spec.dataset} now has; rerun `deconver prepare`")
    return prepared
