"""MONAI SegResNet in the authors' configuration (docs/paper.md §3)."""
from monai.networks.nets import SegResNet

from deconver.registry import register_model


@register_model(
    "segresnet",
    dims=(2, 3),
    divisor=lambda blocks_down, **_: 2 ** (len(blocks_down) - 1),
    wraps=SegResNet,
    defaults=dict(init_filters=32, blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1]),
    source="MONAI",
    paper="Myronenko, BrainLes 2018 (arXiv:1810.11654)",
    notes="authors' config: init_filters 32, blocks_down 1,2,2,4, blocks_up 1,1,1 (group norm, no VAE branch).",
)
def segresnet(in_channels, out_channels, spatial_dims, roi_size, **kwargs):
    """SegResNet; any keyword of SegResNet overrides the defaults."""
    return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
