"""Medical Segmentation Decathlon reader: any task, from its ``dataset.json``.

Layout: ``TaskNN_Name/{dataset.json, imagesTr/*.nii.gz, labelsTr/*.nii.gz}``; the root is the task
folder (or a folder holding exactly one Task* folder). Channels follow the ``modality`` entries of
dataset.json in order; a multi-modal task stores them as one 4D file per case.
"""
from __future__ import annotations

import json
from pathlib import Path

from deconver.data.readers._common import check_root, dataset_json_dir, is_synthetic, nifti_spacing, strip_nifti, unique_cases
from deconver.data.records import Case, DatasetError


def _task_dir(root: Path) -> Path:
    return dataset_json_dir(root, "Task*", "MSD task")


def read_msd(root: Path, channels: list[str], *, require_label: bool = True,
             label_values: list[int] | None = None) -> list[Case]:
    """Case records of an MSD task; `label_values` (from the preset) must be labels dataset.json declares."""
    root = check_root(root)
    task = _task_dir(root)
    spec_path = task / "dataset.json"
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{spec_path}: cannot read dataset.json: {err}") from None
    for key in ("modality", "training"):
        if key not in spec:
            raise DatasetError(f"{spec_path}: missing key {key!r}")
    modalities = [spec["modality"][k] for k in sorted(spec["modality"], key=int)]
    if len(modalities) != len(channels):
        raise DatasetError(f"{spec_path}: the task has {len(modalities)} modalities {modalities} but the preset "
                           f"names {len(channels)} channels {channels}")
    if label_values is not None and "labels" in spec:
        declared = {int(k) for k in spec["labels"]}
        bad = sorted(set(label_values) - declared)
        if bad:
            raise DatasetError(f"{spec_path}: the preset's label values {bad} are not among the task's labels "
                               f"{sorted(declared)}")
    synthetic = is_synthetic(task)
    cases = []
    for i, item in enumerate(spec["training"]):
        if not isinstance(item, dict) or "image" not in item:
            raise DatasetError(f"{spec_path}: training[{i}] has no 'image'")
        image = (task / item["image"]).resolve()
        if not image.is_file():
            raise DatasetError(f"{spec_path}: training[{i}] image {image} does not exist")
        label = None
        if item.get("label"):
            label = (task / item["label"]).resolve()
            if not label.is_file():
                raise DatasetError(f"{spec_path}: training[{i}] label {label} does not exist")
        elif require_label:
            raise DatasetError(f"{spec_path}: training[{i}] has no 'label'")
        meta = {"format": "nifti", "spacing": nifti_spacing(image), "label_encoding": "values", "synthetic": synthetic,
                "channels_per_file": len(modalities), "resample_channels": [], "zero_channels": []}
        cases.append(Case(id=strip_nifti(image.name), images=[image], label=label, meta=meta))
    return unique_cases(cases, task)
