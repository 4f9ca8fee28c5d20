"""The nnU-Net v2 raw dataset reader: ``DatasetXXX_Name/`` with ``dataset.json``, ``imagesTr/``, ``labelsTr/``.

Layout (nnU-Net v2, documentation/dataset_format.md): channel files ``imagesTr/<case>_<XXXX><file_ending>``
(XXXX = the 4-digit channel index), labels ``labelsTr/<case><file_ending>``, optional ``imagesTs/`` (and
``labelsTs/``, which nnU-Net does not define but converted test sets often carry). ``dataset.json`` gives
``channel_names`` (``modality`` in old files), ``labels`` (name -> value, or name -> list of values for a
region-based dataset, with ``regions_class_order``), ``numTraining`` and ``file_ending``. A ``dataset`` key
listing the training files explicitly replaces the imagesTr/labelsTr scan, as in nnU-Net.

The root is the dataset folder (or a folder holding exactly one ``Dataset*`` folder). ``file_ending``
picks the format: ``.nii.gz``/``.nii`` (nibabel, as the MSD reader), ``.mha``/``.mhd``/``.nrrd``/``.nhdr``/
``.gipl``/``.gipl.gz`` (SimpleITK), ``.png``/``.bmp``/``.tif``/``.jpg`` (2D, Pillow; one file may hold
three RGB channels, so the files of a case are concatenated). ``imagesTs`` cases with a label in
``labelsTs`` are the official test subset ("test"); without labels they are read only when labels are not
required. Training cases are subset "train".
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from deconver.data.readers._common import check_root, dataset_json_dir, is_stray, is_synthetic, unique_cases
from deconver.data.records import Case, DatasetError

# file_ending -> format recorded in Case.meta["format"] (loading.py decodes each)
FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".mha": "sitk", ".mhd": "sitk", ".nrrd": "sitk", ".nhdr": "sitk",
           ".gipl": "sitk", ".gipl.gz": "sitk", ".png": "image2d", ".bmp": "image2d", ".tif": "image2d",
           ".jpg": "image2d", ".jpeg": "image2d"}
IGNORE_LABEL = "ignore"


def dataset_dir(root: Path) -> Path:
    """The nnU-Net dataset folder of `root` (the root itself or its one ``Dataset*`` child)."""
    return dataset_json_dir(check_root(root), "Dataset*", "nnU-Net dataset")


def load_spec(root: Path) -> tuple[Path, dict[str, Any]]:
    """(dataset folder, its dataset.json) with the keys this reader needs checked."""
    folder = dataset_dir(Path(root))
    path = folder / "dataset.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read dataset.json: {err}") from None
    if not isinstance(spec, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    if "channel_names" not in spec and "modality" not in spec:
        raise DatasetError(f"{path}: missing key 'channel_names'")
    for key in ("labels", "file_ending"):
        if key not in spec:
            raise DatasetError(f"{path}: missing key {key!r}")
    if spec["file_ending"] not in FORMATS:
        hint = " (3D TIFF, nnU-Net's Tiff3DIO, is not supported)" if spec["file_ending"] == ".tiff" else ""
        raise DatasetError(f"{path}: file_ending {spec['file_ending']!r} is not supported{hint}; "
                           f"supported: {sorted(FORMATS)}")
    return folder, spec


def channel_names(spec: dict, path: Path) -> list[str]:
    """dataset.json's channel names in channel-index order."""
    names = spec.get("channel_names", spec.get("modality"))
    try:
        return [str(names[k]) for k in sorted(names, key=int)]
    except (TypeError, ValueError, AttributeError):
        raise DatasetError(f"{path}: channel_names must map channel indices to names, got {names!r}") from None


