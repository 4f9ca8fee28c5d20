"""MONAI SwinUNETR in the authors' configuration (v1, docs/paper.md §3); ``use_v2=True`` selects v2."""
from monai.networks.nets import SwinUNETR

from deconver.registry import register_model


@register_model(
    "swin_unetr",
    dims=(2, 3),
    divisor=lambda patch_size=2, **_: patch_size ** 5,  # MONAI's own rule: patch embedding + 4 mergings
    min_bottleneck=2,  # instance norm on the roi/32 bottleneck fails on 1 voxel
    wraps=SwinUNETR,
    defaults=dict(feature_size=24, use_v2=False),
    source="MONAI",
    paper="Hatamizadeh et al., BrainLes 2021 (arXiv:2201.01266); v2: He et al., MICCAI 2023",
    notes="authors' config: feature_size 24, v1 (use_v2=true for SwinUNETR-v2); checkpointing=true: MONAI's "
    "use_checkpoint (activation checkpointing of every Swin block).",
)
def swin_unetr(in_channels, out_channels, spatial_dims, roi_size, *, checkpointing: bool = False, **kwargs):
    """SwinUNETR; any keyword of SwinUNETR overrides the defaults; ``checkpointing`` is its ``use_checkpoint``."""
    if "use_checkpoint" in kwargs:
        raise ValueError("swin_unetr: set checkpointing (the suite's name for MONAI's use_checkpoint), not use_checkpoint")
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, spatial_dims=spatial_dims,
                     use_checkpoint=checkpointing, **kwargs)
