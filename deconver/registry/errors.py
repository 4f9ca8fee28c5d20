"""The registry's errors; each message names the model, its file and the key."""
from __future__ import annotations

from pathlib import Path

from deconver.config import REPO_ROOT
from deconver.steps import StepError, UsageError


class ModelError(UsageError):
    """An invalid model request or model file; the message names the model, its file and the key.
    A request (unknown keyword, roi, dims, batch) is a usage error (exit 2); a broken file is a `StepError` (exit 1)."""


class UnknownModelError(ModelError, KeyError):
    """No model is registered under this name; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return ValueError.__str__(self)


class ModelFileError(StepError, ModelError):
    """A model file failed to load or to register (syntax error, import error, duplicate name)."""


class ModelBuildError(StepError, ModelError):
    """A registered builder raised or returned something other than an nn.Module; names the file."""


def show(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