def parse_labels(spec: dict, path: Path) -> tuple[str, dict[str, list[int]]]:
    """(task, {name: label values}) from dataset.json's ``labels``, background left out.

    Plain classes (every value one int) -> "multiclass"; any list of values -> "regions" (sigmoid
    channels, one per entry), which nnU-Net requires ``regions_class_order`` for.
    """
    labels = spec["labels"]
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{path}: labels must be a non-empty mapping name -> value(s)")
    if IGNORE_LABEL in labels:
        raise DatasetError(f"{path}: labels: the '{IGNORE_LABEL}' label (nnU-Net's partial annotation) is not "
                           "supported by this suite: every voxel must be labelled")
    out: dict[str, list[int]] = {}
    regions = False
    for name, value in labels.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        regions |= isinstance(value, (list, tuple)) and len(value) > 1
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise DatasetError(f"{path}: labels.{name}: expected a non-negative int or a list of them, got {value!r}")
        if values == [0]:
            continue  # background
        if 0 in values:
            raise DatasetError(f"{path}: labels.{name}: background (0) cannot belong to a region")
        out[str(name)] = sorted(set(values))
    if not out:
        raise DatasetError(f"{path}: labels declares no foreground label")
    if regions:
        order = spec.get("regions_class_order")
        if not isinstance(order, list) or len(order) != len(out):
            raise DatasetError(f"{path}: region labels need regions_class_order with one entry per region "
                               f"({len(out)}), got {order!r}")
        return "regions", out
    values = [v[0] for v in out.values()]
    if len(set(values)) != len(values):
        raise DatasetError(f"{path}: labels: two classes share a value {values}")
    return "multiclass", out


def declared_values(labels: dict[str, list[int]]) -> set[int]:
    return {v for vals in labels.values() for v in vals}


def _channel_files(folder: Path, ending: str, spec_path: Path) -> dict[str, dict[int, Path]]:
    """case -> {channel index: file} of an images folder; a file of another ending is an error."""
    pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
    out: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if is_stray(path) or path.is_dir():
            continue
        if not path.name.endswith(ending):
            raise DatasetError(f"{path}: does not end with the file_ending {ending!r} of {spec_path}")
        m = pattern.match(path.name)
        if not m:
            raise DatasetError(f"{path}: not named <case>_<XXXX>{ending} (XXXX the 4-digit channel index)")
        out.setdefault(m.group("case"), {})[int(m.group("ch"))] = path
    return out


def _label_files(folder: Path, ending: str, spec_path: Path) -> dict[str, Path]:
    out = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.iterdir()):
        if is_stray(path) or path.is_dir():
            continue
        if not path.name.endswith(ending):
            raise DatasetError(f"{path}: does not end with the file_ending {ending!r} of {spec_path}")
        out[path.name[: -len(ending)]] = path
    return out


def _images_and_labels(images_dir: Path, labels_dir: Path, ending: str, spec_path: Path):
    """(case -> {channel: file}, case -> label file) of an images/labels folder pair; a label without
    images is an error."""
    found = _channel_files(images_dir, ending, spec_path)
    label_files = _label_files(labels_dir, ending, spec_path)
    orphans = sorted(set(label_files) - set(found))
    if orphans:
        raise DatasetError(f"label without images: {label_files[orphans[0]]} (no {orphans[0]}_0000{ending} "
                           f"in {images_dir})")
    return found, label_files


def _ordered(case: str, files: dict[int, Path], expected: int | None, folder: Path, ending: str) -> list[Path]:
    """The channel files 0..n-1 of a case (n = `expected`, or as many as it has for 2D images)."""
    n = expected if expected is not None else max(files) + 1
    for i in range(n):
        if i not in files:
            raise DatasetError(f"case {case}: missing channel file {folder / f'{case}_{i:04d}{ending}'}")
    extra = sorted(set(files) - set(range(n)))
    if extra:
        raise DatasetError(f"{files[extra[0]]}: channel {extra[0]} but dataset.json names {n} channel(s)")
    return [files[i] for i in range(n)]


def _listed_cases(folder: Path, spec: dict, spec_path: Path) -> dict[str, tuple[list[Path], Path | None]]:
    """The training cases of a dataset.json ``dataset`` key: {case: {"images": [...], "label": ...}}."""
    out = {}
    for case, item in spec["dataset"].items():
        if not isinstance(item, dict) or "images" not in item:
            raise DatasetError(f"{spec_path}: dataset.{case} needs 'images' (and 'label')")
        images = [(folder / p).resolve() for p in item["images"]]
        label = (folder / item["label"]).resolve() if item.get("label") else None
        for p in [*images, *([label] if label else [])]:
            if not p.is_file():
                raise DatasetError(f"{spec_path}: dataset.{case}: file {p} does not exist")
        out[str(case)] = (images, label)
    return out


