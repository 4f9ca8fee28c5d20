"""Training and inference engine (Lightning + MONAI): one protocol for every model.

Typed API (what the CLI, the workflow and the tests call):

* `train(study, dataset, model, fold, *, max_epochs=None, base=".", progress=True) -> Path` (final.ckpt)
* `predict(study, dataset, model, fold, *, base=".", probabilities=False, input_dir=None, output_dir=None,
  checkpoint="final", device=None, progress=True) -> Path` (the predictions folder)

Building blocks: `SegmentationModule` (module.py), `SegmentationDataModule` (datamodule.py),
`LabelCodec` (labels.py), `build_loss` (losses.py), `RunRecorder`/`AtomicCheckpointIO` (callbacks.py).
`train` and `predict` are imported eagerly, so ``deconver.engine.train`` is the function (the CLI loads the
module through ``sys.modules``); both modules import torch only inside their functions.
"""
from __future__ import annotations

from deconver.engine.predict import predict
from deconver.engine.train import train

__all__ = ["LabelCodec", "SegmentationDataModule", "SegmentationModule", "build_loss", "predict", "train"]

_WHERE = {
    "SegmentationModule": "deconver.engine.module",
    "SegmentationDataModule": "deconver.engine.datamodule",
    "LabelCodec": "deconver.engine.labels",
    "build_loss": "deconver.engine.losses",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'deconver.engine' has no attribute {name!r}")
