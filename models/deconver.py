"""Deconver (arXiv:2504.00302) with the paper's configuration per dataset (deconver.nn.PRESETS)."""
from typing import Literal

from deconver.nn import PRESETS, Deconver
from deconver.registry import register_model


def _preset(spatial_dims, dataset=None, variant=None):
    """`variant` if given, else the dataset's paper preset, else the BraTS (3D) / GlaS (2D) layout."""
    name = variant or (dataset if dataset in PRESETS else ("brats23" if spatial_dims == 3 else "glas"))
    dims = PRESETS[name]["kwargs"]["spatial_dims"]
    if dims != spatial_dims:
        raise ValueError(f"variant {name!r} is a {dims}D network but the dataset is {spatial_dims}D")
    return name


@register_model(
    "deconver",
    dims=(2, 3),
    divisor=lambda spatial_dims, dataset=None, variant=None, channels=None, **_: 2 ** (
        len(channels or PRESETS[_preset(spatial_dims, dataset, variant)]["kwargs"]["channels"]) - 1),
    min_bottleneck=2,  # instance norm in the bottleneck blocks
    wraps=Deconver,
    source="this suite (deconver.nn)",
    paper="Ashtari et al., arXiv:2504.00302 (2025)",
    notes="paper preset of the dataset (isles22, brats23, glas, fives), else brats23 (3D) / glas (2D) layout; "
    f"variant= picks any of {', '.join(PRESETS)} (*-bundle: the authors' shipped bundles, not the paper's).",
)
def deconver(in_channels, out_channels, spatial_dims, roi_size, dataset=None, *,
             variant: Literal[tuple(PRESETS)] | None = None, **kwargs):
    """Deconver.from_preset(...) with the dataset's channels; keyword arguments override the preset."""
    name = _preset(spatial_dims, dataset, variant)
    return Deconver.from_preset(name, in_channels=in_channels, out_channels=out_channels, **kwargs)
