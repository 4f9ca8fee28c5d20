"""The report's words: the sentences its captions share (empty-mask rule, HD95, FLOPs, synthetic data)."""
from __future__ import annotations

from typing import Any

import pandas as pd

FLOPS_SENTENCE = ("The paper's FLOPs per pixel follow the DeepSpeed profiler's convention (2 FLOPs per MAC plus "
                  "element-wise ops), which does not see the NDC layer's own convolutions and so undercounts "
                  "Deconver; our count includes them, and our paper-convention column reproduces the paper's figure.")
OURS_FLOPS = ("'ours' = torch.utils.flop_counter, 2 FLOPs per multiply-accumulate of every convolution (the NDC "
              "layer's included), linear layer, matrix product and attention, element-wise ops not counted")
PAPER_FLOPS = ("'paper conv.' = the paper's DeepSpeed-profiler convention (2 FLOPs per MAC plus element-wise ops, "
               "NDC convolutions not counted)")
#: Definitions of the HD95 implementations `evaluation.csv` names (docs/metrics.md), for captions.
HD_DEFINITIONS = {
    "deconver-maxdir-p95-v1": "the larger of the two directed 95th percentiles of surface distances, as MONAI",
}


def rule_text(ds: dict[str, Any]) -> str:
    """The empty-mask rule in words, with its penalty and unit."""
    unit = ds.get("hd95_unit") or "?"
    if ds.get("rule") == "exclude":
        return ("empty-mask rule 'exclude' (the authors' MONAI behaviour, only for comparison with published numbers): "
                "Dice of two empty masks → 100 %, of exactly one empty → 0; HD95 of every case-region with an empty mask "
                "is left out of the mean (so a missed lesion does not count against HD95)")
    pen = ds.get("penalty")
    pen_t = f"the image diagonal ({unit})" if pen == "diagonal" else f"{fmt_num(pen)} {unit}"
    return (f"empty-mask rule 'penalize' (BraTS 2023): both masks empty → Dice 100 %, HD95 0; exactly one empty → "
            f"Dice 0, HD95 = {pen_t}")


def hd_text(ds: dict[str, Any]) -> str:
    """The HD95 implementation id(s) of a dataset, with the definition when it is known."""
    impls = [i for i in str(ds.get("hd_impl") or "").split(",") if i]
    if not impls:
        return "implementation not recorded"
    return "; ".join(f"{i}: {HD_DEFINITIONS[i]}" if i in HD_DEFINITIONS else i for i in impls)


def upper_first(text: str) -> str:
    """Upper-case the first letter only (str.capitalize would lower-case 'BraTS', 'HD95')."""
    return text[:1].upper() + text[1:]


def fmt_num(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:g}"


def synthetic_text(ds: dict[str, Any]) -> str:
    return "SYNTHETIC stand-in data (pipeline check; numbers are not comparable with the paper). " if ds.get("synthetic") else ""


def ds_title(name: str, ds: dict[str, Any]) -> str:
    return f"{name} (synthetic)" if ds.get("synthetic") else name


def complexity_caption(cx: pd.DataFrame, unit: str) -> str:
    """What the complexity columns count and where they were measured, and which models were flagged."""
    def values(col):
        return sorted({str(v) for v in cx[col].dropna()}) if col in cx else []

    rois, reps, devs = values("runtime_roi"), values("repeats"), values("device")
    text = (f"FLOPs per {unit} in thousands at batch 1 and the preset's roi: {OURS_FLOPS}; {PAPER_FLOPS}. "
            f"Latency: median of {'/'.join(reps) or 'N'} forward passes after warm-up, batch 1"
            + (f", roi {'/'.join(rois)}" if rois else "") + "; peak memory of that forward pass"
            + f"; device: {', '.join(devs) or 'not recorded'}.")
    if "flags" in cx:
        flagged = {m: f for m, f in cx["flags"].items() if isinstance(f, str) and f.strip()}
        if flagged:
            text += " Flagged by the FLOP cross-check: " + "; ".join(f"{m} ({f})" for m, f in flagged.items()) + "."
    return text
