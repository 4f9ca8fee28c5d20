"""MONAI MedNeXt, small variant (MedNeXt-S, kernel 3) as MONAI's create_mednext("S") builds it."""
from typing import Literal

from monai.networks.nets import MedNeXt

from deconver.registry import register_model


@register_model(
    "mednext",
    dims=(2, 3),
    divisor=lambda blocks_down, **_: 2 ** len(blocks_down),
    min_bottleneck=2,  # per-channel group norm on the bottleneck
    wraps=MedNeXt,
    defaults=dict(init_filters=32, encoder_expansion_ratio=2, decoder_expansion_ratio=2, bottleneck_expansion_ratio=2,
                  blocks_down=[2, 2, 2, 2], blocks_bottleneck=2, blocks_up=[2, 2, 2, 2], kernel_size=3,
                  use_residual_connection=True, norm_type="group", global_resp_norm=False),
    source="MONAI",
    paper="Roy et al., MICCAI 2023 (arXiv:2303.09975)",
    notes="MedNeXt-S (MONAI create_mednext('S')): 32 filters, expansion 2, 2 blocks per stage, kernel 3; "
    "no deep supervision.",
)
def mednext(in_channels, out_channels, spatial_dims, roi_size, *, deep_supervision: Literal[False] = False, **kwargs):
    """MedNeXt; any keyword of MedNeXt overrides the small-variant defaults."""
    return MedNeXt(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
