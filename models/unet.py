"""MONAI UNet as a plain residual U-Net (the paper gives no U-Net configuration: this is the suite's)."""
from monai.networks.nets import UNet
from monai.networks.nets.unet import CheckpointUNet  # not re-exported by monai.networks.nets

from deconver.registry import register_model, stride_divisor


@register_model(
    "unet",
    dims=(2, 3),
    divisor=lambda strides, spatial_dims, **_: stride_divisor(strides, spatial_dims),
    min_bottleneck=2,  # instance norm on the bottom block
    wraps=UNet,
    defaults=dict(channels=[16, 32, 64, 128, 256], strides=[2, 2, 2, 2], num_res_units=2, norm="instance"),
    source="MONAI",
    paper="Ronneberger et al., MICCAI 2015 (arXiv:1505.04597); residual units: Kerfoot et al., STACOM 2018",
    notes="suite choice: channels 16..256, strides 2, 2 residual units per block, instance norm, PReLU; "
    "checkpointing=true: MONAI's CheckpointUNet (same network, its state-dict keys gain '.module').",
)
def unet(in_channels, out_channels, spatial_dims, roi_size, *, checkpointing: bool = False, **kwargs):
    """MONAI UNet (``checkpointing``: MONAI's CheckpointUNet); any keyword of UNet overrides the defaults."""
    net = CheckpointUNet if checkpointing else UNet
    return net(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
