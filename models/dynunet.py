"""MONAI DynUNet configured as the authors' "nnU-Net" baseline (docs/paper.md §3)."""
from collections.abc import Sequence
from typing import Literal

from monai.networks.nets import DynUNet

from deconver.registry import register_model, stride_divisor


@register_model(
    "dynunet",
    dims=(2, 3),
    divisor=lambda strides, spatial_dims, **_: stride_divisor(strides, spatial_dims),
    min_bottleneck=2,  # instance norm on the bottleneck
    wraps=DynUNet,
    defaults=dict(filters=[32, 64, 128, 256, 512], kernel_size=[3, 3, 3, 3, 3], strides=[1, 2, 2, 2, 2]),
    source="MONAI",
    paper="Isensee et al., Nat. Methods 18 (2021), as MONAI DynUNet in the authors' configs",
    notes="authors' config: filters 32..512, kernels 3, strides 1,2,2,2,2, instance norm, LeakyReLU, "
    "no residual blocks, no deep supervision (deep_supervision would change the output: not allowed).",
)
def dynunet(in_channels, out_channels, spatial_dims, roi_size, *, deep_supervision: Literal[False] = False,
            upsample_kernel_size: Sequence[Sequence[int] | int] | None = None, **kwargs):
    """DynUNet; the transposed-conv kernels follow the strides unless given."""
    up = upsample_kernel_size if upsample_kernel_size is not None else kwargs["strides"][1:]
    return DynUNet(spatial_dims, in_channels, out_channels, upsample_kernel_size=up, **kwargs)
