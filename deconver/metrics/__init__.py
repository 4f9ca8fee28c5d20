"""Per-case segmentation metrics (Dice, HD95, NSD), the challenges' own metrics, empty-mask rules, evaluate.

The HD95 definition used everywhere (``HD_IMPL``) is documented in ``deconver.metrics.surface`` and
docs/metrics.md. Heavy modules (pandas, the CLI step) load only when used.
"""
from deconver.metrics.challenge import (
    BRATS_PENALTY,
    brats23_lesionwise,
    glas_object_metrics,
    isles22_metrics,
    label_components,
)
from deconver.metrics.surface import (
    HD_DEFINITION,
    HD_IMPL,
    PairMetrics,
    compare_masks,
    diagonal,
    dice,
    hausdorff,
    hd95,
    nsd,
    surface,
    surface_distances,
)

__all__ = [
    "BRATS_PENALTY", "HD_DEFINITION", "HD_IMPL", "PairMetrics", "brats23_lesionwise", "compare_masks", "diagonal",
    "dice", "glas_object_metrics", "hausdorff", "hd95", "isles22_metrics", "label_components", "nsd", "surface",
    "surface_distances", "apply_rule", "summarize",
]


def __getattr__(name):
    if name in ("apply_rule", "summarize"):
        from deconver.metrics import empty_rules

        return getattr(empty_rules, name)
    raise AttributeError(f"module 'deconver.metrics' has no attribute {name!r}")
