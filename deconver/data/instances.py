"""Instance maps (one integer id per object): decoding the ids from a label file, and the 8-bit limit.

An 8-bit file holds ids 0-255 only. A map with more objects that was cast to 8 bits lost them by
wrap-around: id 256 became 0 (background), 257 became 1 (merged with object 1), and so on. So:

* an 8-bit map that uses all 255 ids is **refused** (`DatasetError`): its objects beyond 255 may be gone;
* a map with ids ≤ 255 in which one id marks several separate objects (8-connected parts) gets a
  **warning** (prepare lists it per case, evaluate prints it): that is what wrapped ids look like;
* 16-bit (and 32-bit) PNG and TIFF maps hold up to 65,535 (2³¹ − 1) ids and are read as they are;
* an RGB map whose three channels are equal holds the ids in each channel; one whose channels differ is
  read as colour-coded, each colour one object (id = R·65536 + G·256 + B, black = background).

Documented in docs/data.md ("Instance maps").
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from deconver.data.records import DatasetError

MAX_8BIT_IDS = 255


def decode_instances(raw: np.ndarray, path: Path) -> np.ndarray:
    """The int32 instance map of a label file's array (H, W), (H, W, 3) or 3D; DatasetError if unusable."""
    raw = np.asarray(raw)
    if raw.ndim == 3 and raw.shape[-1] in (3, 4) and raw.dtype == np.uint8:  # an RGB(A) image
        rgb = raw[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            raw = rgb[..., 0]
        else:
            return (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    if raw.dtype.kind not in "biu" or (raw.dtype.kind == "i" and (raw < 0).any()):
        raise DatasetError(f"{path}: an instance map must hold non-negative integers (got {raw.dtype})")
    if raw.dtype.kind == "u" and raw.dtype.itemsize == 1:
        used = np.count_nonzero(np.bincount(raw.ravel(), minlength=256)[1:])
        if used >= MAX_8BIT_IDS:
            raise DatasetError(
                f"{path}: an 8-bit instance map using all {MAX_8BIT_IDS} ids: objects beyond {MAX_8BIT_IDS} cannot be "
                "told apart here (ids that wrapped around became background or merged with others); save the "
                "map as 16-bit PNG or TIFF (e.g. Pillow: Image.fromarray(ids.astype('uint16')).save('x_anno.png'))")
    if raw.dtype.kind == "u" and raw.dtype.itemsize == 4 and raw.max(initial=0) > np.iinfo(np.int32).max:
        raise DatasetError(f"{path}: instance ids above {np.iinfo(np.int32).max} are not supported")
    return raw.astype(np.int32, copy=False)


def shared_ids(instances: np.ndarray) -> list[int]:
    """Ids (≤ 255 maps only) that mark several separate objects (8-/26-connected parts), in ascending order."""
    from scipy import ndimage

    if instances.max(initial=0) > MAX_8BIT_IDS:
        return []
    structure = ndimage.generate_binary_structure(instances.ndim, instances.ndim)
    parts, n = ndimage.label(instances > 0, structure=structure)
    if n == 0:
        return []
    # an id split into separate parts appears with several part labels; touching objects share a part
    pairs = np.unique(instances[parts > 0].astype(np.int64) * (n + 1) + parts[parts > 0])
    ids, counts = np.unique(pairs // (n + 1), return_counts=True)
    return [int(i) for i in ids[counts > 1]]


def instance_warnings(instances: np.ndarray | None, path) -> list[str]:
    """The warning for a map whose ids look wrapped (see the module docstring), or nothing."""
    if instances is None:
        return []
    ids = shared_ids(instances)
    if not ids:
        return []
    shown = ", ".join(map(str, ids[:8])) + (" …" if len(ids) > 8 else "")
    return [f"{path}: instance id(s) {shown} ({len(ids)} in all) each mark several separate objects; if this map "
            f"was ever stored with 8 bits, ids above {MAX_8BIT_IDS} wrapped around and merged objects (keep "
            "instance maps as 16-bit PNG or TIFF); object metrics count each id as one object"]


def read_instance_file(path: str | Path, warn: bool = True) -> np.ndarray:
    """An instance map file (2D image, or NIfTI) decoded as above; a map whose ids look wrapped is warned
    about on stderr (`warn`). Used by ``deconver evaluate --gt-dir`` for ground-truth instance maps."""
    from deconver.data.loading import read_image_2d

    path = Path(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            raw = np.asanyarray(nib.load(str(path)).dataobj)
        except Exception as err:  # nibabel raises many types for broken files
            raise DatasetError(f"{path}: cannot read NIfTI file ({type(err).__name__}: {err})") from None
        raw = raw[..., 0] if raw.ndim == 4 and raw.shape[-1] == 1 else raw
        if raw.dtype.kind == "f" and np.array_equal(raw, np.round(raw)):
            raw = raw.astype(np.int64)
    else:
        raw = read_image_2d(path)
    instances = decode_instances(raw, path)
    for warning in instance_warnings(instances, path) if warn else []:
        print(f"warning: {warning}", file=sys.stderr)
    return instances
