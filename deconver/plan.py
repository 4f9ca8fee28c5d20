"""The study plan: which (dataset, model, fold) runs a study has, and why every other pair is skipped.

One answer for every caller — the workflow (workflow/rules/common.smk), `train` / `predict`
(engine/run.py), `aggregate`, `complexity`, `deconver models --config` and benchmarks/train.py — so
they can never disagree about a study's runs. A (dataset, model) pair is run when the model registry
accepts the model for the dataset as the study configures it: the spatial dims, the roi against the
model's divisor (which may depend on the dataset and the keyword arguments), a fixed input size, the
bottleneck, the training batch size against the model's ``min_batch``, and the keyword arguments
(`fit_problem`), and the dataset's own model list (`datasets.<name>.models`) names it. Every other pair
is a `Skip` with the reason.

    study_runs(study)  -> [Run(dataset, model, fold), ...]   datasets, then models, then folds, in config order
    skipped(study)     -> [Skip(dataset, model, reason), ...]
    complexity_inputs(study, dataset, model) -> what a pair's complexity record depends on
    plan_study(study)  -> StudyPlan (both, plus the models per dataset)

A study whose model list names an unknown model, a dataset model list naming a model that is not the
study's, a model that fits none of its datasets, or a dataset that no model fits is a `PlanError` (a
ConfigError) naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

from deconver.config import ConfigError, DatasetPreset, Study

if TYPE_CHECKING:
    from deconver.registry import Constraints, Registry


class PlanError(ConfigError):
    """A study's model list cannot be planned (unknown model, a model or dataset without any run)."""


@dataclass(frozen=True, order=True)
class Run:
    """One training run of a study."""

    dataset: str
    model: str
    fold: int


@dataclass(frozen=True)
class Skip:
    """A (dataset, model) pair of a study that is not run, and why (the registry's message)."""

    dataset: str
    model: str
    reason: str


@dataclass(frozen=True)
class StudyPlan:
    """The planned runs of a study: the models per dataset and the skipped pairs with their reasons."""

    study: Study
    models: dict[str, tuple[str, ...]]  # dataset -> models run on it, in the study's order
    skips: tuple[Skip, ...]

    @property
    def runs(self) -> list[Run]:
        return [Run(d, m, k) for d, models in self.models.items() for m in models for k in self.study.folds]

    def pairs(self) -> list[tuple[str, str]]:
        """Every (dataset, model) that is run."""
        return [(d, m) for d, models in self.models.items() for m in models]

    def skipped_models(self, dataset: str) -> dict[str, str]:
        """model -> why it is not run on `dataset`."""
        return {s.model: s.reason for s in self.skips if s.dataset == dataset}


def load_registry(model_dirs: Sequence[str | Path] = ()) -> Registry:
    """The default model registry with models/ and `model_dirs` (a study's) discovered."""
    from deconver.registry import ModelError, default_registry

    registry = default_registry()
    if model_dirs:
        try:
            registry.discover(model_dirs)
        except ModelError as err:  # a model_dirs folder that does not exist
            raise PlanError(f"model_dirs: {err}") from None
    return registry


def constraints(model: str, preset: DatasetPreset, kwargs: dict | None = None, *,
                batch_size: int | None | Literal["preset"] = "preset", registry: Registry | None = None) -> Constraints:
    """The model's resolved constraints on `preset` at its roi; raises `ModelError` when it does not fit.

    batch_size: the training batch checked against the model's ``min_batch`` ("preset": the preset's
    protocol.batch_size; None: not checked, for callers that raise the batch to ``min_batch``).
    """
    reg = registry or load_registry()
    batch = preset.protocol.batch_size if batch_size == "preset" else batch_size
    return reg.check(model, preset.spatial_dims, tuple(preset.protocol.roi_size), dict(kwargs or {}),
                     dataset=preset.name, batch_size=batch)


def fit_problem(model: str, preset: DatasetPreset, kwargs: dict | None = None, *,
                batch_size: int | None | Literal["preset"] = "preset", registry: Registry | None = None) -> str | None:
    """Why `model` cannot run on `preset` with `kwargs` (dims, roi, fixed size, batch, kwargs), or None."""
    from deconver.registry import ModelError

    try:
        constraints(model, preset, kwargs, batch_size=batch_size, registry=registry)
    except ModelError as err:
        return str(err)
    return None


