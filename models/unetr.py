"""MONAI UNETR in the authors' configuration (docs/paper.md §3); built for exactly the dataset's roi."""
from monai.networks.nets import UNETR
from torch import nn

from deconver.registry import register_model


@register_model(
    "unetr",
    dims=(2, 3),
    divisor=16,  # ViT patch size
    fixed_size=True,  # img_size = roi_size: the position embedding has one entry per patch
    wraps=UNETR,
    defaults=dict(feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12, proj_type="conv",
                  norm_name="instance", res_block=True),
    source="MONAI",
    paper="Hatamizadeh et al., WACV 2022 (arXiv:2103.10504)",
    notes="authors' config: feature_size 16, hidden 768, mlp 3072, 12 heads, conv patch embedding, instance "
    "norm, residual blocks. img_size = roi_size; the unused cross-attention LayerNorms MONAI creates in "
    "every transformer block (18,432 parameters that never get a gradient) are removed.",
)
def unetr(in_channels, out_channels, spatial_dims, roi_size, **kwargs):
    """UNETR for inputs of size roi_size."""
    net = UNETR(in_channels, out_channels, img_size=roi_size, spatial_dims=spatial_dims, **kwargs)
    for block in net.vit.blocks:
        if not block.with_cross_attention:
            block.norm_cross_attn = nn.Identity()
    return net
