"""Training and validation data: prepared cases of one fold, random crops with the preset's augmentation.

Randomness never depends on history: the training sampler yields keys ``(epoch, position, case)``; the
case order of an epoch comes from ``(seed, epoch)`` and the crop/augmentation of a sample from
``(seed, epoch, position)``. A run resumed from a checkpoint therefore sees exactly the samples an
uninterrupted run sees, whatever the number of data-loader workers, and a run on W processes sees the
same global batches as a run on one process: ``protocol.batch_size`` is the global batch, and rank r
takes the r-th slice of ``batch_size / W`` samples of every global batch (engine/distributed.py).
Validation cases are dealt to ranks round-robin, no case twice.
"""
from __future__ import annotations

import contextlib
import math
import typing
from typing import Any, Iterator, Sequence

import lightning.pytorch as L
import numpy as np
import torch
from monai.data import set_track_meta
from monai.data.meta_obj import get_track_meta
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset, Sampler

from deconver.config import Protocol
from deconver.engine.distributed import per_device_batch

CACHE_BYTES = 4 * 2**30  # keep the cases of a fold in memory when they take less than this


class CaseSource(typing.Protocol):
    """What the engine needs of a prepared dataset (`deconver.data.PreparedDataset` is one)."""

    def load(self, case_id: str) -> tuple[np.ndarray, np.ndarray]: ...


