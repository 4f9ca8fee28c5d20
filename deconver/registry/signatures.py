"""Keyword arguments a model accepts: read from its builder's (and wrapped network's) signature, strictly typed.

A config's mistake — an unknown key, a key the preset sets, a value of the wrong type ('false' is no
bool) — fails here naming the model file and the key, before any network is built.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import json
import typing
from dataclasses import dataclass
from typing import Any, Callable

from deconver.registry.errors import ModelError

# Builder arguments the registry fills from the dataset preset; configs may not set them.
REGISTRY_ARGS = ("in_channels", "out_channels", "spatial_dims", "roi_size", "dataset")
# Arguments of wrapped networks that builders derive from the preset (roi -> img_size, out -> classes).
DERIVED_ARGS = ("img_size", "classes", "num_classes", "in_chans", "n_classes")
_SKIP_PARAMS = ("self", "cls")


@dataclass(frozen=True)
class Param:
    """One keyword argument a model accepts: where it comes from, its type and default."""

    name: str
    annotation: Any  # a type, or None when unknown (then the value is not type-checked)
    default: Any
    origin: str  # "builder" or the wrapped constructor's name


def prune(kwargs: dict) -> dict:
    """Drop None values: a config can say "unset" uniformly (the builder's default applies)."""
    return {k: v for k, v in kwargs.items() if v is not None}

def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: getattr(o, "__name__", repr(o))))

def accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

def call_with_accepted(fn: Callable, values: dict):
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**values)
    return fn(**{k: v for k, v in values.items() if k in params})

def type_hints(fn: Callable) -> dict[str, Any]:
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


def signature_params(obj: Callable, origin: str) -> tuple[dict[str, Param], bool]:
    """Keyword-settable parameters of a function or class constructor, and whether it takes **kwargs."""
    fn = obj.__init__ if inspect.isclass(obj) else obj
    hints = type_hints(fn)
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
            params[p.name] = Param(p.name, ann, p.default, origin)
    return params, open_kw


@functools.lru_cache(maxsize=None)
def type_adapter(annotation):
    from pydantic import ConfigDict, TypeAdapter

    try:
        return TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True))
    except Exception:
        try:
            return TypeAdapter(annotation)
        except Exception:  # a type pydantic cannot describe: the value is not type-checked
            return None


def check_kwargs(info, kwargs: dict) -> None:
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
            adapter = type_adapter(param.annotation)
        except TypeError:  # unhashable annotation
            adapter = None
        if adapter is None:
            continue
        try:
            adapter.validate_json(json.dumps(value, allow_nan=False), strict=True)
        except (TypeError, ValueError) as err:
            if isinstance(err, ValidationError):
                reasons = "; ".join(dict.fromkeys(e["msg"] for e in err.errors()))
                raise ModelError(f"{label}: keyword {key!r}: {reasons} (got {value!r}; expected {type_name(param)})") from None
            try:  # not JSON (a class, a callable): validate the Python object
                adapter.validate_python(value, strict=True)
            except ValidationError as err2:
                reasons = "; ".join(dict.fromkeys(e["msg"] for e in err2.errors()))
                raise ModelError(f"{label}: keyword {key!r}: {reasons} (got {value!r}; expected {type_name(param)})") from None

def type_name(param: Param) -> str:
    ann = param.annotation
    text = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
    return f"{text}, from {param.origin}"
