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
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import re
import sys
import traceback
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from deconver.config import REPO_ROOT

MODELS_DIR = REPO_ROOT / "models"

# Builder arguments the registry fills from the dataset preset; configs may not set them.
REGISTRY_ARGS = ("in_channels", "out_channels", "spatial_dims", "roi_size", "dataset")
# Arguments of wrapped networks that builders derive from the preset (roi -> img_size, out -> classes).
DERIVED_ARGS = ("img_size", "classes", "num_classes", "in_chans", "n_classes")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_SKIP_PARAMS = ("self", "cls")


# --------------------------------------------------------------------------- errors
class ModelError(ValueError):
    """An invalid model request or model file; the message names the model, its file and the key."""


class UnknownModelError(ModelError, KeyError):
    """No model is registered under this name; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return ValueError.__str__(self)


class ModelFileError(ModelError):
    """A model file failed to load or to register (syntax error, import error, duplicate name)."""


class ModelBuildError(ModelError):
    """A registered builder raised or returned something other than an nn.Module; names the file."""


# --------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class _Param:
    """One keyword argument a model accepts: where it comes from, its type and default."""

    name: str
    annotation: Any  # a type, or None when unknown (then the value is not type-checked)
    default: Any
    origin: str  # "builder" or the wrapped constructor's name


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
        return _show(self.file)

    @property
    def accepts_dataset(self) -> bool:
        """Whether the builder names a `dataset` parameter (only then does it get the preset name)."""
        return "dataset" in inspect.signature(self.builder).parameters

    @functools.cached_property
    def parameters(self) -> dict[str, _Param] | None:
        """Keyword arguments a config may set (name -> _Param); None when they cannot be enumerated."""
        own, open_kw = _signature_params(self.builder, "builder")
        params = {k: v for k, v in own.items() if k not in REGISTRY_ARGS}
        if open_kw:
            if self.wraps is None:
                return None  # the builder forwards **kwargs somewhere we cannot see
            wrapped, _ = _signature_params(self.wraps, getattr(self.wraps, "__name__", "wrapped"))
            for key, param in wrapped.items():
                if key not in params and key not in REGISTRY_ARGS and key not in DERIVED_ARGS:
                    params[key] = param
        return params

    def constraints(self, spatial_dims: int, kwargs: dict | None = None, dataset: str | None = None) -> Constraints:
        """The constraints for these dims, keyword arguments (merged over the defaults) and dataset."""
        merged = {**self.defaults, **_prune(kwargs or {})}
        div = self.divisor
        if callable(div):
            call = {**merged, "spatial_dims": spatial_dims, "dataset": dataset}
            try:
                div = _call_with_accepted(div, call)
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
            "min_bottleneck": self.min_bottleneck, "min_batch": self.min_batch, "defaults": _jsonable(self.defaults),
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
        where = f"{_show(file)}: @register_model({name!r})"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ModelFileError(f"{where}: a model name is lower-case letters, digits, '_', '-', '.' (got {name!r})")
        bad_dims = [d for d in dims if d not in (2, 3)]
        if not dims or bad_dims:
            raise ModelFileError(f"{where}: dims must be a non-empty subset of (2, 3), got {tuple(dims)}")
        missing = [a for a in REGISTRY_ARGS[:4] if not _accepts(builder, a)]
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
            errors = default_registry()._commit([info], file)
            if errors:
                raise ModelFileError(errors[0])
        return builder

    return decorate


# --------------------------------------------------------------------------- the registry
class Registry:
    """Registered models of some model folders; the module-level functions use the default one."""

    def __init__(self, dirs: Sequence[str | Path] = (MODELS_DIR,)):
        self.dirs = [Path(d) for d in dirs]
        self._models: dict[str, ModelInfo] = {}
        self._conflicts: dict[str, list[Path]] = {}
        self._errors: list[tuple[Path, str]] = []  # (model file, message)
        self._loaded: set[Path] = set()
        self._base_done = False

    # ------------------------------------------------------------------ discovery
    def discover(self, extra_dirs: Sequence[str | Path] = ()) -> list[str]:
        """Import every model file of the registry's folders and of `extra_dirs` (once each).

        A file that fails (syntax error, import error, a builder declaration error, a duplicate name)
        registers nothing and is reported — as a warning here and in `errors` — naming the file; the
        other files still load. Returns all file errors so far. A missing extra folder is an error.
        """
        folders = [] if self._base_done else [d for d in self.dirs if d.is_dir()]
        for extra in extra_dirs:
            folder = Path(extra).expanduser().resolve()
            if not folder.is_dir():
                raise ModelError(f"model folder not found: {extra} (resolved to {folder})")
            folders.append(folder)
        self._base_done = True
        before = len(self._errors)
        for folder in folders:
            for path in sorted(Path(folder).resolve().glob("*.py")):
                if not path.name.startswith("_") and path not in self._loaded:
                    self._load_file(path)
        for _, message in self._errors[before:]:
            warnings.warn(message, stacklevel=2)
        return self.errors

    @property
    def errors(self) -> list[str]:
        """Messages of the model files that failed to load or register, each naming its file."""
        return [message for _, message in self._errors]

    def _load_file(self, path: Path) -> None:
        self._loaded.add(path)
        module_name = _module_name(path)
        staged: list[ModelInfo] = []
        _STAGING.append(staged)
        try:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except Exception as err:  # the file is broken: report it, keep going with the others
            sys.modules.pop(module_name, None)
            self._errors.append((path, _describe(err, path)))
            return
        finally:
            _STAGING.pop()
        if not staged:
            self._errors.append((path, f"{_show(path)}: registers no model (decorate a builder with "
                                       f"@register_model; helper files start with '_')"))
        self._commit(staged, path)

    def _commit(self, infos: list[ModelInfo], path: Path) -> list[str]:
        """Add a file's models; a name another file registers too is rejected. Returns the new errors."""
        seen: set[str] = set()
        errors: list[str] = []
        for info in infos:
            if info.name in seen:
                errors.append(f"{_show(path)}: registers model {info.name!r} twice")
                continue
            seen.add(info.name)
            if info.name in self._conflicts:
                self._conflicts[info.name].append(info.file)
            elif info.name in self._models and self._models[info.name].file != info.file:
                other = self._models.pop(info.name)
                self._conflicts[info.name] = [other.file, info.file]
            else:
                self._models[info.name] = info  # new, or the same file imported again
                continue
            files = " and ".join(_show(f) for f in self._conflicts[info.name])
            errors.append(f"{_show(path)}: model {info.name!r} is registered by {files}; one name, one file — "
                          f"rename one (the name is rejected until then)")
        self._errors.extend((path, message) for message in errors)
        return errors

    # ------------------------------------------------------------------ look-up
    def names(self, pattern: str | None = None) -> list[str]:
        """Registered names, sorted; `pattern` filters with shell wildcards ('*unet*')."""
        names = sorted(self._models)
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names

    def info(self, name: str) -> ModelInfo:
        """The registered model `name`, or an error listing the registered names and broken files."""
        if name in self._models:
            return self._models[name]
        if name in self._conflicts:
            files = ", ".join(_show(f) for f in self._conflicts[name])
            raise ModelError(f"model {name!r} is registered by more than one file ({files}); rename one")
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=3)
        message = f"unknown model {name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
        message += f"; registered models: {', '.join(known) or 'none'}"
        if self.errors:
            message += "\nthese model files failed to load:\n  " + "\n  ".join(self.errors)
        raise UnknownModelError(message)

    # ------------------------------------------------------------------ checks
    def check(self, name: str, spatial_dims: int, roi_size: Sequence[int], kwargs: dict | None = None, *,
              dataset: str | None = None, batch_size: int | None = None) -> Constraints:
        """Raise `ModelError` if the model cannot be built or trained for this request; else its constraints."""
        info = self.info(name)
        label = f"model {name!r} ({info.where})"
        if spatial_dims not in info.dims:
            supported = " and ".join(f"{d}D" for d in info.dims)
            raise ModelError(f"{label} supports {supported} inputs only, not {spatial_dims}D")
        kwargs = _prune(dict(kwargs or {}))
        _check_kwargs(info, kwargs)
        roi = _as_roi(roi_size, spatial_dims, label)
        cons = info.constraints(spatial_dims, kwargs, dataset)
        bad = [i for i, (r, d) in enumerate(zip(roi, cons.divisor)) if r % d]
        if bad:
            fix = [math.ceil(r / d) * d for r, d in zip(roi, cons.divisor)]
            axes = ", ".join(f"axis {i} is {roi[i]}" for i in bad)
            raise ModelError(
                f"{label} cannot take roi_size {list(roi)}: every axis must be a multiple of "
                f"{_fmt_div(cons.divisor)} ({axes}); use e.g. {fix} (or pad the input)")
        coarse = [r // d for r, d in zip(roi, cons.divisor)]
        if math.prod(coarse) < cons.min_bottleneck:
            grown = Constraints(cons.divisor, cons.fixed_size, cons.min_bottleneck, 1)
            fix = [max(r, m) for r, m in zip(roi, grown.min_roi())]
            if math.prod(f // d for f, d in zip(fix, cons.divisor)) < cons.min_bottleneck:
                fix = [r * 2 for r in roi]
            raise ModelError(
                f"{label} cannot take roi_size {list(roi)}: its coarsest feature map would be "
                f"{'x'.join(map(str, coarse))} (roi / {_fmt_div(cons.divisor)}) and the network needs at least "
                f"{cons.min_bottleneck} voxels there (per-sample normalisation fails on a single voxel); "
                f"use e.g. {fix}")
        if batch_size is not None and batch_size < cons.min_batch:
            raise ModelError(f"{label} needs a training batch size of at least {cons.min_batch}, got {batch_size}")
        return cons

    # ------------------------------------------------------------------ building
    def create(self, name: str, *, in_channels: int, out_channels: int, spatial_dims: int,
               roi_size: Sequence[int], dataset: str | None = None, **kwargs):
        """Validate the request (`check`), then build the network; builder failures name the file."""
        import torch.nn as nn

        for label, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"model {name!r}: {label} must be a positive int, got {value!r}")
        kwargs = _prune(kwargs)
        cons = self.check(name, spatial_dims, roi_size, kwargs, dataset=dataset)
        info = self.info(name)
        roi = tuple(int(r) for r in roi_size)
        call = dict(in_channels=in_channels, out_channels=out_channels, spatial_dims=spatial_dims, roi_size=roi)
        if info.accepts_dataset:
            call["dataset"] = dataset
        merged = {**info.defaults, **kwargs}
        try:
            net = info.builder(**call, **merged)
        except ModelError:
            raise
        except Exception as err:
            raise ModelBuildError(
                f"{info.where}: builder {info.builder.__name__}() of model {name!r} failed: "
                f"{type(err).__name__}: {err}") from err
        if not isinstance(net, nn.Module):
            raise ModelBuildError(f"{info.where}: builder of model {name!r} returned {type(net).__name__}, not an nn.Module")
        if cons.fixed_size:
            net.register_forward_pre_hook(_FixedInputSize(name, roi))
        net.model_spec = {  # what rebuilds it: written beside checkpoints as model.json
            "name": name, "in_channels": in_channels, "out_channels": out_channels, "spatial_dims": spatial_dims,
            "roi_size": list(roi), "dataset": dataset, "kwargs": _jsonable(merged), "file": info.where,
        }
        return net

    def count_parameters(self, name: str, *, in_channels: int, out_channels: int, spatial_dims: int,
                         roi_size: Sequence[int], dataset: str | None = None, **kwargs) -> int:
        """Number of parameters, built on the meta device when the network allows it (no memory, no init)."""
        import torch

        spec = dict(in_channels=in_channels, out_channels=out_channels, spatial_dims=spatial_dims,
                    roi_size=roi_size, dataset=dataset, **kwargs)
        self.check(name, spatial_dims, roi_size, kwargs, dataset=dataset)
        try:
            with torch.device("meta"):
                net = self.create(name, **spec)
        except Exception:  # some constructors call .item() etc.; build for real then
            net = self.create(name, **spec)
        return sum(p.numel() for p in net.parameters())


class _FixedInputSize:
    """Forward pre-hook of fixed-size networks: a clear error instead of a reshape failure deep inside."""

    def __init__(self, name: str, roi: tuple[int, ...]):
        self.name, self.roi = name, roi

    def __call__(self, module, args):
        shape = tuple(args[0].shape[2:]) if args and hasattr(args[0], "shape") else None
        if shape is not None and shape != self.roi:
            raise ValueError(f"model {self.name!r} is built for inputs of size {list(self.roi)} only "
                             f"(fixed_size); got {list(shape)} — use roi_size as the sliding-window size")


# --------------------------------------------------------------------------- module-level API
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


def stride_divisor(strides: Sequence[int | Sequence[int]], spatial_dims: int) -> tuple[int, ...]:
    """Per-axis product of a network's strides (ints or per-axis sequences): the input divisor."""
    out = [1] * spatial_dims
    for stride in strides:
        per_axis = [stride] * spatial_dims if isinstance(stride, int) else list(stride)
        out = [o * int(s) for o, s in zip(out, per_axis)]
    return tuple(out)


# --------------------------------------------------------------------------- helpers
def _show(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _prune(kwargs: dict) -> dict:
    """Drop None values: a config can say "unset" uniformly (the builder's default applies)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: getattr(o, "__name__", repr(o))))


def _fmt_div(div: tuple[int, ...]) -> str:
    return str(div[0]) if len(set(div)) == 1 else "(" + ", ".join(map(str, div)) + ")"


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call_with_accepted(fn: Callable, values: dict):
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**values)
    return fn(**{k: v for k, v in values.items() if k in params})


def _module_name(path: Path) -> str:
    """Importable module name for a model file, so classes defined there pickle (DDP spawn)."""
    folder = path.parent
    package = "models" if folder == MODELS_DIR.resolve() else "deconver_models_" + hashlib.sha1(
        str(folder).encode()).hexdigest()[:10]
    existing = sys.modules.get(package)
    if existing is None:
        existing = types.ModuleType(package)
        existing.__path__ = [str(folder)]
        sys.modules[package] = existing
    elif str(folder) not in list(getattr(existing, "__path__", [])):  # someone else's `models` package
        package = "deconver_models_" + hashlib.sha1(str(folder).encode()).hexdigest()[:10]
        sys.modules.setdefault(package, types.ModuleType(package)).__path__ = [str(folder)]
    return f"{package}.{path.stem}"


def _describe(err: BaseException, path: Path) -> str:
    """'models/x.py:12: NameError: ...' — the line of the model file where loading failed."""
    if isinstance(err, SyntaxError) and err.filename and Path(err.filename).resolve() == path:
        return f"{_show(path)}:{err.lineno}: SyntaxError: {err.msg}"
    if isinstance(err, ModelFileError):
        return str(err)
    line = ""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if frame.filename and Path(frame.filename).resolve() == path:
            line = f":{frame.lineno}"
            break
    return f"{_show(path)}{line}: {type(err).__name__}: {err}"


def _type_hints(fn: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # one unresolvable annotation: resolve the others one by one
        hints = {}
        namespace = dict(getattr(fn, "__globals__", {}))
        for key, ann in getattr(fn, "__annotations__", {}).items():
            if isinstance(ann, str):
                try:
                    ann = eval(ann, namespace)  # noqa: S307 - an annotation of an imported module
                except Exception:
                    continue
            hints[key] = ann
        return hints


def _signature_params(obj: Callable, origin: str) -> tuple[dict[str, _Param], bool]:
    """Keyword-settable parameters of a function or class constructor, and whether it takes **kwargs."""
    fn = obj.__init__ if inspect.isclass(obj) else obj
    hints = _type_hints(fn)
    params, open_kw = {}, False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            open_kw = True
        elif p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY) or p.name in _SKIP_PARAMS:
            continue
        else:
            ann = hints.get(p.name)
            if ann is None and p.default is not inspect.Parameter.empty and type(p.default) in (bool, int, float, str):
                ann = float if type(p.default) is float else type(p.default)
            params[p.name] = _Param(p.name, ann, p.default, origin)
    return params, open_kw


@functools.lru_cache(maxsize=None)
def _adapter(annotation):
    from pydantic import ConfigDict, TypeAdapter

    try:
        return TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True))
    except Exception:
        try:
            return TypeAdapter(annotation)
        except Exception:  # a type pydantic cannot describe: the value is not type-checked
            return None


def _check_kwargs(info: ModelInfo, kwargs: dict) -> None:
    """Unknown, reserved or mistyped keyword arguments fail naming the key (strict: 'false' is no bool)."""
    from pydantic import ValidationError

    label = f"model {info.name!r} ({info.where})"
    for key in kwargs:
        if key in REGISTRY_ARGS or key in DERIVED_ARGS:
            raise ModelError(f"{label}: keyword {key!r} is set from the dataset preset (channels, labels, roi_size); "
                             f"remove it from the model's keyword arguments")
    accepted = info.parameters
    if accepted is None:
        return
    for key, value in kwargs.items():
        if key not in accepted:
            close = difflib.get_close_matches(key, list(accepted), n=3)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ModelError(f"{label}: unknown keyword argument {key!r}{hint}; it accepts: {', '.join(sorted(accepted))}")
        param = accepted[key]
        if param.annotation is None:
            continue
        try:
            adapter = _adapter(param.annotation)
        except TypeError:  # unhashable annotation
            adapter = None
        if adapter is None:
            continue
        try:
            adapter.validate_json(json.dumps(value, allow_nan=False), strict=True)
        except (TypeError, ValueError) as err:
            if isinstance(err, ValidationError):
                reasons = "; ".join(dict.fromkeys(e["msg"] for e in err.errors()))
                raise ModelError(f"{label}: keyword {key!r}: {reasons} (got {value!r}; expected {_type_name(param)})") from None
            try:  # not JSON (a class, a callable): validate the Python object
                adapter.validate_python(value, strict=True)
            except ValidationError as err2:
                reasons = "; ".join(dict.fromkeys(e["msg"] for e in err2.errors()))
                raise ModelError(f"{label}: keyword {key!r}: {reasons} (got {value!r}; expected {_type_name(param)})") from None


def _type_name(param: _Param) -> str:
    ann = param.annotation
    text = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
    return f"{text}, from {param.origin}"


def _as_roi(roi_size: Sequence[int], spatial_dims: int, label: str) -> tuple[int, ...]:
    try:
        roi = tuple(roi_size)
    except TypeError:
        raise ModelError(f"{label}: roi_size must be a sequence of {spatial_dims} ints, got {roi_size!r}") from None
    if len(roi) != spatial_dims or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in roi):
        raise ModelError(f"{label}: roi_size must be {spatial_dims} positive ints, got {list(roi)}")
    return roi


# --------------------------------------------------------------------------- `deconver models`
def configure(parser) -> None:
    """Arguments of `deconver models`."""
    parser.add_argument("pattern", nargs="?", default=None, help="only models matching this shell wildcard, e.g. '*unet*'")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--config", help="a study config: adds its model_dirs; columns are its datasets "
                        "(with overrides) and parameters use its model keyword arguments")
    parser.add_argument("--dataset", action="append", default=None, help="only this dataset/preset (repeatable)")
    parser.add_argument("--model-dir", action="append", default=[], help="an extra folder of model files (repeatable)")
    parser.add_argument("--no-params", action="store_true", help="skip building models to count parameters")


def describe_models(pattern: str | None = None, *, config: str | None = None, datasets: Sequence[str] | None = None,
                    model_dirs: Sequence[str] = (), params: bool = True, registry: Registry | None = None) -> dict:
    """What `deconver models` prints, as data: per model its metadata and parameters per dataset preset."""
    from tqdm import tqdm

    from deconver.config import available_presets, load_preset, load_study
    from deconver.plan import fit_problem

    if config is not None:  # the study's datasets and kwargs: the same check as its plan (deconver.plan)
        study = load_study(config)
        columns = {d: (study.preset(d), functools.partial(study.model_kwargs, d)) for d in study.datasets}
        model_dirs = [*study.model_dirs, *model_dirs]
    else:
        columns = {p: (load_preset(p), lambda m: {}) for p in available_presets()}
    if datasets:
        unknown = [d for d in datasets if d not in columns]
        if unknown:
            raise ModelError(f"unknown dataset(s) {unknown}; available: {sorted(columns)}")
        columns = {d: columns[d] for d in datasets}
    registry = registry or default_registry()
    registry.discover(model_dirs)
    rows = []
    for name in tqdm(registry.names(pattern), desc="models", unit="model", leave=False, disable=None):
        info = registry.info(name)
        row = info.to_dict()
        row["params"], row["problems"], row["build_errors"] = {}, {}, {}
        for column, (preset, kwargs_of) in columns.items():
            dims, roi = preset.spatial_dims, preset.protocol.roi_size
            kwargs = kwargs_of(name)
            try:
                if dims not in info.dims:
                    raise ModelError(f"{dims}D not supported")
                problem = fit_problem(name, preset, kwargs, registry=registry)
                if problem is not None:
                    raise ModelError(problem)
                row["params"][column] = registry.count_parameters(
                    name, in_channels=preset.in_channels, out_channels=preset.out_channels, spatial_dims=dims,
                    roi_size=roi, dataset=preset.name, **kwargs) if params else None
            except ModelBuildError as err:
                row["params"][column] = None
                row["build_errors"][column] = row["problems"][column] = str(err)
            except ModelError as err:
                row["params"][column] = None
                row["problems"][column] = str(err)
        rows.append(row)
    return {
        "datasets": {c: {"preset": p.name, "spatial_dims": p.spatial_dims, "roi_size": p.protocol.roi_size,
                         "in_channels": p.in_channels, "out_channels": p.out_channels} for c, (p, _) in columns.items()},
        "models": rows,
        "errors": registry.errors,
    }


def _fmt_params(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def format_table(report: dict) -> str:
    """The `deconver models` table (Markdown), with footnotes for combinations a model cannot run."""
    columns = list(report["datasets"])
    header = ["model", "dims", "constraints", *[f"{c} ({'x'.join(map(str, report['datasets'][c]['roi_size']))})"
                                                for c in columns], "source"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    notes, foot = [], []
    for row in report["models"]:
        per_dims = {d: _describe_row(row, d) for d in row["dims"]}
        cons = next(iter(per_dims.values())) if len(set(per_dims.values())) == 1 else "; ".join(
            f"{d}D {text}" for d, text in per_dims.items())
        cells = [row["name"], "/".join(f"{d}D" for d in row["dims"]), cons]
        for c in columns:
            problem = row["problems"].get(c)
            if problem is None:
                cells.append(_fmt_params(row["params"][c]) if row["params"][c] is not None else "✓")
            elif problem.endswith("not supported"):
                cells.append("—")
            else:
                foot.append(f"[{len(foot) + 1}] {row['name']} × {c}: {problem}")
                cells.append(f"{'ERROR' if c in row['build_errors'] else '✗'} [{len(foot)}]")
        cells.append(f"{row['source']} · {row['file']}")
        lines.append("| " + " | ".join(cells) + " |")
        if row["notes"] or row["paper"]:
            notes.append(f"- {row['name']}: {row['notes']}" + (f" Paper: {row['paper']}." if row["paper"] else ""))
    out = "\n".join(lines)
    out += ("\n\nParameters at each dataset's roi and channels (— = dims not supported; ✗ = the model cannot "
            "take that dataset's roi; ERROR = the builder failed):\n")
    out += "\n".join(foot) if foot else "(every model fits every dataset of its dims)"
    if notes:
        out += "\n\nNotes:\n" + "\n".join(notes)
    return out


def _describe_row(row: dict, dims: int) -> str:
    div = row["divisor"][str(dims)]
    if isinstance(div, str):
        return "depends on the dataset"
    cons = Constraints(tuple(div), row["fixed_size"], row["min_bottleneck"], row["min_batch"])
    return cons.describe()


def run(args) -> int:
    """`deconver models`: print the table (or JSON); exit 1 if a model file is broken."""
    from deconver.config import ConfigError

    try:
        report = describe_models(args.pattern, config=args.config, datasets=args.dataset,
                                 model_dirs=args.model_dir, params=not args.no_params)
    except (ModelError, ConfigError) as err:
        print(f"deconver models: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    broken = list(report["errors"])
    for row in report["models"]:
        broken += list(dict.fromkeys(row["build_errors"].values()))
    if broken:
        print("\nmodel files with errors:\n  " + "\n  ".join(broken), file=sys.stderr)
        return 1
    return 0
