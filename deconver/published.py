"""The paper's published numbers: Deconver's configurations, parameter counts, FLOPs and results.

One home for what Ashtari et al., "Deconver: A Deconvolution Network for Medical Image Segmentation"
(arXiv:2504.00302) report, so the network presets (deconver.nn.presets), the closed-form costs
(deconver.complexity.analytic), the tests and the report's reproduction table (deconver.report)
all compare against the same values. docs/paper.md says where each number comes from.
"""
from __future__ import annotations

#: The paper's architecture per dataset (docs/paper.md, "Configurations"): one block per stage, NDC
#: with one group per channel (groups=-1), source-channel ratio 4, MLP ratio 4, one update step.
BLOCK = dict(groups=-1, ratio=4, mlp_ratio=4, num_iters=1)
CONFIGS: dict[str, dict] = {
    "isles22": dict(in_channels=2, out_channels=1, spatial_dims=3, widths=(64, 128, 256, 512), kernel_size=3),
    "brats23": dict(in_channels=4, out_channels=3, spatial_dims=3, widths=(32, 64, 128, 256, 512), kernel_size=3),
    "glas": dict(in_channels=3, out_channels=1, spatial_dims=2, widths=(32, 64, 128, 256, 512, 512), kernel_size=5),
    "fives": dict(in_channels=3, out_channels=1, spatial_dims=2, widths=(32, 64, 128, 256, 512, 512), kernel_size=5),
}
#: Exact parameter counts of those configurations (they round to the reported 10.5M, 10.6M, 20.8M).
PARAMS: dict[str, int] = {"isles22": 10_476_545, "brats23": 10_553_859, "glas": 20_794_785, "fives": 20_794_785}

#: The paper's reported Deconver results per dataset: Dice (%), HD95 (in HD95_UNIT), parameters
#: (millions) and FLOPs per voxel / pixel (thousands, DeepSpeed's convention).
RESULTS: dict[str, dict[str, float]] = {
    "isles22": dict(dice=78.16, hd95=4.99, params_m=10.5, flops_k=607.0),
    "brats23": dict(dice=90.66, hd95=4.45, params_m=10.6, flops_k=167.5),
    "glas": dict(dice=92.12, hd95=60.49, params_m=20.8, flops_k=422.8),
    "fives": dict(dice=92.72, hd95=30.26, params_m=20.8, flops_k=422.8),
}
#: The unit of the paper's HD95 (MONAI without spacing: voxels of the resampled grid, pixels in 2D).
HD95_UNIT: dict[str, str] = {"isles22": "voxels of the 2 mm grid", "brats23": "voxels of the 1 mm grid",
                             "glas": "px", "fives": "px"}
#: How close the paper-convention count must come to the reported FLOPs (they are rounded to 0.1K
#: and the profiled roi is not stated; docs/complexity.md).
FLOPS_TOLERANCE = 0.015


def flops_per_voxel_k(dataset: str) -> float:
    """The paper's FLOPs per voxel (pixel in 2D), in thousands, of Deconver on `dataset`."""
    return RESULTS[dataset]["flops_k"]
