"""Datasets: readers of the official layouts, synthetic stand-ins, the prepared cache, folds.

Contract (docs/ARCHITECTURE.md): `read_dataset(preset, root) -> list[Case]`, `DatasetError`,
`PreparedDataset(directory)`, `to_native`, `save_native`, `native_suffix`, `load_native_label`, `load_native_instances`.
Heavy dependencies (torch, MONAI) are imported only inside the functions that need them.
"""
from deconver.data.cache import PreparedDataset
from deconver.data.native import load_native_instances, load_native_label, native_suffix, save_native, to_native
from deconver.data.readers import READERS, read_dataset
from deconver.data.records import Case, DatasetError

__all__ = [
    "Case",
    "DatasetError",
    "PreparedDataset",
    "READERS",
    "load_native_instances",
    "load_native_label",
    "make_folds",
    "native_suffix",
    "prepare_dataset",
    "read_dataset",
    "save_native",
    "to_native",
    "write_synthetic",
]


def __getattr__(name):
    if name == "prepare_dataset":
        from deconver.data.prepare import prepare_dataset

        return prepare_dataset
    if name == "make_folds":
        from deconver.data.split import make_folds

        return make_folds
    if name == "write_synthetic":
        from deconver.data.synth import write_synthetic

        return write_synthetic
    raise AttributeError(f"module 'deconver.data' has no attribute {name!r}")
