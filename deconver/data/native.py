"""Going back from the prepared grid to the native one: predictions and ground truth for evaluation.

`deconver prepare` records, per case, the native affine/shape and each step that changed the grid, in the
order it ran (``entry["geometry"]["steps"]``: reorientation, crop box, affines before and after
resampling). `to_native` undoes them in reverse order: a resampling by resampling back through the two
affines (MONAI `SpatialResample`, same ``align_corners``), a crop by pasting into the grid before it (zeros
outside), a reorientation exactly (a permutation and flips, nibabel's orientation algebra).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from deconver.data.records import DatasetError
from deconver.io import atomic_path


def inverse_orientation(array: np.ndarray, step: dict) -> np.ndarray:
    """(C, *oriented) -> (C, *before): undo the permutation/flips of a recorded reorientation step."""
    import nibabel as nib

    src = nib.orientations.io_orientation(np.asarray(step["affine_before"], dtype=np.float64))
    dst = nib.orientations.axcodes2ornt(tuple(step["axcodes"]))
    back = nib.orientations.ornt_transform(dst, src)
    return np.stack([nib.orientations.apply_orientation(c, back) for c in array])


def _inverse_resample(arr: np.ndarray, step: dict, mode: str) -> np.ndarray:
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    dtype = arr.dtype
    t = MetaTensor(torch.as_tensor(np.ascontiguousarray(arr), dtype=torch.float32),
                   affine=torch.as_tensor(step["affine_after"], dtype=torch.float64))
    out = SpatialResample(mode="nearest" if mode == "nearest" else "bilinear", padding_mode="border",
                          align_corners=bool(step.get("align_corners", False)), dtype=np.float32)(
        t, dst_affine=torch.as_tensor(step["affine_before"], dtype=torch.float64), spatial_size=step["shape_before"])
    out = np.asarray(out.as_tensor().numpy())
    if mode == "nearest" and dtype.kind in "iub":
        out = np.rint(out)
    return out.astype(dtype, copy=False)


def _inverse_crop(arr: np.ndarray, step: dict) -> np.ndarray:
    full = np.zeros((arr.shape[0], *step["shape_before"]), dtype=arr.dtype)
    full[(slice(None), *(slice(s, e) for s, e in zip(step["start"], step["end"])))] = arr
    return full


def to_native(array, entry: dict, mode: str = "nearest") -> np.ndarray:
    """An array (C, *S) on a case's prepared grid, as (C, *native shape) on its native grid.

    mode: "nearest" for label maps (values are kept) or "linear" for probabilities/intensities.
    Voxels the foreground crop removed come back as 0. The recorded steps are undone in reverse order.
    """
    import torch

    if mode not in ("nearest", "linear"):
        raise ValueError(f"mode must be 'nearest' or 'linear', got {mode!r}")
    g = entry["geometry"]
    arr = np.asarray(array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array)
    if arr.ndim != len(g["prepared_shape"]) + 1 or tuple(arr.shape[1:]) != tuple(g["prepared_shape"]):
        raise ValueError(f"case {entry['id']}: expected an array (C, {', '.join(map(str, g['prepared_shape']))}) "
                         f"on the prepared grid, got {tuple(arr.shape)}")
    if "steps" not in g:
        raise DatasetError(f"case {entry['id']}: its cache entry predates the recorded preprocessing steps; "
                           "rerun `deconver prepare`")
    for step in reversed(g["steps"]):
        if step["step"] == "resample":
            arr = _inverse_resample(arr, step, mode)
        elif step["step"] == "crop":
            arr = _inverse_crop(arr, step)
        elif step["step"] == "orientation":
            arr = inverse_orientation(arr, step)
    if tuple(arr.shape[1:]) != tuple(g["native_shape"]):
        raise RuntimeError(f"case {entry['id']}: inversion produced {arr.shape[1:]}, expected {g['native_shape']}")
    return np.ascontiguousarray(arr)


# 2D file endings a prediction keeps (Pillow format names); any other 2D source gets PNG
_FORMATS_2D = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF"}
# detached-header formats are written as their one-file twins (a header and its data file cannot be
# renamed into place together)
_ONE_FILE = {".mhd": ".mha", ".nhdr": ".nrrd"}


def native_suffix(entry: dict) -> str:
    """The file ending of a case's label map in its native format: the source's ending for formats read
    through SimpleITK (MHA, NRRD …; .mhd/.nhdr become .mha/.nrrd) and for 2D PNG/BMP/TIF sources of the
    nnU-Net reader, else ``.nii.gz`` (3D) / ``.png`` (2D)."""
    ending = entry.get("meta", {}).get("file_ending")
    if entry["spatial_dims"] == 2:
        return ending if ending in _FORMATS_2D else ".png"
    if entry.get("meta", {}).get("format") != "sitk":
        return ".nii.gz"
    return _ONE_FILE.get(ending, ending)



def save_native(label_map, entry: dict, path: str | Path) -> Path:
    """Write a label map (*native shape) in the native format: NIfTI with the source image's affine and
    header (3D NIfTI sources), the source's format and geometry through SimpleITK (MHA, NRRD …), PNG (2D;
    BMP/TIFF when the path says so). Atomic."""
    label_map = np.asarray(label_map)
    g = entry["geometry"]
    if tuple(label_map.shape) != tuple(g["native_shape"]):
        raise ValueError(f"case {entry['id']}: label map of shape {label_map.shape}, native shape is {g['native_shape']}")
    path = Path(path)
    if label_map.min(initial=0) < 0 or label_map.max(initial=0) > 255:
        raise ValueError(f"case {entry['id']}: label values must lie in 0..255")
    data = label_map.astype(np.uint8)
    if entry["spatial_dims"] == 2:
        from PIL import Image

        with atomic_path(path) as tmp:
            Image.fromarray(data, mode="L").save(tmp, format=_FORMATS_2D.get(path.suffix.lower(), "PNG"))
        return path
    if entry.get("meta", {}).get("format") == "sitk":
        return _save_sitk(data, Path(entry["source"]["images"][0]), path)
    import nibabel as nib

    source = Path(entry["source"]["images"][0])
    try:
        header = nib.load(str(source)).header.copy()
    except Exception as err:
        raise DatasetError(f"{source}: cannot read the source image header ({err})") from None
    img = nib.Nifti1Image(data, np.asarray(g["native_affine"]), header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    img.header["cal_min"], img.header["cal_max"] = 0, float(data.max(initial=0))
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def _save_sitk(data: np.ndarray, source: Path, path: Path) -> Path:
    """A label map (x, y, z) written by SimpleITK with the source image's spacing, origin and direction."""
    import SimpleITK as sitk

    from deconver.data.loading import sitk_header

    reader = sitk_header(source)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    img.SetSpacing(reader.GetSpacing())
    img.SetOrigin(reader.GetOrigin())
    img.SetDirection(reader.GetDirection())
    with atomic_path(path) as tmp:  # the temporary name keeps the ending SimpleITK picks its writer by
        sitk.WriteImage(img, str(tmp), useCompression=True)
    return path


def _label_space(entry: dict) -> SimpleNamespace:
    return SimpleNamespace(name=entry.get("preset", "?"), labels=entry["labels"])


def load_native_label(entry: dict) -> tuple[np.ndarray, tuple[float, ...]]:
    """The case's ground truth on its native grid in the preset's label space, and the native spacing
    (mm in 3D, (1, 1) pixels in 2D)."""
    from deconver.data.loading import read_native_label

    if not entry["source"].get("label"):
        raise DatasetError(f"case {entry['id']}: has no label file")
    label, _ = read_native_label(entry, _label_space(entry))
    return label, tuple(entry["geometry"]["native_spacing"])


def load_native_instances(entry: dict) -> np.ndarray:
    """The GlaS instance map (0 background, one id per gland) of a case, int32 on its native grid."""
    from deconver.data.loading import read_native_label

    if entry.get("label_encoding") != "instances":
        raise DatasetError(f"case {entry['id']}: its labels are not an instance map "
                           f"(label encoding {entry.get('label_encoding')!r})")
    _, instances = read_native_label(entry, _label_space(entry))
    return instances