def read_nnunet(root: Path, channels: list[str], *, require_label: bool = True,
                label_values: list[int] | None = None) -> list[Case]:
    """Case records of an nnU-Net v2 raw dataset; `label_values` (from the preset) must be declared labels."""
    folder, spec = load_spec(Path(root))
    spec_path = folder / "dataset.json"
    names = channel_names(spec, spec_path)
    if len(names) != len(channels):
        raise DatasetError(f"{spec_path}: the dataset has {len(names)} channels {names} but the preset names "
                           f"{len(channels)} channels {channels}")
    _, labels = parse_labels(spec, spec_path)
    if label_values is not None:
        bad = sorted(set(label_values) - declared_values(labels))
        if bad:
            raise DatasetError(f"{spec_path}: the preset's label values {bad} are not among the dataset's labels "
                               f"{sorted(declared_values(labels))}")
    ending = spec["file_ending"]
    fmt = FORMATS[ending]
    per_case = None if fmt == "image2d" else len(names)
    synthetic = is_synthetic(folder)

    def meta_of(first: Path) -> dict:
        meta = {"format": fmt, "file_ending": ending, "label_encoding": "values", "synthetic": synthetic,
                "resample_channels": [], "zero_channels": []}
        if fmt == "image2d":
            meta.update(spacing=[1.0, 1.0], expand_rgb=False)
        else:
            from deconver.data.loading import image_spacing

            meta["spacing"] = image_spacing(first, fmt)
        return meta

    cases: list[Case] = []
    if "dataset" in spec:
        listed = _listed_cases(folder, spec, spec_path)
    else:
        images_dir = folder / "imagesTr"
        if not images_dir.is_dir():
            raise DatasetError(f"{folder}: no imagesTr/ folder")
        found, label_files = _images_and_labels(images_dir, folder / "labelsTr", ending, spec_path)
        listed = {case: (_ordered(case, files, per_case, images_dir, ending), label_files.get(case))
                  for case, files in found.items()}
    if "numTraining" in spec and spec["numTraining"] != len(listed):
        raise DatasetError(f"{spec_path}: numTraining is {spec['numTraining']} but the dataset holds "
                           f"{len(listed)} training cases")
    for case, (images, label) in listed.items():
        if per_case is not None and len(images) != per_case:
            raise DatasetError(f"{spec_path}: case {case} lists {len(images)} image files, dataset.json names "
                               f"{per_case} channels")
        if label is None and require_label:
            raise DatasetError(f"case {case}: missing label {folder / 'labelsTr' / (case + ending)}")
        cases.append(Case(id=case, images=images, label=label, subset="train", meta=meta_of(images[0])))
    if per_case is None:  # 2D: every case must have the same number of channel files
        counts = {len(c.images) for c in cases}
        if len(counts) > 1:
            short = min(cases, key=lambda c: len(c.images))
            raise DatasetError(f"case {short.id}: missing channel file "
                               f"{short.images[0].parent / f'{short.id}_{len(short.images):04d}{ending}'} "
                               f"(other cases have {max(counts)} files)")
    cases += _test_cases(folder, spec_path, ending, per_case, require_label, meta_of)
    return unique_cases(cases, folder)


def _test_cases(folder: Path, spec_path: Path, ending: str, per_case: int | None, require_label: bool,
                meta_of) -> list[Case]:
    """imagesTs cases: those with a label in labelsTs (subset "test"); unlabelled ones only when labels are
    not required."""
    images_dir = folder / "imagesTs"
    if not images_dir.is_dir():
        return []
    found, label_files = _images_and_labels(images_dir, folder / "labelsTs", ending, spec_path)
    out = []
    for case, files in found.items():
        label = label_files.get(case)
        if label is None and require_label:
            continue
        images = _ordered(case, files, per_case, images_dir, ending)
        out.append(Case(id=case, images=images, label=label, subset="test", meta=meta_of(images[0])))
    return out
