"""segmentation-models-pytorch U-Net with a ResNet-34 encoder, randomly initialised (2D only)."""
import segmentation_models_pytorch as smp

from deconver.registry import register_model


@register_model(
    "smp_unet",
    dims=(2,),
    divisor=lambda encoder_depth=5, **_: 2 ** encoder_depth,
    min_bottleneck=2,  # batch norm at the encoder's last stage
    wraps=smp.Unet,
    defaults=dict(encoder_name="resnet34"),
    source="segmentation-models-pytorch, encoder_weights=None (nothing downloads)",
    paper="Ronneberger et al., MICCAI 2015; He et al., CVPR 2016 (ResNet)",
    notes="resnet34 encoder, random init. smp's decoder interpolates to any size; the suite asks for "
    "multiples of 2**encoder_depth so skips stay aligned.",
)
def smp_unet(in_channels, out_channels, spatial_dims, roi_size, *, encoder_weights: None = None, **kwargs):
    """smp.Unet; pretrained weights are not offered (they would be downloaded)."""
    return smp.Unet(in_channels=in_channels, classes=out_channels, encoder_weights=None, **kwargs)
