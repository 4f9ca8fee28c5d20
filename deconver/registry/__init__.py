"""Model registry: a baseline is one drop-in file in models/ that registers named builders.

A model file decorates a builder with ``@register_model(name, dims=..., divisor=..., ...)``;
`discover()` imports every file of models/ (and of a study's extra ``model_dirs``) once, so dropping
a file in is the whole procedure for adding a model. Every caller (CLI, engine, complexity, tests)
builds networks through `create_model`, which first validates the request (`check_model`): the
spatial dims, the roi size against the model's divisor, fixed input size and bottleneck, and the
keyword arguments against the builder's (and the wrapped network's) signature with strict types —
so a mistake fails before any training, with a message naming the model file and the key.

A builder is ``fn(in_channels, out_channels, spatial_dims, roi_size, [dataset], **kwargs) -> nn.Module``
returning logits ``(B, out_channels, *roi)``. ``deconver models`` lists them (table or ``--json``).

The parts (timm's seams): declare.py (`@register_model`, ModelInfo, Constraints), signatures.py
(keyword-argument checks), core.py (the Registry: discovery, look-up, checks, building), table.py
(`deconver models`); this module holds the default registry and the functions every caller uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from deconver.registry.core import MODELS_DIR, Registry
from deconver.registry.declare import Constraints, ModelInfo, register_model, stride_divisor
from deconver.registry.errors import ModelBuildError, ModelError, ModelFileError, UnknownModelError
from deconver.registry.signatures import DERIVED_ARGS, REGISTRY_ARGS

__all__ = ["MODELS_DIR", "REGISTRY_ARGS", "DERIVED_ARGS", "Constraints", "ModelInfo", "Registry", "ModelError",
           "UnknownModelError", "ModelFileError", "ModelBuildError", "register_model", "stride_divisor",
           "default_registry", "discover", "list_models", "model_info", "check_model", "create_model",
           "count_parameters"]

_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    """The registry of the repository's models/ folder (discovered on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Registry()
        _DEFAULT.discover()
    return _DEFAULT


def discover(extra_dirs: Sequence[str | Path] = ()) -> list[str]:
    """Load models/ and `extra_dirs` (e.g. a study's ``model_dirs``); returns the file errors so far."""
    return default_registry().discover(extra_dirs)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; `pattern` is a shell wildcard ('smp_*')."""
    return default_registry().names(pattern)


def model_info(name: str) -> ModelInfo:
    """Metadata of a registered model: dims, divisor, fixed_size, min_bottleneck, min_batch, source, notes, file."""
    return default_registry().info(name)


def check_model(name: str, spatial_dims: int, roi_size: Sequence[int], kwargs: dict | None = None, *,
                dataset: str | None = None, batch_size: int | None = None) -> Constraints:
    """Raise `ModelError` (a ValueError) if `name` cannot run on this input; else its resolved constraints."""
    return default_registry().check(name, spatial_dims, roi_size, kwargs, dataset=dataset, batch_size=batch_size)


def create_model(name: str, *, in_channels: int, out_channels: int, spatial_dims: int,
                 roi_size: Sequence[int], dataset: str | None = None, **kwargs):
    """Build a registered model returning logits (B, out_channels, *roi); validates everything first."""
    return default_registry().create(name, in_channels=in_channels, out_channels=out_channels,
                                     spatial_dims=spatial_dims, roi_size=roi_size, dataset=dataset, **kwargs)


def count_parameters(name: str, **spec) -> int:
    """Parameters of a registered model for `spec` (the create_model arguments), without a forward pass."""
    return default_registry().count_parameters(name, **spec)
