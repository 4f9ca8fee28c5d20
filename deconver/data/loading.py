"""Reading one case's files into checked arrays: the only place raw files are decoded.

Every failure is a `DatasetError` naming the file: unreadable or truncated file, wrong dimensionality,
NaN/inf intensities, a channel or label on another grid (beyond `GRID_ATOL`), label values outside the
preset's set. 3D NIfTI files are read with MONAI's `LoadImage` (nibabel), other 3D formats (MHA, NRRD …)
with SimpleITK into the same RAS affine convention, 2D images with Pillow.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deconver.data.records import Case, DatasetError

# Largest allowed difference between two affines (mm) for "the same grid"; ISLES'22 masks differ from
# their DWI by ~1e-7, a real misregistration by far more than this.
GRID_ATOL = 1e-3


@dataclass
class LoadedCase:
    """A case's arrays on its native grid (channel first) and the native geometry."""

    image: Any                 # MetaTensor (C, *S) float32 (3D) / ndarray (C, H, W) float32 (2D)
    label: np.ndarray | None   # (*S) uint8, values in the preset's label space
    instances: np.ndarray | None  # (*S) int32 instance map (GlaS) or None
    affine: np.ndarray         # 4x4 native affine (identity in 2D)
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    axcodes: str | None
    source: Path | None = None  # the first image file (named in errors)


def allowed_label_values(preset) -> list[int]:
    return sorted({0, *(v for vals in preset.labels.values() for v in vals)})


def foreground_value(preset) -> int:
    """The value a binary target (GlaS instances > 0, FIVES channel 0 > 127) is stored as."""
    return int(next(iter(preset.labels.values()))[0])


def encode_label(raw: np.ndarray, encoding: str, path: Path, preset) -> tuple[np.ndarray, np.ndarray | None]:
    """(label map in the preset's label space as uint8, instance map or None) from a label file's array."""
    if encoding == "values":
        if raw.dtype.kind == "f":
            if not np.isfinite(raw).all():
                raise DatasetError(f"{path}: label file holds NaN or inf values")
            rounded = np.round(raw)
            if np.abs(raw - rounded).max(initial=0) > 1e-3:
                raise DatasetError(f"{path}: label file holds non-integer values (e.g. {raw[raw != rounded].flat[0]})")
            raw = rounded
        values = np.unique(raw)
        allowed = allowed_label_values(preset)
        bad = [v.item() for v in values if v not in allowed]
        if bad:
            raise DatasetError(f"{path}: unexpected label values {[int(b) if float(b).is_integer() else b for b in bad]}"
                               f"; the preset {preset.name!r} allows {allowed}")
        return raw.astype(np.uint8), None
    if encoding == "instances":  # 8/16/32-bit grey or RGB ids; an 8-bit map that may have wrapped is refused
        from deconver.data.instances import decode_instances

        instances = decode_instances(raw, path)
        return ((instances > 0) * foreground_value(preset)).astype(np.uint8), instances
    if encoding == "threshold":
        if raw.ndim == 3:
            raw = raw[..., 0]
        return ((raw > 127) * foreground_value(preset)).astype(np.uint8), None
    raise DatasetError(f"{path}: unknown label encoding {encoding!r}")


def _load_nifti(path: Path, dtype) -> Any:
    from monai.transforms import LoadImage

    try:
        return LoadImage(reader="NibabelReader", image_only=True, dtype=dtype)(str(path))
    except Exception as err:  # nibabel/zlib/gzip raise many types for unreadable or truncated files
        raise DatasetError(f"{path}: cannot read NIfTI file ({_nifti_problem(path, err)})") from None


def _nifti_problem(path: Path, err: Exception) -> str:
    """One line saying why a NIfTI file cannot be read: nibabel's own reason when it has one (MONAI's
    message lists every reader it tried and suggests installing more, which misleads for a broken file)."""
    import nibabel as nib

    try:
        np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as direct:  # noqa: BLE001 - the reason is reported, not handled
        err = direct
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:300]


def check_affine(affine: np.ndarray, path: Path, dims: int = 3) -> None:
    """A usable voxel-to-world affine: finite, no zero or collinear axis (a singular matrix has no orientation)."""
    a = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(a).all():
        raise DatasetError(f"{path}: the header's affine (sform/qform) holds NaN or inf; fix the header "
                           "(e.g. reset the sform from the qform) before preparing")
    norms = np.sqrt((a[:dims, :dims] ** 2).sum(0))
    zero = [i for i, n in enumerate(norms) if n == 0]
    if zero:
        raise DatasetError(f"{path}: the header's affine has a zero column for axis {zero} (voxel spacing 0); "
                           "fix the header's pixdim / sform before preparing")
    if abs(np.linalg.det(a[:dims, :dims])) < 1e-6 * float(np.prod(norms)):
        raise DatasetError(f"{path}: the header's affine is singular (two axes point the same way); fix the header")


def check_volume_shape(shape, path: Path) -> None:
    """A 3D preset needs volumes: a spatial axis of length 1 is a single slice, not a volume."""
    if any(int(n) < 2 for n in shape):
        raise DatasetError(f"{path}: shape {tuple(int(n) for n in shape)} is a single slice, not a 3D volume; "
                           "use a 2D preset for 2D data, or remove the case")