def pair_problem(study: Study, dataset: str, model: str, registry: Registry | None = None) -> str | None:
    """Why the study does not run `model` on `dataset` as it configures both, or None when it does.

    The batch checked against the model's ``min_batch`` is the per-device one (the protocol's batch is
    global, engine/distributed.py); a global batch the processes cannot share is a PlanError.
    """
    from deconver.engine.distributed import per_device_batch, world_size

    chosen = study.datasets[dataset].models
    if chosen is not None and model not in chosen:
        return f"not in datasets.{dataset}.models {chosen}"
    preset = study.preset(dataset)
    try:
        batch = per_device_batch(preset.protocol.batch_size, world_size(study.trainer),
                                 where=f"datasets.{dataset}: protocol")
    except ConfigError as err:
        raise PlanError(str(err)) from None
    return fit_problem(model, preset, study.model_kwargs(dataset, model), batch_size=batch,
                       registry=registry or load_registry(study.model_dirs))


def check_pair(study: Study, dataset: str, model: str, registry: Registry | None = None) -> None:
    """Raise `PlanError` unless the study runs `model` on `dataset` (a step asked for one pair by hand)."""
    reg = registry or load_registry(study.model_dirs)
    if dataset not in study.datasets:
        raise PlanError(f"--dataset: {dataset!r} is not a dataset of study {study.study!r}: {list(study.datasets)}")
    if model not in model_names(study, reg):
        raise PlanError(f"--model: {model!r} is not among the models of study {study.study!r}: {study.models}")
    why = pair_problem(study, dataset, model, reg)
    if why is not None:
        raise PlanError(f"study {study.study!r} does not run {model!r} on {dataset!r}: {why}")


def model_names(study: Study, registry: Registry | None = None) -> list[str]:
    """The study's model list (every registered model for ``models: all``); an unknown name is a PlanError."""
    from deconver.registry import ModelError

    reg = registry or load_registry(study.model_dirs)
    if study.models == "all":
        return list(reg.names())
    names = list(dict.fromkeys(study.models))
    for name in names:
        try:
            reg.info(name)
        except ModelError as err:
            raise PlanError(f"models: {err}") from None
    return names


def plan_study(study: Study, registry: Registry | None = None) -> StudyPlan:
    """The runs of `study` and the skipped pairs with their reasons (see the module docstring)."""
    reg = registry or load_registry(study.model_dirs)
    names = model_names(study, reg)
    models: dict[str, tuple[str, ...]] = {}
    skips: list[Skip] = []
    for dataset, entry in study.datasets.items():
        unknown = [m for m in entry.models or () if m not in names]
        if unknown:
            raise PlanError(f"datasets.{dataset}.models: {unknown} are not among the study's models {names}")
        kept = []
        for name in names:
            why = pair_problem(study, dataset, name, reg)
            if why is None:
                kept.append(name)
            else:
                skips.append(Skip(dataset, name, why))
        if not kept:
            raise PlanError(f"no model of {names} fits dataset {dataset!r}")
        models[dataset] = tuple(kept)
    if study.models != "all":
        unused = [n for n in names if not any(n in kept for kept in models.values())]
        if unused:
            raise PlanError(f"models: {unused} fit none of the datasets {list(study.datasets)}")
    return StudyPlan(study=study, models=models, skips=tuple(skips))


def study_runs(study: Study, registry: Registry | None = None) -> list[Run]:
    """Every (dataset, model, fold) run of the study, datasets then models then folds in config order."""
    return plan_study(study, registry).runs


def skipped(study: Study, registry: Registry | None = None) -> list[Skip]:
    """The (dataset, model) pairs of the study that are not run, each with the registry's reason."""
    return list(plan_study(study, registry).skips)


def complexity_inputs(study: Study, dataset: str, model: str, *, roi=None, runtime_roi=None, repeats=None,
                      warmup: int = 2, runtime: bool = True, device: str | None = None,
                      overrides: dict | None = None) -> dict:
    """What the complexity record of a study's (dataset, model) pair depends on (roi, channels, kwargs, the
    runtime settings): `deconver complexity`'s "up to date" check and the workflow's complexity param (a
    change reruns the job) both compare it."""
    preset = study.preset(dataset)
    roi = list(roi or preset.protocol.roi_size)
    return {"model": model, "dataset": dataset, "preset": preset.name, "roi": roi, "in_channels": preset.in_channels,
            "out_channels": preset.out_channels, "spatial_dims": preset.spatial_dims,
            "model_kwargs": {**study.model_kwargs(dataset, model), **(overrides or {})},
            "runtime": {"roi": list(runtime_roi or roi), "repeats": repeats or study.complexity.latency_repeats,
                        "warmup": warmup} if runtime else None,
            "device_requested": device or study.complexity.device}
