"""MONAI AttentionUnet (attention-gated U-Net); MONAI has no default widths: the suite's U-Net ones."""
from monai.networks.nets import AttentionUnet

from deconver.registry import register_model, stride_divisor


@register_model(
    "attention_unet",
    dims=(2, 3),
    divisor=lambda strides, spatial_dims, **_: stride_divisor(strides, spatial_dims),
    min_bottleneck=2,  # batch norm on the bottom block (batch 1 would leave 1 value per channel)
    wraps=AttentionUnet,
    defaults=dict(channels=[16, 32, 64, 128, 256], strides=[2, 2, 2, 2]),
    source="MONAI",
    paper="Oktay et al., MIDL 2018 (arXiv:1804.03999)",
    notes="suite choice: channels 16..256, strides 2 (as unet); MONAI's batch norm and kernel 3.",
)
def attention_unet(in_channels, out_channels, spatial_dims, roi_size, **kwargs):
    """AttentionUnet; any keyword of AttentionUnet overrides the defaults."""
    return AttentionUnet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
