"""The prepared cache: ``manifest.json`` plus one image and one label ``.npy`` per case.

The manifest is written last and atomically by `deconver prepare`; a folder without one is not a cache.
Arrays are plain ``.npy`` so they load fast and can be memory-mapped.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deconver.data.records import DatasetError

MANIFEST = "manifest.json"
CASES_DIR = "cases"
CACHE_FORMAT = 2  # 2: geometry records the preprocessing steps in order (`geometry.steps`)


class PreparedDataset:
    """Read access to one prepared dataset (the output of `deconver prepare`).

    Example::

        ds = PreparedDataset("results/default/prepared/isles22")
        image, label = ds.load(ds.case_ids[0])   # float32 (C, *S), uint8 (1, *S)
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise DatasetError(f"{path} not found: run `deconver prepare` for this dataset first")
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DatasetError(f"{path}: cannot read manifest ({err})") from None
        if self.manifest.get("format") != CACHE_FORMAT:
            raise DatasetError(f"{path}: cache format {self.manifest.get('format')!r}, this version reads "
                               f"{CACHE_FORMAT}: run `deconver prepare` again")
        self._cases = {c["id"]: c for c in self.manifest["cases"]}

    # ------------------------------------------------------------------ description
    @property
    def preset_name(self) -> str:
        return self.manifest["preset_name"]

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    @property
    def preset(self):
        """The resolved preset (study overrides included) the cache was prepared with."""
        from deconver.config import DatasetPreset

        return DatasetPreset.model_validate(self.manifest["preset"])

    @property
    def spatial_dims(self) -> int:
        return int(self.manifest["spatial_dims"])

    @property
    def channels(self) -> list[str]:
        return list(self.manifest["channels"])

    @property
    def synthetic(self) -> bool:
        return bool(self.manifest.get("synthetic", False))

    @property
    def case_ids(self) -> list[str]:
        return list(self._cases)

    def __len__(self) -> int:
        return len(self._cases)

    def __contains__(self, case_id: str) -> bool:
        return case_id in self._cases

    def case(self, case_id: str) -> dict:
        """The manifest entry of a case (geometry, source files, subset, strata, meta)."""
        try:
            return self._cases[case_id]
        except KeyError:
            raise KeyError(f"case {case_id!r} is not in {self.directory / MANIFEST}") from None

    def content_key(self, case_ids) -> str:
        """A hash of what these cases' cached arrays hold (their checksums, or for a cache written before
        checksums the input files' sizes and mtimes, and the preprocessing fingerprint): it changes
        exactly when a run on these cases would see other data."""
        import hashlib

        parts = [[c, self.case(c).get("fingerprint"), self.case(c).get("checksums") or self.case(c).get("inputs")]
                 for c in sorted(case_ids)]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def subset(self, case_id: str) -> str | None:
        return self.case(case_id).get("subset")

    def strata(self, case_id: str) -> float:
        """Foreground voxels of the case's label (native grid), the stratification value of `deconver split`."""
        return float(self.case(case_id)["strata"])

    # ------------------------------------------------------------------ data
    def paths(self, case_id: str) -> tuple[Path, Path | None]:
        entry = self.case(case_id)
        label = entry["files"].get("label")
        return self.directory / entry["files"]["image"], (self.directory / label if label else None)

    def load(self, case_id: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(image float32 (C, *S), label uint8 (1, *S) in the preset's label values, None if unlabelled)."""
        image_path, label_path = self.paths(case_id)
        mode = "r" if mmap else None
        try:
            image = np.load(image_path, mmap_mode=mode)
            label = np.load(label_path, mmap_mode=mode) if label_path else None
        except (OSError, ValueError) as err:
            raise DatasetError(f"{image_path.parent}: cannot load case {case_id!r} ({err}); "
                               "run `deconver prepare` again") from None
        return image, label

    def __repr__(self) -> str:
        return f"PreparedDataset({str(self.directory)!r}, {self.preset_name}, {len(self)} cases)"
