"""segmentation-models-pytorch UNet++ with a ResNet-34 encoder, randomly initialised (2D only)."""
import segmentation_models_pytorch as smp

from deconver.registry import register_model


@register_model(
    "smp_unetplusplus",
    dims=(2,),
    divisor=lambda encoder_depth=5, **_: 2 ** encoder_depth,
    min_bottleneck=2,  # batch norm at the encoder's last stage
    wraps=smp.UnetPlusPlus,
    defaults=dict(encoder_name="resnet34"),
    source="segmentation-models-pytorch, encoder_weights=None (nothing downloads)",
    paper="Zhou et al., DLMIA 2018 (arXiv:1807.10165)",
    notes="resnet34 encoder, random init; input sides must be multiples of 2**encoder_depth (smp's check).",
)
def smp_unetplusplus(in_channels, out_channels, spatial_dims, roi_size, *, encoder_weights: None = None, **kwargs):
    """smp.UnetPlusPlus; pretrained weights are not offered (they would be downloaded)."""
    return smp.UnetPlusPlus(in_channels=in_channels, classes=out_channels, encoder_weights=None, **kwargs)
