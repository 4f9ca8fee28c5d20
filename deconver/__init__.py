"""Deconver benchmark suite: the Deconver network, its baselines, and the pipeline that compares them.

`from deconver import Deconver` gives the network (imported lazily so that `deconver --help`
does not pay for importing torch).
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("deconver")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["Deconver", "__version__"]


def __getattr__(name):
    if name == "Deconver":
        from deconver.nn import Deconver

        return Deconver
    raise AttributeError(f"module 'deconver' has no attribute {name!r}")