@contextlib.contextmanager
def single_thread():
    """Run small-tensor transforms on one intra-op thread and without MONAI metadata tracking.

    Transforms of one crop are far too small to gain from threads: with two OpenMP threads they cost
    ~20x the CPU time of one thread (spin-waiting), which a 2-core machine pays out of the training step.
    """
    threads, track = torch.get_num_threads(), get_track_meta()
    if threads != 1:
        torch.set_num_threads(1)
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(track)
        if threads != 1:
            torch.set_num_threads(threads)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed that is a fixed function of the integers given (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class CaseStore:
    """Loads cases from a source, keeping them in memory when the whole set fits into `cache_bytes`."""

    def __init__(self, source: CaseSource, ids: Sequence[str], cache_bytes: int = CACHE_BYTES):
        self.source, self.ids = source, list(ids)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        if self.ids:
            image, label = self._read(self.ids[0])
            if (image.nbytes + label.nbytes) * len(self.ids) <= cache_bytes:
                self._cache = {self.ids[0]: (image, label)}

    def _read(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.source.load(case_id)
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label, dtype=np.uint8)

    def preload(self) -> None:
        """Read every case now (before data-loader workers fork, so they share the memory)."""
        if self._cache is not None:
            for case_id in self.ids:
                self.get(case_id)

    def get(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None:
            return self._read(case_id)
        if case_id not in self._cache:
            self._cache[case_id] = self._read(case_id)
        return self._cache[case_id]


def train_transform_specs(protocol: Protocol, spatial_dims: int) -> list[tuple[str, dict[str, Any]]]:
    """The training chain as (MONAI transform name, keyword arguments), in order: pad to the roi, one random
    crop (``protocol.crop``: uniform, or fg:bg ``pos_neg_ratio``), then the preset's augmentation.
    `train_transforms` builds exactly this; `deconver protocol` prints it."""
    roi = list(protocol.roi_size)
    aug = protocol.augmentation
    keys = ["image", "label"]
    if protocol.crop == "uniform":
        crop = ("RandSpatialCropd", {"keys": keys, "roi_size": roi, "random_size": False})
    else:
        crop = ("RandCropByPosNegLabeld", {"keys": keys, "label_key": "label", "spatial_size": roi,
                                           "pos": protocol.pos_neg_ratio, "neg": 1.0, "num_samples": 1})
    specs: list[tuple[str, dict[str, Any]]] = [("SpatialPadd", {"keys": keys, "spatial_size": roi, "mode": "constant"}),
                                               crop]
    if aug.enabled:
        rotate = aug.rotate_range if spatial_dims == 2 else [aug.rotate_range] * 3
        sigma = list(aug.smooth_sigma)
        specs += [
            ("RandAffined", {"keys": keys, "prob": aug.affine_prob, "rotate_range": rotate,
                             "scale_range": [aug.scale_range] * spatial_dims, "mode": ["bilinear", "nearest"],
                             "padding_mode": aug.padding_mode, "spatial_size": roi}),
            ("RandGaussianNoised", {"keys": "image", "prob": aug.noise_prob, "mean": 0.0, "std": aug.noise_std}),
            ("RandGaussianSmoothd", {"keys": "image", "prob": aug.smooth_prob, "sigma_x": sigma, "sigma_y": sigma,
                                     "sigma_z": sigma}),
            ("RandScaleIntensityd", {"keys": "image", "factors": aug.intensity_scale, "prob": aug.intensity_scale_prob}),
            ("RandShiftIntensityd", {"keys": "image", "offsets": aug.intensity_shift, "prob": aug.intensity_shift_prob}),
        ]
        specs += [("RandFlipd", {"keys": keys, "prob": aug.flip_prob, "spatial_axis": axis})
                  for axis in range(spatial_dims)]
    return specs


def train_transforms(protocol: Protocol, spatial_dims: int) -> Compose:
    """The MONAI training chain of `train_transform_specs`."""
    import monai.transforms as mt

    def arg(value):  # MONAI wants tuples where a pair or a per-axis range is given
        return tuple(value) if isinstance(value, list) and not all(isinstance(v, str) for v in value) else value

    return Compose([getattr(mt, name)(**{k: (v if k in ("keys", "mode") else arg(v)) for k, v in kwargs.items()})
                    for name, kwargs in train_transform_specs(protocol, spatial_dims)])


class TrainDataset(Dataset):
    """Training samples keyed by ``(epoch, position, case index)`` from `EpochSampler`."""

    def __init__(self, store: CaseStore, protocol: Protocol, spatial_dims: int, seed: int):
        self.store, self.seed = store, seed
        self.transforms = train_transforms(protocol, spatial_dims)

    def __len__(self) -> int:
        return len(self.store.ids)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        epoch, position, index = key
        image, label = self.store.get(self.store.ids[index])
        self.transforms.set_random_state(seed=derive_seed(self.seed, epoch, position))
        with single_thread():
            out = self.transforms({"image": torch.from_numpy(image), "label": torch.from_numpy(label)})
        if isinstance(out, list):  # the crop returns num_samples=1 samples
            out = out[0]
        return {"image": torch.as_tensor(out["image"], dtype=torch.float32).contiguous(),
                "label": torch.as_tensor(out["label"]).round().to(torch.uint8).contiguous()}


class EpochSampler(Sampler):
    """Yields this rank's keys ``(epoch, position, case index)`` of one epoch.

    Positions ``k*B*W + r*B + j`` (batch k, rank r of W, slot j < B) index an order made of concatenated
    permutations of the cases drawn from ``(seed, epoch)``. ``steps`` batches per epoch per rank
    (None: one pass over the cases, ``ceil(N / (B*W))``). `skip_batches` drops the first batches of the
    first iteration (a run resumed in the middle of an epoch).
    """

    def __init__(self, num_cases: int, batch_size: int, seed: int, steps: int | None = None, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, skip_batches: int = 0):
        if num_cases < 1:
            raise ValueError("the fold has no training cases")
        self.num_cases, self.batch_size, self.seed = num_cases, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps = steps or math.ceil(num_cases / (batch_size * world_size))
        self.epoch, self._skip = epoch, skip_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The global case order of an epoch (long enough for every position of every rank)."""
        rng = np.random.default_rng(derive_seed(self.seed, epoch, 0x5A3))
        needed = self.steps * self.batch_size * self.world_size
        reps = math.ceil(needed / self.num_cases)
        return np.concatenate([rng.permutation(self.num_cases) for _ in range(reps)])

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch, skip, self._skip = self.epoch, self._skip, 0
        order = self.order(epoch)
        bw = self.batch_size * self.world_size
        for k in range(skip, self.steps):
            for j in range(self.batch_size):
                position = k * bw + self.rank * self.batch_size + j
                yield epoch, position, int(order[position])


class ValDataset(Dataset):
    """Whole prepared cases for sliding-window validation."""

    def __init__(self, store: CaseStore, indices: Sequence[int]):
        self.store, self.indices = store, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        image, label = self.store.get(self.store.ids[index])
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "index": index}


class SegmentationDataModule(L.LightningDataModule):
    """The training and validation cases of one fold of a prepared dataset.

    `source` is a `deconver.data.PreparedDataset` (or anything with ``load(id)``); `train_ids`/`val_ids`
    come from the fold file. Nothing is split here; validation uses the protocol's `val_cases` of them.
    """

    def __init__(self, source: CaseSource, train_ids: Sequence[str], val_ids: Sequence[str], protocol: Protocol,
                 spatial_dims: int, seed: int, num_workers: int | None = None, cache_bytes: int = CACHE_BYTES):
        super().__init__()
        self.source, self.protocol, self.spatial_dims, self.seed = source, protocol, spatial_dims, seed
        self.train_ids, self.val_ids = list(train_ids), protocol.validated(val_ids)
        self.num_workers = protocol.num_workers if num_workers is None else num_workers
        self.cache_bytes = cache_bytes
        self.train_store: CaseStore | None = None
        self.val_store: CaseStore | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_store is None:
            self.train_store = CaseStore(self.source, self.train_ids, self.cache_bytes)
            self.train_store.preload()
        if self.val_store is None:
            self.val_store = CaseStore(self.source, self.val_ids, self.cache_bytes)
            self.val_store.preload()

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _resume_position(self) -> tuple[int, int]:
        """(epoch, batches already done in it) of the trainer's restored loop state; (0, 0) on a fresh start."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        epochs = trainer.fit_loop.epoch_progress.current
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready if epochs.started > epochs.processed else 0
        return epochs.processed, done

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        workers = self.num_workers
        return DataLoader(dataset, num_workers=workers, persistent_workers=workers > 0,
                          worker_init_fn=_worker_init if workers > 0 else None,
                          multiprocessing_context="fork" if workers > 0 else None, **kwargs)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        rank, world = self._rank()
        epoch, done = self._resume_position()
        batch = per_device_batch(self.protocol.batch_size, world)  # the protocol's batch is global
        sampler = EpochSampler(len(self.train_ids), batch, self.seed,
                               steps=self.protocol.steps_per_epoch, rank=rank, world_size=world,
                               epoch=epoch, skip_batches=done)
        dataset = TrainDataset(self.train_store, self.protocol, self.spatial_dims, self.seed)
        return self._loader(dataset, batch_size=batch, sampler=sampler, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        rank, world = self._rank()
        dataset = ValDataset(self.val_store, range(rank, len(self.val_ids), world))
        return self._loader(dataset, batch_size=1, shuffle=False, collate_fn=_collate_one)


def _collate_one(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Validation batches hold one whole case (shapes differ between cases)."""
    (item,) = items
    return {"image": item["image"][None], "label": item["label"][None], "index": torch.tensor([item["index"]])}

