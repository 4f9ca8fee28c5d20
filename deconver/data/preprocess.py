"""The deterministic preprocessing of one case, step by step in ``preset.preprocessing.order`` (MONAI).

Steps: reorient (`Orientation`, 3D), crop to the foreground of the image channels (`CropForeground`,
margin), resample to the preset spacing (`Spacing`: bilinear for images, nearest for labels,
``align_corners`` from the preset), z-score per channel (`NormalizeIntensity(nonzero=True,
channel_wise=True)`, or clip + z-score with fixed CT statistics). Each step that changes the grid appends what undoes it to ``geometry["steps"]``
(`deconver.data.native.to_native` walks them backwards). `preprocessing_specs` describes the same steps
for `deconver protocol`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from deconver.data.records import DatasetError


def _as_list(a) -> list:
    return np.asarray(a, dtype=np.float64).tolist()


def preprocess(loaded, preset) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(image float32 (C, *S), label uint8 (1, *S) or None, geometry) on the prepared grid.

    The steps run in ``preset.preprocessing.order``; each one that changes the grid appends what undoes
    it to ``geometry["steps"]`` (`deconver.data.native.to_native` walks them backwards).
    """
    import torch
    from monai.data import MetaTensor

    image = loaded.image
    if not isinstance(image, MetaTensor):
        image = MetaTensor(torch.as_tensor(image), affine=torch.as_tensor(loaded.affine))
    label = None
    if loaded.label is not None:
        label = MetaTensor(torch.as_tensor(loaded.label[None].astype(np.float32)), affine=image.affine.clone())
    pp = preset.preprocessing
    geometry: dict[str, Any] = {
        "native_shape": list(loaded.shape), "native_affine": _as_list(loaded.affine),
        "native_spacing": list(loaded.spacing), "native_axcodes": loaded.axcodes,
        "orientation": None, "order": list(pp.order), "align_corners": pp.align_corners, "steps": [],
    }
    geometry["oriented_shape"] = list(loaded.shape)
    geometry["crop_start"], geometry["crop_end"] = [0] * preset.spatial_dims, list(loaded.shape)
    geometry["cropped_shape"] = list(loaded.shape)
    geometry["cropped_affine"] = _as_list(image.affine)
    geometry["cropped_spacing"] = _spacing(image.affine, preset.spatial_dims)
    geometry["target_spacing"] = list(pp.spacing) if pp.spacing else None
    geometry["resampled"] = False
    geometry["label_voxels_outside_crop"] = 0
    for step in pp.order:
        image, label = _STEPS[step](image, label, preset, geometry)
    geometry["prepared_shape"] = list(image.shape[1:])
    geometry["prepared_affine"] = _as_list(image.affine)
    geometry["prepared_spacing"] = _spacing(image.affine, preset.spatial_dims)
    img = np.ascontiguousarray(np.asarray(image.as_tensor().numpy(), dtype=np.float32))
    lab = None
    if label is not None:
        lab = np.ascontiguousarray(np.rint(np.asarray(label.as_tensor().numpy())).astype(np.uint8))
    if not np.isfinite(img).all():
        raise DatasetError(f"{loaded.source}: preprocessing produced NaN/inf (constant channel?)")
    return img, lab, geometry


def _orient(image, label, preset, geometry):
    """Reorient to the preset's axcodes (3D); checked against nibabel's algebra, which the inverse uses."""
    import nibabel as nib
    from monai.transforms import Orientation

    axcodes = preset.preprocessing.orientation
    if preset.spatial_dims != 3 or not axcodes:
        return image, label
    before, shape = np.asarray(image.affine, dtype=np.float64), list(image.shape[1:])
    orient = Orientation(axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")))
    image = orient(image)
    label = orient(label) if label is not None else None
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(before),
                                           nib.orientations.axcodes2ornt(tuple(axcodes)))
    if not np.allclose(np.asarray(image.affine), before @ nib.orientations.inv_ornt_aff(ornt, shape), atol=1e-4):
        raise RuntimeError("Orientation disagrees with nibabel's orientation transform; cannot record an inverse")
    geometry["orientation"] = axcodes
    geometry["oriented_shape"] = list(image.shape[1:])
    geometry["steps"].append({"step": "orientation", "axcodes": axcodes, "shape_before": shape,
                              "affine_before": _as_list(before)})
    return image, label


