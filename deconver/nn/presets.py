"""Named Deconver configurations (data only): name -> constructor kwargs, exact parameter count, note.

Sources: the paper's configurations (deconver.published, docs/paper.md section 2), whose counts
reproduce the paper's 10.5M / 10.6M / 20.8M, and the authors' MONAI bundles (model_zoo/deconver_{isles22,brats23,fives} in
github.com/pashtari/factorizer), which use five stages 32-512, ratio 1 and, for FIVES, a 7x7 kernel
(the layouts were fixed by matching the bundles' exact parameter counts).
"""

from __future__ import annotations

from deconver import published

__all__ = ["PRESETS"]


def _paper(dataset: str) -> dict:
    """Constructor kwargs of the paper's configuration for `dataset` (deconver.published)."""
    cfg = published.CONFIGS[dataset]
    return dict(spatial_dims=cfg["spatial_dims"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                channels=cfg["widths"], kernel_size=cfg["kernel_size"], **published.BLOCK)


_ISLES22, _BRATS23, _2D = _paper("isles22"), _paper("brats23"), _paper("glas")

_PAPER_NOTES = {
    "isles22": "ISLES'22 (DWI+ADC -> lesion): 3D, widths 64-512, k3, ratio 4; paper reports 10.5M",
    "brats23": "BraTS'23 (4 MRI -> ET/TC/WT): 3D, widths 32-512, k3, ratio 4; paper reports 10.6M",
    "glas": "GlaS (RGB -> glands): 2D, six stages 32-512-512 (inferred from the reported 20.8M), k5",
    "fives": "FIVES (RGB -> vessels): 2D, six stages 32-512-512 (inferred from the reported 20.8M), k5",
}

PRESETS: dict[str, dict] = {
    **{dataset: {"kwargs": _paper(dataset), "params": published.PARAMS[dataset], "note": f"paper, {note}"}
       for dataset, note in _PAPER_NOTES.items()},
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
