"""Named Deconver configurations (data only): name -> constructor kwargs, exact parameter count, note.

Sources: PAPER.md section 2 (the paper's configurations, whose counts reproduce the paper's 10.5M /
10.6M / 20.8M) and the authors' MONAI bundles (model_zoo/deconver_{isles22,brats23,fives} in
github.com/pashtari/factorizer), which use five stages 32-512, ratio 1 and, for FIVES, a 7x7 kernel
(the layouts were fixed by matching the bundles' exact parameter counts).
"""

from __future__ import annotations

__all__ = ["PRESETS"]

_PAPER = dict(groups=-1, ratio=4, mlp_ratio=4, num_iters=1)
_ISLES22 = dict(spatial_dims=3, in_channels=2, out_channels=1, channels=(64, 128, 256, 512), kernel_size=3, **_PAPER)
_BRATS23 = dict(spatial_dims=3, in_channels=4, out_channels=3, channels=(32, 64, 128, 256, 512), kernel_size=3, **_PAPER)
_2D = dict(spatial_dims=2, in_channels=3, out_channels=1, channels=(32, 64, 128, 256, 512, 512), kernel_size=5, **_PAPER)

PRESETS: dict[str, dict] = {
    "isles22": {
        "kwargs": _ISLES22,
        "params": 10_476_545,
        "note": "paper, ISLES'22 (DWI+ADC -> lesion): 3D, widths 64-512, k3, ratio 4; paper reports 10.5M",
    },
    "brats23": {
        "kwargs": _BRATS23,
        "params": 10_553_859,
        "note": "paper, BraTS'23 (4 MRI -> ET/TC/WT): 3D, widths 32-512, k3, ratio 4; paper reports 10.6M",
    },
    "glas": {
        "kwargs": _2D,
        "params": 20_794_785,
        "note": "paper, GlaS (RGB -> glands): 2D, six stages 32-512-512 (inferred from the reported 20.8M), k5",
    },
    "fives": {
        "kwargs": _2D,
        "params": 20_794_785,
        "note": "paper, FIVES (RGB -> vessels): 2D, six stages 32-512-512 (inferred from the reported 20.8M), k5",
    },
    "isles22-bundle": {
        "kwargs": {**_ISLES22, "channels": (32, 64, 128, 256, 512), "ratio": 1},
        "params": 7_811_073,
        "note": "authors' MONAI bundle deconver_isles22 (five stages 32-512, ratio 1): not the paper's configuration",
    },
    "brats23-bundle": {
        "kwargs": {**_BRATS23, "ratio": 1},
        "params": 7_812_867,
        "note": "authors' MONAI bundle deconver_brats23 (ratio 1): not the paper's configuration",
    },
    "fives-bundle": {
        "kwargs": {**_2D, "channels": (32, 64, 128, 256, 512), "ratio": 1, "kernel_size": 7},
        "params": 6_449_953,
        "note": "authors' MONAI bundle deconver_fives (five stages 32-512, ratio 1, 7x7): not the paper's configuration",
    },
}
