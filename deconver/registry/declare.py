"""What a model file declares: `@register_model` and the ModelInfo / Constraints it records."""
from __future__ import annotations

import functools
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from deconver.registry.errors import ModelError, ModelFileError, show
from deconver.registry.signatures import REGISTRY_ARGS, DERIVED_ARGS, Param, accepts, call_with_accepted, jsonable, prune, signature_params

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


@dataclass(frozen=True)
class Constraints:
    """What an input must satisfy for one resolved (model, spatial dims, kwargs, dataset)."""

    divisor: tuple[int, ...]  # per axis: the input size must be a multiple of it
    fixed_size: bool  # the network is built for exactly roi_size (UNETR); other sizes fail
    min_bottleneck: int  # voxels the coarsest map (roi // divisor) must have at least
    min_batch: int  # training batch size at least (e.g. BatchNorm on a 1 x 1 pooled map)

    def min_roi(self) -> tuple[int, ...]:
        """The smallest roi satisfying the constraints (the last axes grow first)."""
        roi = list(self.divisor)
        axis = len(roi) - 1
        while math.prod(r // d for r, d in zip(roi, self.divisor)) < self.min_bottleneck:
            roi[axis] += self.divisor[axis]
            axis = (axis - 1) % len(roi)
        return tuple(roi)

    def describe(self) -> str:
        """Short human form, e.g. 'x16, bottleneck >= 2 vox'."""
        div = self.divisor
        parts = [f"x{div[0]}" if len(set(div)) == 1 else "x(" + ",".join(map(str, div)) + ")"]
        if self.fixed_size:
            parts.insert(0, "fixed size (= roi)")
        if self.min_bottleneck > 1:
            parts.append(f"bottleneck >= {self.min_bottleneck} vox")
        if self.min_batch > 1:
            parts.append(f"batch >= {self.min_batch}")
        return ", ".join(parts)


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: its builder and what it supports (data, shown by `deconver models`)."""

    name: str
    builder: Callable[..., Any]
    dims: tuple[int, ...]
    divisor: int | Sequence[int] | Callable[..., int | Sequence[int]]
    fixed_size: bool
    min_bottleneck: int
    min_batch: int
    defaults: dict[str, Any]
    wraps: Callable[..., Any] | None
    source: str
    paper: str
    notes: str
    file: Path

    @property
    def where(self) -> str:
        """The model file, relative to the repository when it lies inside it."""
        return show(self.file)

    @property
    def accepts_dataset(self) -> bool:
        """Whether the builder names a `dataset` parameter (only then does it get the preset name)."""
        return "dataset" in inspect.signature(self.builder).parameters

    @functools.cached_property
    def parameters(self) -> dict[str, Param] | None:
        """Keyword arguments a config may set (name -> Param); None when they cannot be enumerated."""
        own, open_kw = signature_params(self.builder, "builder")
        params = {k: v for k, v in own.items() if k not in REGISTRY_ARGS}
        if open_kw:
            if self.wraps is None:
                return None  # the builder forwards **kwargs somewhere we cannot see
            wrapped, _ = signature_params(self.wraps, getattr(self.wraps, "__name__", "wrapped"))
            for key, param in wrapped.items():
                if key not in params and key not in REGISTRY_ARGS and key not in DERIVED_ARGS:
                    params[key] = param
        return params

    def resolve(self, kwargs: dict | None = None) -> dict[str, Any]:
        """The keyword arguments the builder gets: the defaults, then `kwargs` (None values dropped)."""
        return {**self.defaults, **prune(kwargs or {})}

    def constraints(self, spatial_dims: int, kwargs: dict | None = None, dataset: str | None = None) -> Constraints:
        """The constraints for these dims, keyword arguments (merged over the defaults) and dataset."""
        merged = self.resolve(kwargs)
        div = self.divisor
        if callable(div):
            call = {**merged, "spatial_dims": spatial_dims, "dataset": dataset}
            try:
                div = call_with_accepted(div, call)
            except ModelError:
                raise
            except Exception as err:
                raise ModelError(f"model {self.name!r} ({self.where}): {err}") from err
        div = (int(div),) * spatial_dims if isinstance(div, int) else tuple(int(d) for d in div)
        if len(div) != spatial_dims or min(div) < 1:
            raise ModelError(f"model {self.name!r} ({self.where}): divisor {div} does not fit {spatial_dims}D inputs")
        return Constraints(div, self.fixed_size, self.min_bottleneck, self.min_batch)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata; the divisor is resolved with the default keyword arguments per dims."""
        divisor = {}
        for d in self.dims:
            try:
                divisor[str(d)] = list(self.constraints(d).divisor)
            except ModelError as err:
                divisor[str(d)] = str(err)
        return {
            "name": self.name, "dims": list(self.dims), "divisor": divisor, "fixed_size": self.fixed_size,
            "min_bottleneck": self.min_bottleneck, "min_batch": self.min_batch, "defaults": jsonable(self.defaults),
            "source": self.source, "paper": self.paper, "notes": self.notes, "file": self.where,
        }


# Models registered while a file is being imported are staged here and committed only if the whole


# file loads, so a broken file registers nothing and a duplicate name is caught with both files known.
_STAGING: list[list[ModelInfo]] = []


def register_model(
    name: str,
    *,
    dims: Sequence[int] = (2, 3),
    divisor: int | Sequence[int] | Callable[..., int | Sequence[int]] = 1,
    fixed_size: bool = False,
    min_bottleneck: int = 1,
    min_batch: int = 1,
    defaults: dict[str, Any] | None = None,
    wraps: Callable[..., Any] | None = None,
    source: str = "",
    paper: str = "",
    notes: str = "",
):
    """Register a builder under `name` (decorator).

    dims: the spatial dims it supports. divisor: the multiple every input axis must be (an int, one per
    axis, or a callable of the merged keyword arguments, ``spatial_dims`` and ``dataset`` — it gets the
    ones it names). fixed_size: the network only takes inputs of its build size (roi_size).
    min_bottleneck: voxels the coarsest map roi // divisor needs (2 for networks that normalise it per
    sample). min_batch: smallest training batch. defaults: keyword arguments merged under the config's
    (the caller wins). wraps: the network class the builder forwards ``**kwargs`` to, so those keywords
    are validated against its signature. source / paper / notes: shown by ``deconver models``.
    """

    def decorate(builder: Callable[..., Any]) -> Callable[..., Any]:
        file = Path(inspect.getsourcefile(builder) or "<unknown>").resolve()
        where = f"{show(file)}: @register_model({name!r})"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ModelFileError(f"{where}: a model name is lower-case letters, digits, '_', '-', '.' (got {name!r})")
        bad_dims = [d for d in dims if d not in (2, 3)]
        if not dims or bad_dims:
            raise ModelFileError(f"{where}: dims must be a non-empty subset of (2, 3), got {tuple(dims)}")
        missing = [a for a in REGISTRY_ARGS[:4] if not accepts(builder, a)]
        if missing:
            raise ModelFileError(f"{where}: the builder {builder.__name__}() must accept {', '.join(missing)}")
        for label, value in (("min_bottleneck", min_bottleneck), ("min_batch", min_batch)):
            if not isinstance(value, int) or value < 1:
                raise ModelFileError(f"{where}: {label} must be a positive int, got {value!r}")
        info = ModelInfo(
            name=name, builder=builder, dims=tuple(sorted(dims)), divisor=divisor, fixed_size=bool(fixed_size),
            min_bottleneck=min_bottleneck, min_batch=min_batch, defaults=dict(defaults or {}), wraps=wraps,
            source=source, paper=paper, notes=notes, file=file,
        )
        accepted = info.parameters
        if accepted is not None:
            unknown = [k for k in info.defaults if k not in accepted]
            if unknown:
                raise ModelFileError(f"{where}: defaults name unknown keyword(s) {unknown}")
        if _STAGING:
            _STAGING[-1].append(info)
        else:  # defined outside discovery (a notebook, a script): goes straight into the default registry
            from deconver.registry import default_registry

            errors = default_registry()._commit([info], file)
            if errors:
                raise ModelFileError(errors[0])
        return builder

    return decorate


def stride_divisor(strides: Sequence[int | Sequence[int]], spatial_dims: int) -> tuple[int, ...]:
    """Per-axis product of a network's strides (ints or per-axis sequences): the input divisor."""
    out = [1] * spatial_dims
    for stride in strides:
        per_axis = [stride] * spatial_dims if isinstance(stride, int) else list(stride)
        out = [o * int(s) for o, s in zip(out, per_axis)]
    return tuple(out)