# LPS (ITK) -> RAS (nibabel, MONAI): the first two world axes change sign
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_sitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array indexed x, y, z as nibabel gives it, 4x4 RAS affine) of an image SimpleITK reads (MHA, NRRD …)."""
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except Exception as err:  # RuntimeError with ITK's message for unreadable files
        raise DatasetError(f"{path}: cannot read image file ({type(err).__name__}: {str(err).strip()[:300]})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(f"{path}: expected a 3D single-channel image, got {img.GetDimension()}D with "
                           f"{img.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    return np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0)), sitk_affine(img)


def sitk_affine(img) -> np.ndarray:
    """The RAS affine of a SimpleITK image (or image reader) from its spacing, direction and origin."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    return _LPS_TO_RAS @ affine


def _load_3d_file(path: Path, dtype, fmt: str) -> Any:
    """A 3D (or 4D NIfTI) file as a MetaTensor with its RAS affine."""
    if fmt == "nifti":
        return _load_nifti(path, dtype)
    import torch
    from monai.data import MetaTensor

    arr, affine = read_sitk(path)
    return MetaTensor(torch.as_tensor(arr if dtype is None else arr.astype(dtype)), affine=torch.as_tensor(affine),
                      meta={"filename_or_obj": str(path)})


def image_spacing(path: Path, fmt: str) -> list[float]:
    """Voxel size (mm) from a 3D file's header without reading its data."""
    if fmt == "nifti":
        from deconver.data.readers._common import nifti_spacing

        return nifti_spacing(path)
    return [float(s) for s in sitk_header(path).GetSpacing()[:3]]


def sitk_header(path: Path):
    """A SimpleITK reader holding the file's geometry (spacing, origin, direction), its data not read."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as err:
        raise DatasetError(f"{path}: cannot read image header ({type(err).__name__}: {str(err).strip()[:300]})") from None
    return reader


def _affine(img) -> np.ndarray:
    return np.asarray(img.affine, dtype=np.float64)


def same_grid(a_affine, a_shape, b_affine, b_shape, atol: float | None = None) -> bool:
    """Same shape, and affines equal within `atol` mm (default `GRID_ATOL`)."""
    atol = GRID_ATOL if atol is None else atol
    return tuple(a_shape) == tuple(b_shape) and np.allclose(a_affine, b_affine, rtol=0, atol=atol)


def _check_finite(arr, path: Path) -> None:
    import torch

    a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    finite = np.isfinite(a)
    if not finite.all():
        raise DatasetError(f"{path}: {int(a.size - np.count_nonzero(finite))} NaN or inf intensities")


def load_case(case: Case, preset, with_label: bool = True) -> LoadedCase:
    """The case's channels stacked on the first channel's grid, and its label, all checked."""
    fmt = case.meta.get("format", "nifti")
    if fmt == "image2d":
        return _load_2d(case, preset, with_label)
    if fmt in ("nifti", "sitk"):
        return _load_3d(case, preset, with_label)
    raise DatasetError(f"case {case.id}: unknown image format {fmt!r}")


def _load_3d(case: Case, preset, with_label: bool) -> LoadedCase:
    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.transforms import EnsureChannelFirst, ResampleToMatch

    fmt = case.meta.get("format", "nifti")
    resample = set(case.meta.get("resample_channels", []))
    zero = set(case.meta.get("zero_channels", []))
    per_file = int(case.meta.get("channels_per_file", 1))
    channels: list[Any] = []
    ref = ref_path = None
    for i, path in enumerate(case.images):
        if i in zero:
            channels.append(None)
            continue
        img = _load_3d_file(path, np.float32, fmt)
        spatial = img.ndim - (1 if per_file > 1 else 0)
        if spatial != 3:
            raise DatasetError(f"{path}: expected a 3D image{'' if per_file == 1 else f' with {per_file} channels'}, "
                               f"got shape {tuple(img.shape)}")
        if per_file > 1 and img.shape[-1] != per_file:
            raise DatasetError(f"{path}: expected {per_file} channels in the last axis, got shape {tuple(img.shape)}")
        img = EnsureChannelFirst(channel_dim=-1 if per_file > 1 else "no_channel")(img)
        check_affine(_affine(img), path)
        check_volume_shape(img.shape[1:], path)
        _check_finite(img, path)
        if ref is None:
            ref, ref_path = img, path
        elif not same_grid(_affine(img), img.shape[1:], _affine(ref), ref.shape[1:]):
            if i in resample:
                img = ResampleToMatch(mode="bilinear", padding_mode="zeros")(img, img_dst=ref)
                img = MetaTensor(img.as_tensor().float(), affine=ref.affine)
            else:
                raise DatasetError(f"{path}: grid {tuple(img.shape[1:])} / affine differs from {ref_path} "
                                   f"{tuple(ref.shape[1:])} by more than the tolerance ({GRID_ATOL} mm)")
        channels.append(img)
    if ref is None:
        raise DatasetError(f"case {case.id}: no readable image channel")
    tensors = [torch.zeros_like(ref.as_tensor()) if c is None else c.as_tensor() for c in channels]
    image = MetaTensor(torch.cat(tensors, 0).float(), affine=ref.affine.clone(), meta={"filename_or_obj": str(ref_path)})
    label = None
    if with_label and case.label is not None:
        lab = _load_3d_file(case.label, None, fmt)
        if lab.ndim == 4 and lab.shape[-1] == 1:
            lab = lab[..., 0]
        if lab.ndim != 3:
            raise DatasetError(f"{case.label}: expected a 3D label map, got shape {tuple(lab.shape)}")
        check_affine(_affine(lab), case.label)
        if not same_grid(_affine(lab), lab.shape, _affine(ref), ref.shape[1:]):
            raise DatasetError(f"{case.label}: label grid {tuple(lab.shape)} / affine does not match the image "
                               f"{ref_path} {tuple(ref.shape[1:])} (tolerance {GRID_ATOL} mm)")
        label, _ = encode_label(np.asarray(lab.as_tensor().numpy()), case.meta.get("label_encoding", "values"),
                                case.label, preset)
    affine = _affine(ref)
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(0)))
    return LoadedCase(image=image, label=label, instances=None, affine=affine, spacing=spacing,
                      shape=tuple(int(s) for s in ref.shape[1:]), axcodes="".join(nib.aff2axcodes(affine)),
                      source=case.images[0])


def read_image_2d(path: Path) -> np.ndarray:
    """An image file as an array (H, W) or (H, W, C), fully decoded; DatasetError if it cannot be."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
                im = im.convert("RGB")
            elif im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGB")
            arr = np.asarray(im)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError … on broken files
        raise DatasetError(f"{path}: cannot read image file ({type(err).__name__}: {err})") from None
    return arr


