"""The segmentation-models-pytorch family (2D only): U-Net, UNet++ and DeepLabV3+ on a ResNet-34 encoder,
randomly initialised (pretrained weights are not offered: they would be downloaded)."""
import segmentation_models_pytorch as smp

from deconver.registry import register_model

SOURCE = "segmentation-models-pytorch, encoder_weights=None (nothing downloads)"


def _builder(network):
    """A builder of `network` with the preset's channels; ``encoder_weights`` may only be None."""

    def build(in_channels, out_channels, spatial_dims, roi_size, *, encoder_weights: None = None, **kwargs):
        return network(in_channels=in_channels, classes=out_channels, encoder_weights=None, **kwargs)

    build.__name__ = build.__qualname__ = f"smp_{network.__name__.lower()}"
    build.__doc__ = f"smp.{network.__name__}; pretrained weights are not offered (they would be downloaded)."
    return build


def _depth_divisor(encoder_depth=5, **_):
    return 2 ** encoder_depth


register_model(
    "smp_unet", dims=(2,), divisor=_depth_divisor, min_bottleneck=2,  # batch norm at the encoder's last stage
    wraps=smp.Unet, defaults=dict(encoder_name="resnet34"), source=SOURCE,
    paper="Ronneberger et al., MICCAI 2015; He et al., CVPR 2016 (ResNet)",
    notes="resnet34 encoder, random init. smp's decoder interpolates to any size; the suite asks for "
    "multiples of 2**encoder_depth so skips stay aligned.",
)(_builder(smp.Unet))

register_model(
    "smp_unetplusplus", dims=(2,), divisor=_depth_divisor, min_bottleneck=2,
    wraps=smp.UnetPlusPlus, defaults=dict(encoder_name="resnet34"), source=SOURCE,
    paper="Zhou et al., DLMIA 2018 (arXiv:1807.10165)",
    notes="resnet34 encoder, random init; input sides must be multiples of 2**encoder_depth (smp's check).",
)(_builder(smp.UnetPlusPlus))

register_model(
    "smp_deeplabv3plus", dims=(2,), divisor=lambda encoder_output_stride=16, **_: encoder_output_stride,
    min_bottleneck=2, min_batch=2,  # the ASPP image-pooling branch batch-normalises a 1 x 1 map
    wraps=smp.DeepLabV3Plus, defaults=dict(encoder_name="resnet34"), source=SOURCE,
    paper="Chen et al., ECCV 2018 (arXiv:1802.02611)",
    notes="resnet34 encoder, output stride 16, random init; training needs batches of 2 or more.",
)(_builder(smp.DeepLabV3Plus))
