"""The Registry: discovery of model files, look-up by name, checks of a request and building."""
from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib.util
import math
import sys
import traceback
import types
import warnings
from pathlib import Path
from typing import Sequence

from deconver.config import REPO_ROOT
from deconver.registry.declare import _STAGING, Constraints, ModelInfo
from deconver.registry.errors import ModelBuildError, ModelError, ModelFileError, UnknownModelError, show
from deconver.registry.signatures import check_kwargs, jsonable, prune

MODELS_DIR = REPO_ROOT / "models"


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
            self._errors.append((path, f"{show(path)}: registers no model (decorate a builder with "
                                       f"@register_model; helper files start with '_')"))
        self._commit(staged, path)

    def _commit(self, infos: list[ModelInfo], path: Path) -> list[str]:
        """Add a file's models; a name another file registers too is rejected. Returns the new errors."""
        seen: set[str] = set()
        errors: list[str] = []
        for info in infos:
            if info.name in seen:
                errors.append(f"{show(path)}: registers model {info.name!r} twice")
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
            files = " and ".join(show(f) for f in self._conflicts[info.name])
            errors.append(f"{show(path)}: model {info.name!r} is registered by {files}; one name, one file — "
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
            files = ", ".join(show(f) for f in self._conflicts[name])
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
        kwargs = prune(dict(kwargs or {}))
        check_kwargs(info, kwargs)
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
        kwargs = prune(kwargs)
        cons = self.check(name, spatial_dims, roi_size, kwargs, dataset=dataset)
        info = self.info(name)
        roi = tuple(int(r) for r in roi_size)
        call = dict(in_channels=in_channels, out_channels=out_channels, spatial_dims=spatial_dims, roi_size=roi)
        if info.accepts_dataset:
            call["dataset"] = dataset
        merged = info.resolve(kwargs)
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
            "roi_size": list(roi), "dataset": dataset, "kwargs": jsonable(merged), "file": info.where,
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


def _fmt_div(div: tuple[int, ...]) -> str:
    return str(div[0]) if len(set(div)) == 1 else "(" + ", ".join(map(str, div)) + ")"

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
        return f"{show(path)}:{err.lineno}: SyntaxError: {err.msg}"
    if isinstance(err, ModelFileError):
        return str(err)
    line = ""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if frame.filename and Path(frame.filename).resolve() == path:
            line = f":{frame.lineno}"
            break
    return f"{show(path)}{line}: {type(err).__name__}: {err}"

def _as_roi(roi_size: Sequence[int], spatial_dims: int, label: str) -> tuple[int, ...]:
    try:
        roi = tuple(roi_size)
    except TypeError:
        raise ModelError(f"{label}: roi_size must be a sequence of {spatial_dims} ints, got {roi_size!r}") from None
    if len(roi) != spatial_dims or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in roi):
        raise ModelError(f"{label}: roi_size must be {spatial_dims} positive ints, got {list(roi)}")
    return roi