def _crop(image, label, preset, geometry):
    """Crop to the non-zero box of the image channels plus the margin (the whole image when it has none)."""
    import torch
    from monai.transforms import CropForeground, SpatialCrop

    pp = preset.preprocessing
    spatial = np.asarray(image.shape[1:])
    start, end = np.zeros(len(spatial), dtype=int), spatial.copy()
    if pp.crop_foreground:
        cropper = CropForeground(margin=pp.crop_margin, allow_smaller=True)
        box_start, box_end = (np.asarray(b, dtype=int) for b in cropper.compute_bounding_box(image))
        if (box_end > box_start).all():  # (an image without any non-zero voxel keeps its whole extent)
            start, end = np.maximum(box_start, 0), np.minimum(box_end, spatial)
            crop = SpatialCrop(roi_start=start.tolist(), roi_end=end.tolist())
            image = crop(image)
            if label is not None:
                # label voxels outside the image's foreground box are not in the cache (the native ground
                # truth keeps them); counted on the grid the crop sees
                before = int(torch.count_nonzero(label.as_tensor()))
                label = crop(label)
                geometry["label_voxels_outside_crop"] = before - int(torch.count_nonzero(label.as_tensor()))
    geometry["crop_start"], geometry["crop_end"] = start.tolist(), end.tolist()
    geometry["cropped_shape"] = list(image.shape[1:])
    geometry["cropped_affine"] = _as_list(image.affine)
    geometry["cropped_spacing"] = _spacing(image.affine, preset.spatial_dims)
    if pp.crop_foreground:
        geometry["steps"].append({"step": "crop", "start": start.tolist(), "end": end.tolist(),
                                  "shape_before": spatial.tolist()})
    return image, label


def _resample(image, label, preset, geometry):
    """Resample to the preset spacing (bilinear images, nearest labels; MONAI `Spacing`)."""
    from monai.transforms import Spacing

    pp = preset.preprocessing
    if not pp.spacing:
        return image, label
    before, shape = _as_list(image.affine), list(image.shape[1:])
    image = Spacing(pixdim=pp.spacing, mode="bilinear", align_corners=pp.align_corners, dtype=np.float32)(image)
    if label is not None:
        label = Spacing(pixdim=pp.spacing, mode="nearest", align_corners=pp.align_corners, dtype=np.float32)(
            label, output_spatial_shape=list(image.shape[1:]))
    geometry["resampled"] = True
    geometry["steps"].append({"step": "resample", "shape_before": shape, "affine_before": before,
                              "affine_after": _as_list(image.affine), "align_corners": pp.align_corners})
    return image, label


def _normalize(image, label, preset, geometry):
    """z-score per channel (on the non-zero voxels with ``zscore_nonzero``); ``ct``: clip each channel to its
    ``ct_stats`` window, then z-score with their mean and std (nnU-Net's CT normalisation)."""
    import torch
    from monai.transforms import NormalizeIntensity

    mode = preset.preprocessing.normalize
    if mode == "ct":
        stats = preset.preprocessing.ct_stats
        low, high, mean, std = (torch.tensor([s[i] for s in stats]).view(-1, *[1] * preset.spatial_dims)
                                for i in range(4))
        image = (image.clamp(low, high) - mean) / std
    elif mode != "none":
        image = NormalizeIntensity(nonzero=mode == "zscore_nonzero", channel_wise=True)(image)
    return image, label


_STEPS = {"orientation": _orient, "crop": _crop, "resample": _resample, "normalize": _normalize}


def preprocessing_specs(preset) -> list[dict[str, Any]]:
    """The steps `preprocess` runs for a preset, in order, as {"step", "transform", parameters} (a step that
    is off says so); what `deconver protocol` prints."""
    pp = preset.preprocessing
    out: list[dict[str, Any]] = [{"step": "load", "transform": "deconver.data.loading.load_case",
                                  "channels": list(preset.channels), "reader": preset.reader,
                                  "reader_options": dict(preset.reader_options)}]
    for step in pp.order:
        if step == "orientation":
            on = preset.spatial_dims == 3 and bool(pp.orientation)
            out.append({"step": step, "transform": "Orientation", "axcodes": pp.orientation} if on else
                       {"step": step, "transform": None, "note": "off (2D, or orientation: null)"})
        elif step == "crop":
            out.append({"step": step, "transform": "CropForeground", "source": "image, any channel > 0",
                        "margin": pp.crop_margin, "allow_smaller": True} if pp.crop_foreground else
                       {"step": step, "transform": None, "note": "off (crop_foreground: false)"})
        elif step == "resample":
            out.append({"step": step, "transform": "Spacing", "pixdim": list(pp.spacing),
                        "mode": ["bilinear", "nearest"], "align_corners": pp.align_corners,
                        "padding_mode": "border"} if pp.spacing else
                       {"step": step, "transform": None, "note": "off (spacing: null, the native grid is kept)"})
        elif pp.normalize == "ct":
            out.append({"step": step, "transform": "clip + z-score (ct)", "ct_stats": pp.ct_stats})
        else:
            out.append({"step": step, "transform": "NormalizeIntensity", "nonzero": pp.normalize == "zscore_nonzero",
                        "channel_wise": True} if pp.normalize != "none" else
                       {"step": step, "transform": None, "note": "off (normalize: none)"})
    return out


def _spacing(affine, dims: int) -> list[float]:
    a = np.asarray(affine, dtype=np.float64)
    return np.sqrt((a[:dims, :dims] ** 2).sum(0)).tolist()


