"""segmentation-models-pytorch DeepLabV3+ with a ResNet-34 encoder, randomly initialised (2D only)."""
import segmentation_models_pytorch as smp

from deconver.registry import register_model


@register_model(
    "smp_deeplabv3plus",
    dims=(2,),
    divisor=lambda encoder_output_stride=16, **_: encoder_output_stride,
    min_bottleneck=2,
    min_batch=2,  # the ASPP image-pooling branch batch-normalises a 1 x 1 map
    wraps=smp.DeepLabV3Plus,
    defaults=dict(encoder_name="resnet34"),
    source="segmentation-models-pytorch, encoder_weights=None (nothing downloads)",
    paper="Chen et al., ECCV 2018 (arXiv:1802.02611)",
    notes="resnet34 encoder, output stride 16, random init; training needs batches of 2 or more.",
)
def smp_deeplabv3plus(in_channels, out_channels, spatial_dims, roi_size, *, encoder_weights: None = None, **kwargs):
    """smp.DeepLabV3Plus; pretrained weights are not offered (they would be downloaded)."""
    return smp.DeepLabV3Plus(in_channels=in_channels, classes=out_channels, encoder_weights=None, **kwargs)