def read_rgb_2d(path: Path) -> np.ndarray:
    """An RGB image (3, H, W) float32; grayscale is repeated, palette images are expanded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"))
    except Exception as err:
        raise DatasetError(f"{path}: cannot read image file ({type(err).__name__}: {err})") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def _read_channels_2d(case: Case) -> np.ndarray:
    """The case's files decoded as they are (grey: one channel, RGB: three), concatenated (C, H, W)."""
    parts = []
    for path in case.images:
        arr = read_image_2d(path)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if parts and arr.shape[1:] != parts[0].shape[1:]:
            raise DatasetError(f"{path}: size {arr.shape[2]}x{arr.shape[1]} does not match {case.images[0]} "
                               f"({parts[0].shape[2]}x{parts[0].shape[1]})")
        parts.append(arr.astype(np.float32))
    image = np.ascontiguousarray(np.concatenate(parts, 0))
    if not np.isfinite(image).all():
        raise DatasetError(f"case {case.id}: NaN or inf intensities in {case.images}")
    return image


def _load_2d(case: Case, preset, with_label: bool) -> LoadedCase:
    if case.meta.get("expand_rgb", True):
        if len(case.images) != 1:
            raise DatasetError(f"case {case.id}: a 2D case has one RGB file, got {case.images}")
        image = read_rgb_2d(case.images[0])
    else:
        image = _read_channels_2d(case)
    if image.shape[0] != preset.in_channels:
        raise DatasetError(f"{case.images[0]}: {image.shape[0]} channels, the preset expects {preset.in_channels}")
    label = instances = None
    if with_label and case.label is not None:
        raw = read_image_2d(case.label)
        if raw.ndim != 2 and case.meta.get("label_encoding", "values") == "values":
            raise DatasetError(f"{case.label}: a label map must be a single-channel image, got {raw.shape[2]} channels")
        if raw.shape[:2] != image.shape[1:]:
            raise DatasetError(f"{case.label}: mask size {raw.shape[1]}x{raw.shape[0]} does not match the image "
                               f"{case.images[0]} ({image.shape[2]}x{image.shape[1]})")
        label, instances = encode_label(raw, case.meta.get("label_encoding", "values"), case.label, preset)
    return LoadedCase(image=image, label=label, instances=instances, affine=np.eye(4), spacing=(1.0, 1.0),
                      shape=tuple(image.shape[1:]), axcodes=None, source=case.images[0])


def read_native_label(entry: dict, preset_like) -> tuple[np.ndarray, np.ndarray | None]:
    """(label map, instances) of a manifest entry's source label file, in the native grid."""
    path = Path(entry["source"]["label"])
    encoding = entry["label_encoding"]
    if entry["spatial_dims"] == 2:
        raw = read_image_2d(path)
    elif entry.get("meta", {}).get("format") == "sitk":
        raw, _ = read_sitk(path)
    else:
        import nibabel as nib

        try:
            raw = np.asanyarray(nib.load(str(path)).dataobj)
        except Exception as err:
            raise DatasetError(f"{path}: cannot read NIfTI file ({type(err).__name__}: {err})") from None
        if raw.ndim == 4 and raw.shape[-1] == 1:
            raw = raw[..., 0]
    return encode_label(raw, encoding, path, preset_like)
